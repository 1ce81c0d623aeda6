"""Test doubles and helpers shared by the unit tests.

``FakeStore`` is an in-memory lock server; ``FakeLock`` is one replica's view of
it, with the semantics of :class:`celery_leader.RedisLock`:

- compare-and-swap on the exact stored bytes (``create`` needs the record absent);
- ``version`` is a fresh counter value on every write, so bytes never repeat;
- the holder is identity + instance (each FakeLock has its own instance, as
  each RedisLock object does), so two locks given one identity are two holders;
- the term is a fresh counter value when the holder changes or the caller
  passes term 0, and is kept when the caller presents the stored holder + term;
- ``release`` and ``claim`` succeed only for the stored holder and term.

There is no server-side TTL: tests expire a lease with :meth:`FakeStore.expire`,
and set ``store.ttl`` for the remaining lifetime a read reports (None: unknown).
Failures are injected per lock (``lock.fail_with = ConnectionError(...)``) or
with a hook that runs before every call (``lock.before_call``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from celery_leader.elector import LeaderElector, _Leadership
from celery_leader.record import LeaderElectionRecord, MalformedRecordError
from celery_leader.resourcelock import ClaimResult, LockConflictError, Observation, ResourceLock


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.01,
               message: str = "") -> float:
    """Poll ``predicate`` until it is truthy; return the seconds it took.

    Fails the test (AssertionError) when ``timeout`` passes first.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"condition not met within {timeout:.2f}s: {message or predicate!r}"
            )
        time.sleep(interval)


def observe(seconds: float, check: Callable[[], object], interval: float = 0.01) -> None:
    """Run ``check`` (which asserts) repeatedly for a fixed window.

    For safety properties that must hold *throughout* a period (nobody else
    leads while ...), as opposed to conditions to wait for (``wait_until``).
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check()
        time.sleep(interval)
    check()


def lead_without_threads(elector: LeaderElector) -> int:
    """Acquire, then record the leadership as ``_lead()`` would, minus the
    work/guard threads and the renew loop (so a fake clock fully controls it)."""
    assert elector.try_acquire_or_renew()
    record = elector.observed_record()
    assert record is not None and record.holder_identity == elector.lock.identity()
    elector._leadership = _Leadership(term=record.term)
    return record.term


def forget_leadership(elector: LeaderElector) -> None:
    """What ending a leadership does to the state (``_end()`` minus callbacks)."""
    elector._leadership = None
    elector._own_raw = None


class FakeStore:
    """The shared state of one election: lease bytes, counter, claims."""

    def __init__(self, server_time: float = 1_700_000_000.0) -> None:
        self.raw: bytes | None = None
        self.version = 0
        self.acquisitions = 0
        self.claims: dict[str, str] = {}
        self.server_time = server_time  # the "lock server's" wall clock, in seconds
        self.guard = threading.Lock()
        self.released = 0  # successful releases, for assertions
        self.ttl: float | None = None  # what reads report as the lease's remaining TTL

    def lock(self, identity: str) -> FakeLock:
        return FakeLock(self, identity)

    def record(self) -> LeaderElectionRecord | None:
        if self.raw is None:
            return None
        try:
            return LeaderElectionRecord.from_json(self.raw)
        except MalformedRecordError:
            return None

    def expire(self) -> None:
        """What the server-side TTL does when the lease runs out."""
        with self.guard:
            self.raw = None

    def put_raw(self, raw: bytes | None) -> None:
        """Write arbitrary bytes, as a foreign client could."""
        with self.guard:
            self.raw = raw

    def observe(self) -> Observation:
        raw = self.raw
        if raw is None:
            return Observation(raw=None, record=None)
        try:
            return Observation(raw=raw, record=LeaderElectionRecord.from_json(raw), ttl=self.ttl)
        except MalformedRecordError as exc:
            return Observation(raw=raw, record=None, ttl=self.ttl, error=str(exc))

    def holds_term(self, identity: str, instance: str, term: int) -> bool:
        record = self.record()
        return record is not None and record.held_by(identity, instance) and record.term == term


_instances = itertools.count(1)


class FakeLock(ResourceLock):
    def __init__(self, store: FakeStore, identity: str) -> None:
        self.store = store
        self._identity = identity
        self._instance = f"{next(_instances):04x}"
        self.fail_with: BaseException | None = None
        self.before_call: Callable[[str], None] | None = None
        self.calls: list[str] = []
        self.events: list[str] = []

    def _enter(self, operation: str) -> None:
        self.calls.append(operation)
        if self.before_call is not None:
            self.before_call(operation)
        if self.fail_with is not None:
            raise self.fail_with

    def get(self) -> Observation:
        self._enter("get")
        with self.store.guard:
            return self.store.observe()

    def create(self, record: LeaderElectionRecord) -> Observation:
        self._enter("create")
        return self._write(record, None)

    def update(self, record: LeaderElectionRecord, expected_raw: bytes) -> Observation:
        self._enter("update")
        if not expected_raw:
            raise ValueError("update needs the bytes last read")
        return self._write(record, expected_raw)

    def _write(self, record: LeaderElectionRecord, expected: bytes | None) -> Observation:
        store = self.store
        with store.guard:
            if store.raw != expected:
                raise LockConflictError(store.observe())
            previous = store.record()
            store.version += 1
            now = store.server_time
            instance = record.holder_instance or (
                self._instance if record.holder_identity == self._identity else "")
            keep_term = (
                record.term != 0
                and previous is not None
                and previous.held_by(record.holder_identity, instance)
                and previous.term == record.term
            )
            if keep_term and previous is not None:
                term = record.term
                acquire_time = previous.acquire_time
                transitions = previous.leader_transitions
            else:
                term = store.version
                acquire_time = now
                transitions = store.acquisitions
                store.acquisitions += 1
            written = LeaderElectionRecord(
                holder_identity=record.holder_identity,
                holder_instance=instance,
                lease_duration=record.lease_duration,
                acquire_time=acquire_time,
                renew_time=now,
                leader_transitions=transitions,
                term=term,
                version=store.version,
            )
            store.raw = written.to_json().encode()
            return store.observe()

    def release(self, term: int) -> bool:
        self._enter("release")
        with self.store.guard:
            if not self.store.holds_term(self._identity, self._instance, term):
                return False
            self.store.raw = None
            self.store.released += 1
            return True

    def claim(self, key: str, term: int, value: str = "1", ttl: float | None = None
              ) -> ClaimResult:
        self._enter("claim")
        with self.store.guard:
            if not self.store.holds_term(self._identity, self._instance, term):
                return ClaimResult.FENCED
            if key in self.store.claims:
                return ClaimResult.ALREADY_CLAIMED
            self.store.claims[key] = value
            return ClaimResult.CLAIMED

    def record_event(self, message: str) -> None:
        self.events.append(message)

    def identity(self) -> str:
        return self._identity

    def instance(self) -> str:
        return self._instance

    def describe(self) -> str:
        return f"fake:{self._identity}"
