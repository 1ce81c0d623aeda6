"""``leader_*`` Celery settings, read and validated in one place at start-up.

Read through ``app.conf.get`` (so the Django ``CELERY_`` namespace works) and
never written back with defaults, which would shadow the user's config module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlparse

from celery.utils.log import LoggingProxy

from .election.config import (
    ConfigurationError,
    LeaderCallbacks,
    LeaderElectionConfig,
    Watchdog,
    default_identity,
    to_seconds,
    validate_timings,
    validate_wait,
)
from .election.elector import LeaderElector
from .election.redact import redact, redact_options, redact_text, redact_url, secret_safe_logger
from .election.redisclient import REDIS_SCHEMES, default_socket_timeout, redis_client_from_url
from .election.redislock import RedisLock
from .schedule.options import CATCH_UP_POLICIES, app_setting, closest
from .schedule.runner import beat_election_name

# Kept importable from here (their homes are the layers below).
__all__ = ["CATCH_UP_POLICIES", "REDIS_SCHEMES", "LeaderSettings", "closest",
           "exit_on_configuration_error", "read_settings", "redis_client_from_url",
           "setting"]

setting = app_setting
_UNSET = object()

log = secret_safe_logger(__name__)


@dataclass(frozen=True)
class LeaderSettings:
    redis_url: str
    redis_options: dict[str, Any] = field(default_factory=dict)
    name: str = "celery"
    key_prefix: str = "celery-leader"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    release_on_cancel: bool = True
    identity: str | None = None
    beat: bool = True
    queue: str = "celery_leader"
    healthz_port: int | None = None
    healthz_host: str = "127.0.0.1"
    catch_up: str = "latest"
    misfire_grace: float | None = None
    wait_replicas: int = 0
    wait_timeout: float = 0.5
    tick_run_once: bool = True
    healthz_token: str | None = field(default=None, repr=False)  # a secret
    metrics_per_entry: bool = False
    metrics_per_task: bool = False
    django_celery_beat: bool = False
    strict_settings: bool = False
    transport_options: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        # Passwords masked (election/redact.py): settings end up in tracebacks and logs.
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown.update(redis_url=redact_url(self.redis_url),
                     redis_options=redact_options(self.redis_options),
                     transport_options=redact_options(self.transport_options))
        return f"LeaderSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def default_identity(self, hostname: str | None = None) -> str:
        """``leader_identity``, else ``<hostname>:<pid>``."""
        return self.identity or default_identity(hostname)

    def lock(self, identity: str, name: str | None = None,
             hash_tag: str | None = None) -> RedisLock:
        """A RedisLock on the election (``name`` overrides the election name,
        ``hash_tag`` puts its keys in another election's slot).  Each call opens
        a new client, with its own connection pool: one per elector, so one
        election's stalled connection never blocks another's renewals."""
        return RedisLock(self.redis_client(), name=name or self.name, identity=identity,
                         key_prefix=self.key_prefix, wait_replicas=self.wait_replicas,
                         wait_timeout=self.wait_timeout, hash_tag=hash_tag)

    def beat_lock(self, identity: str) -> RedisLock:
        """The standalone beats' election lock: its own lease and terms, in the
        schedule's hash slot (so the schedule scripts can read both elections)."""
        return self.lock(identity, name=beat_election_name(self, True), hash_tag=self.name)

    def elector(self, lock: RedisLock, callbacks: LeaderCallbacks,
                watchdog: Watchdog | None = None) -> LeaderElector:
        """A LeaderElector on ``lock`` with these settings' timings."""
        return LeaderElector(LeaderElectionConfig(
            lock=lock, callbacks=callbacks, lease_duration=self.lease_duration,
            renew_deadline=self.renew_deadline, retry_period=self.retry_period,
            release_on_cancel=self.release_on_cancel, name=lock.name, watchdog=watchdog))

    def redis_client(self) -> Any:
        """A new redis-py client (and connection pool) for ``leader_redis_url``."""
        return redis_client_from_url(self.redis_url, self.redis_options,
                                     self.retry_period, self.transport_options,
                                     wait_timeout=self.wait_timeout if self.wait_replicas else 0.0)


# Every leader_* setting, one per LeaderSettings field (transport_options is
# read from Celery's own broker_transport_options).
KNOWN_SETTINGS = frozenset(f"leader_{f.name}" for f in fields(LeaderSettings)
                           if f.name != "transport_options")
_warned_unknown: set[str] = set()
_warned_lock = threading.Lock()


def unknown_settings(app: Any) -> list[str]:
    """One message per ``leader_*`` / ``CELERY_LEADER_*`` name in the app's config
    that celery-leader does not read (a typo would silently run on the default)."""
    return [f"{key!r} is not a celery-leader setting and is ignored; {hint}"
            for key, hint in _unknown_settings(app)]


def _unknown_settings(app: Any) -> list[tuple[str, str]]:
    """(name, hint) of each unknown ``leader_*`` / ``CELERY_LEADER_*`` name."""
    suffixes = {name.removeprefix("leader_") for name in KNOWN_SETTINGS}
    messages = []
    for key in sorted(str(k) for k in app.conf):
        if key.startswith("leader_"):
            prefix, suffix = "leader_", key.removeprefix("leader_")
        elif key.startswith("CELERY_LEADER_"):
            prefix, suffix = "CELERY_LEADER_", key.removeprefix("CELERY_LEADER_").lower()
        else:
            continue
        spell = str.upper if prefix.isupper() else str
        if suffix in suffixes and key == prefix + spell(suffix):
            continue
        match = closest(suffix, suffixes)
        hint = (f"did you mean {prefix + spell(match)!r}?" if match else "valid names: "
                + ", ".join(prefix + spell(name) for name in sorted(suffixes)))
        messages.append((key, hint))
    return messages


def warn_unknown_settings(app: Any) -> None:
    """Log each unknown ``leader_*`` name once per process (read_settings runs
    at every start-up path: worker, beat, command line, API)."""
    for message in unknown_settings(app):
        with _warned_lock:
            if message in _warned_unknown:
                continue
            _warned_unknown.add(message)
        log.warning("celery-leader: %s", message)


def read_settings(app: Any) -> LeaderSettings:
    """Validate every ``leader_*`` setting; raise ConfigurationError naming the
    first bad one and its value, before anything is started."""

    def get(name: str, default: Any, check: Callable[[str, Any], Any]) -> Any:
        value = setting(app, name, default)
        return check(name, value) if value is not default or default is None else value

    strict = get("leader_strict_settings", False, _bool)
    if strict and (unknown := _unknown_settings(app)):
        key, hint = unknown[0]
        raise ConfigurationError(f"{key!r} is not a celery-leader setting ({hint}); "
                                 "leader_strict_settings makes this an error")
    warn_unknown_settings(app)
    url = setting(app, "leader_redis_url", None)
    if url is None:
        broker = setting(app, "broker_url", None) or ""
        broker = broker[0] if isinstance(broker, (list, tuple)) and broker else broker
        if isinstance(broker, str) and broker.split("://", 1)[0] in REDIS_SCHEMES:
            url = broker
        else:
            raise ConfigurationError(
                f"leader_redis_url is not set and broker_url ({redact(broker)!r}) is not a "
                "Redis URL; "
                "set leader_redis_url to redis://, rediss://, unix:// or sentinel://"
            )
    _check_url("leader_redis_url", url)

    lease, renew, retry = validate_timings(
        get("leader_lease_duration", 15.0, _seconds),
        get("leader_renew_deadline", 10.0, _seconds),
        get("leader_retry_period", 2.0, _seconds),
        names=("leader_lease_duration", "leader_renew_deadline", "leader_retry_period"),
    )
    settings = LeaderSettings(
        redis_url=url,
        redis_options=get("leader_redis_options", {}, _mapping),
        name=get("leader_name", getattr(app, "main", None) or "celery", _name),
        key_prefix=get("leader_key_prefix", "celery-leader", _name),
        lease_duration=lease,
        renew_deadline=renew,
        retry_period=retry,
        release_on_cancel=get("leader_release_on_cancel", True, _bool),
        identity=get("leader_identity", None, _optional_name),
        beat=get("leader_beat", True, _bool),
        queue=leader_queue(app),
        healthz_port=get("leader_healthz_port", None, _optional_port),
        healthz_host=get("leader_healthz_host", "127.0.0.1", _name),
        catch_up=get("leader_catch_up", "latest", _catch_up),
        misfire_grace=get("leader_misfire_grace", None, _optional_seconds),
        wait_replicas=get("leader_wait_replicas", 0, _count),
        wait_timeout=get("leader_wait_timeout", 0.5, _positive_seconds),
        tick_run_once=get("leader_tick_run_once", True, _bool),
        healthz_token=get("leader_healthz_token", None, _optional_token),
        metrics_per_entry=get("leader_metrics_per_entry", False, _bool),
        metrics_per_task=get("leader_metrics_per_task", False, _bool),
        django_celery_beat=get("leader_django_celery_beat", False, _django_celery_beat),
        strict_settings=strict,
        transport_options=dict(setting(app, "broker_transport_options", None) or {}),
    )
    check_wait_timeouts(settings)
    return settings


def check_wait_timeouts(settings: LeaderSettings) -> None:
    """The WAIT timeout against the lock client's socket timeout and the renew
    deadline, naming the settings (the derived socket timeout always fits)."""
    explicit = settings.redis_options.get("socket_timeout", _UNSET)
    if explicit is _UNSET:
        socket_timeout: float | None = default_socket_timeout(
            settings.retry_period, settings.wait_timeout if settings.wait_replicas else 0.0)
    elif isinstance(explicit, (int, float)) and not isinstance(explicit, bool):
        socket_timeout = float(explicit)
    else:
        # None: redis-py waits as long as it takes.  Anything else is no number
        # of seconds, and redis-py names it when it connects.
        socket_timeout = None
    validate_wait(settings.wait_replicas, settings.wait_timeout, socket_timeout,
                  settings.renew_deadline,
                  names=("leader_wait_timeout", "leader_redis_options['socket_timeout']",
                         "leader_renew_deadline"))


def leader_queue(app: Any) -> str:
    """``leader_queue``, validated: the one reading of the queue's name, for the
    settings and for the router (which runs in clients that never elect)."""
    value = setting(app, "leader_queue", "celery_leader")
    return _name("leader_queue", value)


def beat_lock(settings: LeaderSettings, identity: str) -> RedisLock:
    """``settings.beat_lock(identity)``."""
    return settings.beat_lock(identity)


@contextlib.contextmanager
def exit_on_configuration_error() -> Iterator[None]:
    """Turn a ConfigurationError into one stderr line and exit status 2 (Celery
    stops the worker on SystemExit, also from a bootstep's start; beat too)."""
    try:
        yield
    except ConfigurationError as exc:
        stream = sys.stderr
        if isinstance(stream, LoggingProxy):  # once the worker runs: not a log record
            stream = sys.__stderr__ or stream
        print(f"celery-leader: configuration error: {redact_text(str(exc))}", file=stream,
              flush=True)
        raise SystemExit(2) from None


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}") from None
    return to_seconds(name, value)


