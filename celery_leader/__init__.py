"""celery-leader: highly available leader election and periodic work for Celery.

The elector modules (clock, config, record, resourcelock, redislock, elector,
healthz, metrics) import nothing from Celery; the Celery glue (settings,
signals, worker, decorators, integration, cli) depends on them, never the
other way round.
"""

from typing import Any

from .clock import Clock, FakeClock, SystemClock
from .config import ConfigurationError, LeaderCallbacks, LeaderElectionConfig

# Bound after the submodule import so the name is the class, not the module.
from .cron import cron
from .elector import HealthCheckError, LeaderElector
from .healthz import HealthzAdaptor, HealthzServer, serve_healthz
from .record import LeaderElectionRecord, MalformedRecordError
from .redislock import FencedScript, RedisLock, ReplicationError
from .resourcelock import ClaimResult, LockConflictError, Observation, ResourceLock
from .state import current_term, is_leader

__version__ = "0.1.0"


def install(app: Any) -> Any:
    """Run the elector in every worker of ``app``; behaviour comes from ``leader_*`` settings."""
    from .integration import install as _install

    return _install(app)


def __getattr__(name: str) -> Any:
    # Celery-dependent names load lazily so the elector stays usable without Celery.
    if name in ("leader_only", "NotLeaderError"):
        from . import decorators

        return getattr(decorators, name)
    raise AttributeError(f"module 'celery_leader' has no attribute {name!r}")


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
    "NotLeaderError",
    "Observation",
    "RedisLock",
    "ReplicationError",
    "ResourceLock",
    "SystemClock",
    "__version__",
    "cron",
    "current_term",
    "install",
    "is_leader",
    "leader_only",
    "serve_healthz",
]
