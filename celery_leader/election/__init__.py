"""The election layer: client-go's ``leaderelection``, file by file, on Redis.

- ``clock``: the monotonic clock the elector reads;
- ``record``: the lease record (``LeaderElectionRecord``);
- ``resourcelock``: the lock interface (``ResourceLock``);
- ``redislock``: the Redis lock with fencing terms, and fenced scripts;
- ``redisclient``: a redis-py client from a URL (one server, Sentinel, Cluster);
- ``config``: an election's configuration and callbacks;
- ``elector``: the state machine (``LeaderElector``);
- ``running``: the elector's thread, and work run while leading;
- ``healthz``: the health check and its HTTP server;
- ``metrics``: leader metrics (no-op, or Prometheus);
- ``elections``: role labels and step-down requests through Redis.

It imports nothing from Celery or kombu, nor from the layers above it
(``celery_leader.schedule`` and the Celery glue); tests/test_layers.py checks it.
"""

from .clock import Clock, SystemClock
from .config import ConfigurationError, LeaderCallbacks, LeaderElectionConfig
from .elector import HealthCheckError, LeaderElector
from .healthz import HealthzAdaptor, HealthzServer, serve_healthz
from .record import LeaderElectionRecord, MalformedRecordError
from .redislock import FENCED, FencedScript, RedisLock, ReplicationError
from .resourcelock import ClaimResult, LockConflictError, Observation, ResourceLock

__all__ = [
    "FENCED",
    "ClaimResult",
    "Clock",
    "ConfigurationError",
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
    "ReplicationError",
    "ResourceLock",
    "SystemClock",
    "serve_healthz",
]