def _optional_seconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    seconds = _seconds(name, value)
    if seconds <= 0:
        raise ConfigurationError(f"{name} must be greater than zero or None, got {value!r}")
    return seconds


def _positive_seconds(name: str, value: Any) -> float:
    seconds = _seconds(name, value)
    if seconds <= 0:
        raise ConfigurationError(f"{name} must be greater than zero, got {value!r}")
    return seconds


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be a whole number >= 0, got {value!r}")
    return value


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                    "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigurationError(f"{name} must be a boolean, got {value!r}")


def _name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{name} must be a non-empty string, got {value!r}")
    if "{" in value or "}" in value:
        raise ConfigurationError(f"{name} must not contain braces, got {value!r}")
    return value


def _optional_name(name: str, value: Any) -> str | None:
    return None if value is None else _name(name, value)


def _optional_token(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        # Not echoed: it is a secret.
        raise ConfigurationError(f"{name} must be a non-empty string without surrounding "
                                 "spaces, or None")
    return value


def _optional_port(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigurationError(f"{name} must be a TCP port (0-65535) or None, got {value!r}")
    return value


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{name} must be a dict of redis client options, "
                                 f"got {redact(value)!r}")
    return dict(value)


def _catch_up(name: str, value: Any) -> str:
    if value not in CATCH_UP_POLICIES:
        raise ConfigurationError(f"{name} must be one of {', '.join(CATCH_UP_POLICIES)}, "
                                 f"got {value!r}")
    return str(value)


def _django_celery_beat(name: str, value: Any) -> bool:
    enabled = _bool(name, value)
    if enabled and importlib.util.find_spec("django_celery_beat") is None:
        raise ConfigurationError(f"{name} is True but django-celery-beat is not installed; "
                                 "pip install django-celery-beat (or reinstall celery-leader "
                                 "with its django extra: pip install "
                                 "'/path/to/celery-leader[django]' from a checkout)")
    return enabled


def _check_url(name: str, url: Any) -> None:
    """The URL's scheme and port, checked now; it is shown with its
    passwords masked, like everywhere else (election/redact.py)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"{name} must be a URL string, got {redact(url)!r}")
    for part in url.split(";"):
        scheme = part.split("://", 1)[0] if "://" in part else ""
        if scheme not in REDIS_SCHEMES:
            raise ConfigurationError(
                f"{name} has an unknown scheme in {redact_url(url)!r}; use one of "
                + ", ".join(f"{s}://" for s in REDIS_SCHEMES)
            )
        try:  # a password with an unescaped / ? or # ends the host early: no port
            urlparse(part).port  # noqa: B018
        except ValueError:
            raise ConfigurationError(
                f"{name} has no valid host and port in {redact_url(url)!r}; percent-encode "
                "any ':', '/', '?', '#' or '@' in the user name or password") from None
