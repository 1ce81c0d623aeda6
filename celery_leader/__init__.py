"""celery-leader: highly available leader election and periodic work for Celery.

The elector modules (config, record, resourcelock, redislock, elector, healthz,
metrics) import nothing from Celery; the Celery glue depends on them.
"""

from .clock import Clock, FakeClock, SystemClock
from .config import ConfigurationError, LeaderCallbacks, LeaderElectionConfig
from .elector import HealthCheckError, LeaderElector
from .healthz import HealthzAdaptor, HealthzServer, serve_healthz
from .record import LeaderElectionRecord, MalformedRecordError
from .redislock import FencedScript, RedisLock
from .resourcelock import ClaimResult, LockConflictError, Observation, ResourceLock

__version__ = "0.1.0"

__all__ = [
    "ClaimResult",
    "Clock",
    "ConfigurationError",
    "FakeClock",
    "FencedScript",
    "HealthCheckError",
    "HealthzAdaptor",
    "HealthzServer",
    "LeaderCallbacks",
    "LeaderElectionConfig",
    "LeaderElectionRecord",
    "LeaderElector",
    "LockConflictError",
    "MalformedRecordError",
    "Observation",
    "RedisLock",
    "ResourceLock",
    "SystemClock",
    "__version__",
    "serve_healthz",
]
