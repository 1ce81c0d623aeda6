"""Configuration of one election, validated as client-go does, plus one rule more.

client-go lets a follower take over while the old leader still believes it
leads.  Here the leader stops acting at ``renew_deadline`` after the *start* of
its last successful renew request, and no follower can judge the lease expired
before ``lease_duration`` after it saw that renew, so ``lease_duration >
renew_deadline`` is enough for every valid combination.
"""

from __future__ import annotations

import math
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from .resourcelock import ResourceLock

JITTER_FACTOR = 1.2
# By how much the lock client's socket timeout must exceed the longest WAIT:
# Redis answers that too few replicas acknowledged only at the WAIT's timeout,
# and that answer still has to cross the network and a busy client.
WAIT_MARGIN = 0.5
# WAIT counts in whole milliseconds, and WAIT 0 blocks until a replica answers.
MIN_WAIT_TIMEOUT = 0.001

Seconds = float | int | timedelta


class ConfigurationError(ValueError):
    """A setting is invalid; the message names it and its value."""


class HealthCheck(Protocol):
    """What a watchdog sees of the elector it watches."""

    def check(self, max_tolerable_expired_lease: float = 0.0) -> None:
        """Raise when the election is unhealthy."""


class Watchdog(Protocol):
    """A health check told which elector to watch once it exists (client-go's
    ``HealthzAdaptor``; :class:`celery_leader.election.healthz.HealthzAdaptor`)."""

    def set_leader_election(self, elector: HealthCheck) -> None: ...


@dataclass
class LeaderCallbacks:
    # Runs in its own thread for the whole leadership; ``stop`` is set when it ends.
    on_started_leading: Callable[[threading.Event], None]
    # Called exactly once per leadership, as soon as this replica stops acting.
    on_stopped_leading: Callable[[], None]
    # Called whenever the observed holder changes (this replica included).
    on_new_leader: Callable[[str], None] | None = None


@dataclass
class LeaderElectionConfig:
    lock: ResourceLock
    callbacks: LeaderCallbacks
    lease_duration: Seconds = 15.0
    renew_deadline: Seconds = 10.0
    retry_period: Seconds = 2.0
    release_on_cancel: bool = False
    name: str = ""
    watchdog: Watchdog | None = None

    def __post_init__(self) -> None:
        self.lease_duration = to_seconds("lease_duration", self.lease_duration)
        self.renew_deadline = to_seconds("renew_deadline", self.renew_deadline)
        self.retry_period = to_seconds("retry_period", self.retry_period)
        self.validate()

    def timings(self) -> tuple[float, float, float]:
        """(lease_duration, renew_deadline, retry_period) in seconds, validated."""
        return validate_timings(self.lease_duration, self.renew_deadline, self.retry_period)

    def validate(self) -> None:
        self.timings()
        callbacks = self.callbacks
        if callbacks is None or not callable(getattr(callbacks, "on_started_leading", None)):
            raise ConfigurationError("callbacks.on_started_leading must be a callable")
        if not callable(getattr(callbacks, "on_stopped_leading", None)):
            raise ConfigurationError("callbacks.on_stopped_leading must be a callable")
        if callbacks.on_new_leader is not None and not callable(callbacks.on_new_leader):
            raise ConfigurationError("callbacks.on_new_leader must be a callable or None")
        if self.lock is None:
            raise ConfigurationError("lock must not be None")
        if not self.lock.identity():
            raise ConfigurationError("lock identity must not be empty")


def validate_timings(
    lease_duration: object,
    renew_deadline: object,
    retry_period: object,
    names: tuple[str, str, str] = ("lease_duration", "renew_deadline", "retry_period"),
) -> tuple[float, float, float]:
    """client-go's rules, with errors naming ``names`` (Celery passes its setting names)."""
    lease_name, renew_name, retry_name = names
    lease = to_seconds(lease_name, lease_duration)
    renew = to_seconds(renew_name, renew_deadline)
    retry = to_seconds(retry_name, retry_period)
    for name, value in ((lease_name, lease), (renew_name, renew), (retry_name, retry)):
        if value <= 0:
            raise ConfigurationError(f"{name} must be greater than zero, got {value!r}")
    if lease <= renew:
        raise ConfigurationError(
            f"{lease_name} ({lease!r}) must be greater than {renew_name} ({renew!r})"
        )
    if renew <= JITTER_FACTOR * retry:
        raise ConfigurationError(
            f"{renew_name} ({renew!r}) must be greater than "
            f"{JITTER_FACTOR} x {retry_name} ({retry!r})"
        )
    return lease, renew, retry


def validate_wait(
    wait_replicas: int,
    wait_timeout: float,
    socket_timeout: float | None,
    renew_deadline: float,
    names: tuple[str, str, str] = ("wait_timeout", "socket_timeout", "renew_deadline"),
) -> None:
    """Refuse a WAIT that could outlast what waits for it (no-op without replicas to wait for).

    ``socket_timeout`` is the lock client's, None when it has none.  A socket that
    gives up first turns every "no replica" answer into a client timeout and a
    retried command; a WAIT as long as the renew deadline leaves a new leader no
    time to lead.
    """
    if wait_replicas <= 0:
        return
    wait_name, socket_name, renew_name = names
    if wait_timeout < MIN_WAIT_TIMEOUT:
        raise ConfigurationError(
            f"{wait_name} must be at least {MIN_WAIT_TIMEOUT}s (Redis counts WAIT in "
            f"milliseconds and WAIT 0 blocks forever), got {wait_timeout!r}")
    if socket_timeout is not None and socket_timeout < wait_timeout + WAIT_MARGIN:
        raise ConfigurationError(
            f"{socket_name} ({socket_timeout!r}) must exceed {wait_name} ({wait_timeout!r}) "
            f"by at least {WAIT_MARGIN}s: the client would time out before Redis answers "
            f"that no replica acknowledged; raise {socket_name} or lower {wait_name}")
    if wait_timeout >= renew_deadline:
        raise ConfigurationError(
            f"{wait_name} ({wait_timeout!r}) must be below {renew_name} "
            f"({renew_deadline!r}): a leadership is timed from before its WAIT")


def to_seconds(name: str, value: object) -> float:
    """Accept seconds as int/float or a timedelta; reject anything else by name."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(
            f"{name} must be a number of seconds or a timedelta, got {value!r}"
        )
    if not math.isfinite(seconds):
        raise ConfigurationError(f"{name} must be finite, got {value!r}")
    return seconds


def default_identity(hostname: str | None = None) -> str:
    """``<hostname>:<pid>``: unique per running process on a host (the default
    identity of every replica; ``hostname`` defaults to the machine's)."""
    return f"{hostname or socket.gethostname()}:{os.getpid()}"
