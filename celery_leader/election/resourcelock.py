"""The resource-lock interface (client-go ``resourcelock.Interface``).

The compare-and-swap in :meth:`ResourceLock.update` is the only mutual
exclusion in the whole design; everything else in the elector is bookkeeping.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from .record import LeaderElectionRecord


@dataclass(frozen=True)
class Observation:
    """One consistent read of the lock.

    ``raw`` is None when no record exists.  ``record`` is None when ``raw`` is
    absent or malformed.  ``ttl`` is the remaining server-side lifetime of the
    lease in seconds when the backend knows it: a hint for when to look again,
    never a safety input.
    """

    raw: bytes | None
    record: LeaderElectionRecord | None
    ttl: float | None = None
    error: str | None = None  # why ``raw`` could not be decoded


class LockConflictError(Exception):
    """The stored record was not the expected one; carries what is there now."""

    def __init__(self, observation: Observation) -> None:
        super().__init__("lease record changed since it was read")
        self.observation = observation


class ClaimResult(enum.Enum):
    CLAIMED = "claimed"
    ALREADY_CLAIMED = "already_claimed"
    # The caller's term is no longer the current one: it must not act.
    FENCED = "fenced"


class ResourceLock(ABC):
    @abstractmethod
    def get(self) -> Observation:
        """Read the current record."""

    @abstractmethod
    def create(self, record: LeaderElectionRecord) -> Observation:
        """Write ``record`` only if none exists; raise LockConflictError otherwise."""

    @abstractmethod
    def update(self, record: LeaderElectionRecord, expected_raw: bytes) -> Observation:
        """Replace the record only if its stored bytes are still ``expected_raw``.

        A ``record.term`` of 0, or one that differs from the stored holder's,
        takes a new, higher term; the same holder and term renew it.
        """

    @abstractmethod
    def release(self, term: int) -> bool:
        """Give up the lease only if this holder (identity and instance) still holds ``term``."""

    @abstractmethod
    def claim(
        self, key: str, term: int, value: str = "1", ttl: float | None = None
    ) -> ClaimResult:
        """Record ``key`` once, and only while this holder holds ``term``."""

    def record_event(self, message: str) -> None:
        """Publish a leadership event where this lock's watchers look (client-go
        posts a Kubernetes Event).  The elector logs every transition itself, so
        the default publishes nothing: a lock that logged here would log it twice."""
        return None

    @abstractmethod
    def identity(self) -> str:
        """The configured name of this replica, as records and callbacks show it."""

    def instance(self) -> str:
        """A random id of this lock object, written beside the identity.

        Tells apart two running electors given the same identity (a copied pod
        name): each is its own holder, so exactly one leads.  One lock object
        per elector; processes forked from it share it, and act under its lease.
        The default '' cannot tell them apart: such a lock must not be given
        the same identity twice.
        """
        return ""

    def server_warnings(self) -> list[str]:
        """Settings of the backend that weaken the guarantees, for one warning at
        start-up; the default knows of none."""
        return []

    @abstractmethod
    def describe(self) -> str:
        """A human-readable name of the lock, for logs and errors."""

    def subscribe(self, on_change: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_change`` soon after the lease is released or changes hands.

        Only a hint that shortens hand-over; polling stays the source of truth.
        Returns a function that unsubscribes.  The default is polling only.
        """
        return lambda: None
