"""The elector's state machine on a fake clock and an in-memory lock.

Most tests call ``try_acquire_or_renew()`` directly (no threads), so every
timing boundary is exact.  ``_Leadership`` is installed by hand where a test
needs "this replica leads" without the work/guard threads ``_lead()`` starts;
the few threaded tests at the end run the real loop on the fake clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from celery_leader import (
    ClaimResult,
    FakeClock,
    HealthCheckError,
    LeaderCallbacks,
    LeaderElectionConfig,
    LeaderElectionRecord,
    LeaderElector,
)
from celery_leader import elector as elector_module
from celery_leader.config import JITTER_FACTOR
from celery_leader.elector import BACKOFF_JITTER, MAX_BACKOFF_FACTOR
from tests.fakes import (
    FakeLock,
    FakeStore,
    forget_leadership,
    lead_without_threads,
    observe,
    wait_until,
)

# Binary-exact durations, so boundaries compare exactly on the fake clock.
LEASE = 1.0
RENEW = 0.75
RETRY = 0.25
T0 = 1000.0
EPS = 2.0**-20


class Recorder:
    """Callbacks that log what happened, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.new_leaders: list[str] = []
        self.started = threading.Event()
        self.stopped = threading.Event()

    def on_started_leading(self, stop: threading.Event) -> None:
        self.events.append("started")
        self.started.set()

    def on_stopped_leading(self) -> None:
        self.events.append("stopped")
        self.stopped.set()

    def on_new_leader(self, identity: str) -> None:
        self.new_leaders.append(identity)

    def callbacks(self) -> LeaderCallbacks:
        return LeaderCallbacks(self.on_started_leading, self.on_stopped_leading,
                               self.on_new_leader)


def make(store: FakeStore, identity: str, clock: FakeClock, lease: float = LEASE,
         recorder: Recorder | None = None) -> tuple[LeaderElector, FakeLock, Recorder]:
    recorder = recorder or Recorder()
    lock = store.lock(identity)
    config = LeaderElectionConfig(lock=lock, callbacks=recorder.callbacks(),
                                  lease_duration=lease, renew_deadline=RENEW,
                                  retry_period=RETRY, name="unit")
    return LeaderElector(config, clock=clock), lock, recorder


class CountingClock(FakeClock):
    """A fake clock that counts how often it is read."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        return self.now


@pytest.fixture
def clock() -> CountingClock:
    return CountingClock(T0)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


# ---------------------------------------------------------------- acquisition


def test_acquires_when_no_record_exists(store: FakeStore, clock: FakeClock) -> None:
    a, lock, rec = make(store, "a", clock)
    assert a.try_acquire_or_renew()
    record = store.record()
    assert record is not None
    assert record.holder_identity == "a"
    assert record.lease_duration == LEASE
    assert record.term > 0
    assert lock.calls == ["get", "create"]
    assert a.get_leader() == "a"
    assert rec.new_leaders == ["a"]


def test_follower_waits_for_observed_time_plus_the_records_lease(
        store: FakeStore, clock: FakeClock) -> None:
    # The holder's record says 2 s; the follower's own config says 1 s.  The
    # record's duration is what counts (the official Python port gets this wrong).
    a, _, _ = make(store, "a", clock, lease=2.0)
    b, _, _ = make(store, "b", clock, lease=LEASE)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # observes a's bytes at T0

    for offset in (0.5, 1.0, 1.5, 2.0 - EPS):
        clock.now = T0 + offset
        assert not b.try_acquire_or_renew(), offset
        assert store.record() is not None and store.record().holder_identity == "a"

    clock.now = T0 + 2.0
    assert b.try_acquire_or_renew()
    assert store.record() is not None and store.record().holder_identity == "b"


def test_follower_timer_starts_when_it_first_sees_the_bytes(
        store: FakeStore, clock: FakeClock) -> None:
    a, _, _ = make(store, "a", clock)
    b, _, _ = make(store, "b", clock)
    assert a.try_acquire_or_renew()
    # b looks for the first time long after a's lease would have run out by
    # the record's timestamps: it must still wait a full lease from now.
    clock.now = T0 + 10.0
    assert not b.try_acquire_or_renew()
    clock.now = T0 + 10.0 + LEASE - EPS
    assert not b.try_acquire_or_renew()
    clock.now = T0 + 10.0 + LEASE
    assert b.try_acquire_or_renew()


def test_changed_bytes_restart_the_followers_timer(store: FakeStore, clock: FakeClock) -> None:
    a, _, _ = make(store, "a", clock)
    b, _, _ = make(store, "b", clock)
    term = lead_without_threads(a)
    assert not b.try_acquire_or_renew()  # sees the lease at T0

    clock.now = T0 + 0.5
    assert a.try_acquire_or_renew()  # a renews: same term, new bytes
    record = store.record()
    assert record is not None and record.term == term

    clock.now = T0 + 0.75
    assert not b.try_acquire_or_renew()  # sees the new bytes at T0 + 0.75
    clock.now = T0 + LEASE  # the first observation would have expired now
    assert not b.try_acquire_or_renew()
    clock.now = T0 + 0.75 + LEASE - EPS
    assert not b.try_acquire_or_renew()
    clock.now = T0 + 0.75 + LEASE
    assert b.try_acquire_or_renew()


@pytest.mark.parametrize("server_time", [0.0, 1_700_000_000.0, 4_000_000_000.0])
def test_record_timestamps_never_decide_expiry(server_time: float, clock: FakeClock) -> None:
    # The lock server's clock can be decades off (or the record forged with
    # any times): only the follower's monotonic clock decides.
    store = FakeStore(server_time=server_time)
    a, _, _ = make(store, "a", clock)
    b, _, _ = make(store, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.now = T0 + LEASE - EPS
    assert not b.try_acquire_or_renew()
    clock.now = T0 + LEASE
    assert b.try_acquire_or_renew()


def test_empty_holder_is_taken_at_once(store: FakeStore, clock: FakeClock) -> None:
    store.put_raw(LeaderElectionRecord(holder_identity="", lease_duration=60.0, term=3)
                  .to_json().encode())
    b, _, rec = make(store, "b", clock)
    assert b.try_acquire_or_renew()
    assert store.record() is not None and store.record().holder_identity == "b"
    assert rec.new_leaders == ["b"]  # an empty holder is not a leader


def test_own_record_is_renewed_at_once_after_losing_track_of_it(
        store: FakeStore, clock: FakeClock) -> None:
    # The same elector (same lock object) that forgot its leadership finds its
    # own record: it may take it at once, as a new leadership (new term).
    a, _, _ = make(store, "a", clock)
    assert a.try_acquire_or_renew()
    old = store.record()
    forget_leadership(a)
    assert a.try_acquire_or_renew()
    new = store.record()
    assert old is not None and new is not None
    assert new.term > old.term


def test_an_earlier_run_with_the_same_identity_is_waited_out(
        store: FakeStore, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    # A restarted replica (a new lock object) finds the record of its earlier
    # run under its own identity.  It cannot tell that run from a live second
    # replica with the same name, so it waits the lease out like any follower.
    a, _, _ = make(store, "a", clock)
    assert a.try_acquire_or_renew()
    old = store.record()
    restarted, _, rec = make(store, "a", clock)
    assert not restarted.try_acquire_or_renew()
    clock.now = T0 + LEASE - EPS
    assert not restarted.try_acquire_or_renew()
    clock.now = T0 + LEASE
    assert restarted.try_acquire_or_renew()
    new = store.record()
    assert old is not None and new is not None and new.term > old.term
    assert new.holder_identity == "a" and new.holder_instance != old.holder_instance
    # The earlier run never renewed while watched: nothing to warn about.
    assert "in use by another running elector" not in caplog.text
    assert rec.new_leaders == ["a", "a"]  # the old holder, then itself


def test_a_second_elector_with_the_same_identity_follows_and_warns(
        store: FakeStore, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    a, a_lock, _ = make(store, "same", clock)
    b, b_lock, rec = make(store, "same", clock)
    lead_without_threads(a)
    assert not b.try_acquire_or_renew()  # first sight: could be an earlier run
    assert "in use by another running elector" not in caplog.text
    for step in range(1, 9):  # a renews every retry period; b never takes over
        clock.now = T0 + step * RETRY
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
    warnings = [r for r in caplog.records if "in use by another running elector" in r.message]
    assert len(warnings) == 1, caplog.text  # once, not once per retry
    assert "'same'" in warnings[0].getMessage() and a_lock.instance() in warnings[0].getMessage()
    assert a.is_leader() and not b.is_leader()
    assert b.get_leader() == "same" and rec.new_leaders == ["same"]
    # b cannot fence with a's term either: the term belongs to a's instance.
    assert b_lock.claim("k", a.term) is ClaimResult.FENCED
    assert a_lock.claim("k", a.term) is ClaimResult.CLAIMED


# ---------------------------------------------------------------- malformed records


def test_malformed_record_is_replaced_only_after_standing_for_a_lease(
        store: FakeStore, clock: FakeClock) -> None:
    store.put_raw(b"{not json")
    b, _, _ = make(store, "b", clock)
    assert not b.try_acquire_or_renew()
    assert store.raw == b"{not json"

    clock.now = T0 + LEASE - EPS
    assert not b.try_acquire_or_renew()
    clock.now = T0 + LEASE
    assert b.try_acquire_or_renew()
    record = store.record()
    assert record is not None and record.holder_identity == "b"


def test_changing_malformed_bytes_restart_the_timer(store: FakeStore, clock: FakeClock) -> None:
    store.put_raw(b"garbage-1")
    b, _, _ = make(store, "b", clock)
    assert not b.try_acquire_or_renew()
    clock.now = T0 + 0.5
    store.put_raw(b"garbage-2")  # someone keeps writing: not abandoned
    assert not b.try_acquire_or_renew()
    clock.now = T0 + LEASE
    assert not b.try_acquire_or_renew()
    clock.now = T0 + 0.5 + LEASE - EPS
    assert not b.try_acquire_or_renew()
    clock.now = T0 + 0.5 + LEASE
    assert b.try_acquire_or_renew()


@pytest.mark.parametrize("raw", [
    b'{"holderIdentity":"x","leaseDurationMs":Infinity,"term":1}',
    b'{"holderIdentity":"x","leaseDurationMs":1' + b"0" * 400 + b',"term":1}',
    b"[" * 50_000,
])
def test_pathological_records_are_treated_as_malformed(raw: bytes, store: FakeStore,
                                                       clock: FakeClock) -> None:
    # These used to escape from_json as OverflowError/RecursionError, which
    # made every attempt fail and left the election without a leader forever.
    store.put_raw(raw)
    b, _, _ = make(store, "b", clock)
    assert not b.try_acquire_or_renew()
    clock.now = T0 + LEASE
    assert b.try_acquire_or_renew()


# ---------------------------------------------------------------- on_new_leader


def test_on_new_leader_fires_whenever_the_observed_holder_changes(
        store: FakeStore, clock: FakeClock) -> None:
    a, _, rec_a = make(store, "a", clock)
    b, _, rec_b = make(store, "b", clock)
    c, _, rec_c = make(store, "c", clock)

    store.put_raw(b"garbage")  # no holder to report yet
    assert not b.try_acquire_or_renew()
    assert rec_b.new_leaders == []
    store.expire()
    assert b.try_acquire_or_renew()
    assert rec_b.new_leaders == ["b"]

    assert not a.try_acquire_or_renew()
    assert not c.try_acquire_or_renew()
    assert rec_a.new_leaders == ["b"] and rec_c.new_leaders == ["b"]

    # b renews (new bytes, same holder): nobody is told again.
    clock.now = T0 + 0.5
    assert b.try_acquire_or_renew()
    assert not a.try_acquire_or_renew()
    assert rec_a.new_leaders == ["b"] and rec_b.new_leaders == ["b"]

    # b stops renewing; a takes over after a lease from its last observation.
    clock.now = T0 + 0.5 + LEASE
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    assert not c.try_acquire_or_renew()
    assert rec_a.new_leaders == ["b", "a"]
    assert rec_b.new_leaders == ["b", "a"]
    assert rec_c.new_leaders == ["b", "a"]
    assert b.get_leader() == c.get_leader() == "a"


def test_on_new_leader_exception_does_not_break_the_attempt(
        store: FakeStore, clock: FakeClock) -> None:
    rec = Recorder()

    def explode(identity: str) -> None:
        raise RuntimeError("callback bug")

    rec.on_new_leader = explode  # type: ignore[method-assign]
    a, _, _ = make(store, "a", clock, recorder=rec)
    assert a.try_acquire_or_renew()


# ---------------------------------------------------------------- leading


def test_renew_keeps_the_term_and_is_one_round_trip(store: FakeStore, clock: FakeClock) -> None:
    a, lock, _ = make(store, "a", clock)
    term = lead_without_threads(a)
    assert a.term == term
    announced: list[tuple[int, float]] = []
    a.add_lease_listener(lambda t, until: announced.append((t, until)))
    versions = []
    for step in range(1, 4):
        lock.calls.clear()
        clock.now = T0 + step * RETRY
        assert a.try_acquire_or_renew()
        assert lock.calls == ["update"]
        record = store.record()
        assert record is not None
        assert record.term == term
        versions.append(record.version)
        assert a.valid_until() == clock.now + RENEW
    assert versions == sorted(set(versions))
    assert announced == [(term, T0 + step * RETRY + RENEW) for step in range(1, 4)]


def test_is_leader_ends_exactly_at_renew_start_plus_renew_deadline(
        store: FakeStore, clock: FakeClock) -> None:
    a, lock, _ = make(store, "a", clock)
    assert not a.is_leader()
    lead_without_threads(a)
    assert a.is_leader()

    # A successful renew at T0 + 0.5 moves the deadline to T0 + 0.5 + RENEW.
    clock.now = T0 + 0.5
    assert a.try_acquire_or_renew()
    # Failed renews (lock unreachable) do not move it.
    lock.fail_with = ConnectionError("down")
    clock.now = T0 + 0.75
    assert not a.try_acquire_or_renew()
    clock.now = T0 + 0.5 + RENEW - EPS
    assert a.is_leader()
    assert a.term > 0
    clock.now = T0 + 0.5 + RENEW
    assert not a.is_leader()
    assert a.term == 0


def test_renew_deadline_counts_from_the_start_of_the_request(
        store: FakeStore, clock: FakeClock) -> None:
    a, lock, _ = make(store, "a", clock)
    lead_without_threads(a)

    def slow(operation: str) -> None:
        clock.advance(0.5)  # the request takes 0.5 s

    clock.now = T0 + 0.25
    lock.before_call = slow
    assert a.try_acquire_or_renew()
    lock.before_call = None
    assert clock.now == T0 + 0.75
    clock.now = T0 + 0.25 + RENEW - EPS
    assert a.is_leader()
    clock.now = T0 + 0.25 + RENEW  # not T0 + 0.75 + RENEW
    assert not a.is_leader()


def test_renewing_leader_detects_that_its_lease_was_taken(
        store: FakeStore, clock: FakeClock) -> None:
    a, lock, rec_a = make(store, "a", clock)
    b, _, _ = make(store, "b", clock)
    lead_without_threads(a)
    assert not b.try_acquire_or_renew()
    clock.now = T0 + LEASE
    assert b.try_acquire_or_renew()

    lock.calls.clear()
    assert not a.try_acquire_or_renew()
    assert lock.calls == ["update"]  # CAS on its own bytes, which are gone
    assert rec_a.new_leaders == ["a", "b"]
    assert store.record() is not None and store.record().holder_identity == "b"


def test_terms_strictly_increase_across_holder_changes(store: FakeStore, clock: FakeClock) -> None:
    a, lock_a, _ = make(store, "a", clock)
    b, lock_b, _ = make(store, "b", clock)
    terms: list[int] = []

    terms.append(lead_without_threads(a))
    clock.now += RETRY
    assert a.try_acquire_or_renew()  # renew: same term
    assert store.record() is not None and store.record().term == terms[-1]

    store.expire()  # lease key expired: b creates
    terms.append(lead_without_threads(b))
    assert not a.try_acquire_or_renew()  # a's renew fails (conflict)

    forget_leadership(a)  # a's renew loop would now end that leadership
    clock.now += LEASE  # b goes silent: a takes over a lease after it saw b's bytes
    terms.append(lead_without_threads(a))

    forget_leadership(b)
    assert lock_a.release(terms[-1])  # released: b creates a fresh record
    forget_leadership(a)
    terms.append(lead_without_threads(b))
    assert lock_b.release(terms[-1])
    forget_leadership(b)
    terms.append(lead_without_threads(b))  # same holder again: still a new leadership

    assert terms == sorted(terms) and len(set(terms)) == len(terms), terms


def test_stale_terms_are_fenced(store: FakeStore, clock: FakeClock) -> None:
    a, lock_a, _ = make(store, "a", clock)
    b, lock_b, _ = make(store, "b", clock)
    old = lead_without_threads(a)
    assert lock_a.claim("tick-1", old) is ClaimResult.CLAIMED
    assert lock_a.claim("tick-1", old) is ClaimResult.ALREADY_CLAIMED
    assert not b.try_acquire_or_renew()
    clock.now += LEASE
    new = lead_without_threads(b)
    assert new > old
    assert lock_a.claim("tick-2", old) is ClaimResult.FENCED
    assert lock_b.claim("tick-2", old) is ClaimResult.FENCED  # right term, wrong holder
    assert lock_b.claim("tick-2", new) is ClaimResult.CLAIMED
    assert not lock_a.release(old)
    assert store.record() is not None and store.record().holder_identity == "b"


# ---------------------------------------------------------------- check()


def test_check_follower_is_healthy(store: FakeStore, clock: FakeClock) -> None:
    a, _, _ = make(store, "a", clock)
    b, _, _ = make(store, "b", clock)
    lead_without_threads(a)
    assert not b.try_acquire_or_renew()
    clock.now += 100 * LEASE
    b.check()
    b.check(0.0)


def test_check_fails_when_leader_has_not_renewed_for_lease_plus_tolerance(
        store: FakeStore, clock: FakeClock) -> None:
    a, _, _ = make(store, "a", clock)
    lead_without_threads(a)
    a.check()
    clock.now = T0 + LEASE  # not *more* than a lease yet
    a.check()
    clock.now = T0 + LEASE + EPS
    with pytest.raises(HealthCheckError, match="failed election to renew leadership"):
        a.check()

    # The tolerance extends the limit.
    a.check(0.5)
    clock.now = T0 + LEASE + 0.5 + EPS
    with pytest.raises(HealthCheckError):
        a.check(0.5)

    # A renew makes it healthy again.
    assert a.try_acquire_or_renew()
    a.check()


def test_check_is_healthy_after_leadership_ended(store: FakeStore, clock: FakeClock) -> None:
    a, _, _ = make(store, "a", clock)
    lead_without_threads(a)
    assert a._leadership is not None
    a._leadership.ended.set()
    clock.now += 10 * LEASE
    a.check()


def test_check_rejects_a_bad_tolerance(store: FakeStore, clock: FakeClock) -> None:
    a, _, _ = make(store, "a", clock)
    with pytest.raises(ValueError, match="max_tolerable_expired_lease"):
        a.check("1")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the real loop on a fake clock


# ---------------------------------------------------------------- an unreachable lock


def _fix_random(monkeypatch: pytest.MonkeyPatch, value: float) -> None:
    monkeypatch.setattr(elector_module.random, "random", lambda: value)


def _follow_with_a_known_expiry(store: FakeStore, clock: FakeClock
                                ) -> tuple[LeaderElector, LeaderElector, FakeLock]:
    """a leads; b has read a's lease and the server's TTL for it (so b knows
    when it really expires: T0 + LEASE)."""
    a, _, _ = make(store, "a", clock)
    b, b_lock, _ = make(store, "b", clock)
    store.ttl = LEASE
    lead_without_threads(a)
    assert not b.try_acquire_or_renew()
    return a, b, b_lock


@pytest.mark.parametrize("draw", [0.0, 1.0 - EPS])
def test_an_unreachable_lock_is_retried_within_the_warned_bound_past_the_lease_expiry(
        store: FakeStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, draw: float) -> None:
    # The lease b last saw expires at T0 + LEASE; Redis stays down well past that.
    # Every wait, at both ends of the jitter, lies in (one retry period, the
    # bound the warning names]: never the few milliseconds to an expiry that
    # has long passed (a storm of connection attempts on a recovering Redis).
    _, b, b_lock = _follow_with_a_known_expiry(store, clock)
    _fix_random(monkeypatch, draw)
    b_lock.fail_with = ConnectionError("redis down")
    bound = RETRY * MAX_BACKOFF_FACTOR
    delays = []
    while clock.now < T0 + 10 * LEASE:
        assert not b.try_acquire_or_renew()
        delay = b._follower_delay()
        assert RETRY < delay <= bound, (clock.now - T0, delay)
        delays.append(delay)
        clock.advance(delay)
    # Doubling from two retry periods to the bound, jittered below the ceiling.
    ceilings = [2 * RETRY] + [bound] * (len(delays) - 1)
    assert delays == [c * (1 - draw * BACKOFF_JITTER) for c in ceilings]
    assert f"retrying every {bound:.1f}s at most" in caplog.text
    # At most one attempt per retry period over ten leases of outage.
    assert b_lock.calls.count("get") <= 1 + 10 * LEASE / RETRY


def test_a_follower_stops_backing_off_once_it_reads_the_lock_again(
        store: FakeStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    a, b, b_lock = _follow_with_a_known_expiry(store, clock)
    _fix_random(monkeypatch, 0.0)
    b_lock.fail_with = ConnectionError("redis down")
    for _ in range(5):
        assert not b.try_acquire_or_renew()
        clock.advance(b._follower_delay())
    assert b._follower_delay() == RETRY * MAX_BACKOFF_FACTOR
    # Redis is back and a still leads: b's read succeeds though b does not win.
    assert a.try_acquire_or_renew()
    b_lock.fail_with = None
    assert not b.try_acquire_or_renew()
    assert "reachable again after 5 failed attempts" in caplog.text
    # Back to the plain jittered retry period, shortened to the fresh expiry.
    assert b._follower_delay() == RETRY
    store.ttl = RETRY / 2
    assert not b.try_acquire_or_renew()
    assert b._follower_delay() == RETRY / 2 + 0.002


class OffsetClock:
    """The real monotonic clock plus an offset a test can jump."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def test_a_running_follower_does_not_storm_an_unreachable_lock(store: FakeStore) -> None:
    clock = OffsetClock()
    a, _, _ = make(store, "a", clock)  # type: ignore[arg-type]
    b, b_lock, _ = make(store, "b", clock)  # type: ignore[arg-type]
    store.ttl = LEASE
    lead_without_threads(a)
    with running(b):
        wait_until(lambda: "get" in b_lock.calls, 5.0, message="b read a's lease")
        b_lock.fail_with = ConnectionError("redis down")
        clock.offset += 2 * LEASE  # the expiry b read is long past, at once
        calls, since = len(b_lock.calls), time.monotonic()

        def at_most_one_attempt_per_retry_period() -> None:
            attempts = len(b_lock.calls) - calls
            assert attempts <= 1 + (time.monotonic() - since) / RETRY, \
                f"{attempts} attempts in {time.monotonic() - since:.2f}s"

        observe(2 * RETRY * MAX_BACKOFF_FACTOR, at_most_one_attempt_per_retry_period)
        # Once the lock answers, b contends within the bound the warning names.
        assert a.try_acquire_or_renew()
        b_lock.fail_with = None
        calls = len(b_lock.calls)
        took = wait_until(lambda: len(b_lock.calls) > calls, 5.0, message="b reads again")
        assert took <= RETRY * MAX_BACKOFF_FACTOR + 0.1
        wait_until(lambda: b._failures == 0, 5.0, message="b saw the lock answer")


@contextmanager
def running(elector: LeaderElector) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=elector.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        elector.stop()
        thread.join(5.0)
        assert not thread.is_alive(), "elector thread did not stop"


def test_guard_ends_leadership_exactly_at_renew_deadline(store: FakeStore,
                                                         clock: FakeClock) -> None:
    a, lock, rec = make(store, "a", clock)
    announced: list[tuple[int, float]] = []
    a.add_lease_listener(lambda term, until: announced.append((term, until)))
    assert a.valid_until() == 0.0
    with running(a):
        wait_until(a.is_leader, 5.0, message="a leads")
        wait_until(rec.started.is_set, 5.0, message="on_started_leading ran")
        term = a.term
        assert a.valid_until() == T0 + RENEW
        assert announced == [(term, T0 + RENEW)]
        lock.fail_with = ConnectionError("redis down")  # every renew fails from now on
        clock.now = T0 + RENEW - EPS
        assert a.is_leader()
        assert not rec.stopped.is_set()
        clock.now = T0 + RENEW
        assert not a.is_leader()
        wait_until(rec.stopped.is_set, 5.0, message="on_stopped_leading ran")
        assert a.last_stop_reason == "renew deadline exceeded"
        assert a.valid_until() == 0.0
    assert rec.events == ["started", "stopped"]
    # Failed renews announced nothing; the end is announced once.
    assert announced == [(term, T0 + RENEW), (0, 0.0)]


def test_loop_stall_fails_check(store: FakeStore, clock: FakeClock) -> None:
    a, lock, _ = make(store, "b", clock)
    other, _, _ = make(store, "a", clock)
    assert other.try_acquire_or_renew()  # someone else leads: b only follows
    entered = threading.Event()
    release = threading.Event()

    def wedge(operation: str) -> None:
        entered.set()
        assert release.wait(10.0)

    lock.before_call = wedge
    try:
        with running(a):
            wait_until(entered.is_set, 5.0, message="loop reached the lock")
            a.check()
            # loop bound = max(lease, (1 + 1.2) * retry * max back-off + renew deadline)
            bound = max(LEASE, (1 + JITTER_FACTOR) * RETRY * MAX_BACKOFF_FACTOR + RENEW)
            clock.now = T0 + bound + 1.0 - 1e-9  # float sums at 1000 s are not exact
            a.check(1.0)
            clock.now = T0 + bound + 1.0 + 0.01
            with pytest.raises(HealthCheckError, match="stalled"):
                a.check(1.0)
            release.set()
    finally:
        release.set()


def test_step_down_waits_a_retry_period_before_contending_again(
        store: FakeStore, clock: CountingClock) -> None:
    a, lock, rec = make(store, "a", clock)
    b, _, _ = make(store, "b", clock)
    with running(a):
        wait_until(a.is_leader, 5.0, message="a leads")
        wait_until(rec.started.is_set, 5.0)
        a.step_down()
        wait_until(lambda: store.released == 1, 5.0, message="a released")
        assert rec.events[:2] == ["started", "stopped"]
        # The fake clock stands still, so a must not contend again yet: the
        # lease stays free for a follower.  a polls its clock while it waits
        # (every 0.1 s); a few polls without a lock call prove it is parked.
        reads = clock.reads
        wait_until(lambda: clock.reads >= reads + 5, 5.0, message="a waits on its clock")
        after_release = lock.calls[lock.calls.index("release") + 1:]
        assert after_release == [], f"a contended again at once: {after_release}"
        assert store.raw is None
        calls = len(lock.calls)
        assert b.try_acquire_or_renew()
        # Once a retry period has passed on its clock, a contends again (and follows b).
        clock.advance(RETRY)
        wait_until(lambda: len(lock.calls) > calls, 5.0, message="a contends again")
        assert not a.is_leader()
    assert rec.events == ["started", "stopped"]


def test_stop_without_release_on_cancel_keeps_the_lease(store: FakeStore,
                                                        clock: FakeClock) -> None:
    a, lock, rec = make(store, "a", clock)
    with running(a) as stop:
        wait_until(a.is_leader, 5.0)
        wait_until(rec.started.is_set, 5.0)
        stop.set()
        wait_until(rec.stopped.is_set, 5.0)
    assert not a.is_leader()
    assert "release" not in lock.calls
    assert store.record() is not None and store.record().holder_identity == "a"
    assert rec.events == ["started", "stopped"]


def test_failing_work_steps_down_and_lets_a_follower_take_over(
        store: FakeStore, clock: CountingClock) -> None:
    rec = Recorder()
    attempts: list[int] = []

    def failing(stop: threading.Event) -> None:
        rec.events.append("started")
        attempts.append(1)
        raise RuntimeError("beat crashed")

    rec.on_started_leading = failing  # type: ignore[method-assign]
    a, lock, _ = make(store, "a", clock, recorder=rec)
    b, _, _ = make(store, "b", clock)
    with running(a):
        wait_until(lambda: store.released >= 1, 5.0, message="a released after the failure")
        assert rec.events[:2] == ["started", "stopped"]
        reads = clock.reads
        wait_until(lambda: clock.reads >= reads + 5, 5.0, message="a waits on its clock")
        after_release = lock.calls[lock.calls.index("release") + 1:]
        assert after_release == [], f"a retook the lease at once: {after_release}"
        assert b.try_acquire_or_renew()
        # a keeps contending: once b's lease lapses on a's clock, a leads again.
        calls = len(lock.calls)
        clock.advance(RETRY)
        wait_until(lambda: len(lock.calls) > calls, 5.0, message="a contends again")
        clock.advance(LEASE)
        wait_until(lambda: len(attempts) == 2, 5.0, message="a leads again")
    assert rec.events[:4] == ["started", "stopped", "started", "stopped"]


def test_refused_credentials_fail_check_after_the_bound_but_an_outage_never_does(
        store: FakeStore, clock: FakeClock) -> None:
    """Pure logic of the bound (the real Redis case: tests/test_redis_credentials.py):
    lease + tolerance of nothing but refused credentials; any other error, or a
    success, starts the count again."""
    a, lock, _ = make(store, "a", clock)
    refused = redis.exceptions.AuthenticationError("invalid username-password pair")
    lock.fail_with = refused
    assert not a.try_acquire_or_renew()
    assert a.stats.credentials_refused
    clock.now = T0 + LEASE + 0.5  # within lease + tolerance
    a.check(0.5)
    clock.now = T0 + LEASE + 0.5 + EPS
    with pytest.raises(HealthCheckError, match="refused the credentials"):
        a.check(0.5)
    # Redis goes down meanwhile: an outage is waited out, whatever came before.
    lock.fail_with = ConnectionError("down")
    assert not a.try_acquire_or_renew()
    assert not a.stats.credentials_refused
    clock.now += 10 * LEASE
    a.check(0.5)
    # Refused again, then accepted: healthy at once.
    lock.fail_with = refused
    assert not a.try_acquire_or_renew()
    clock.now += LEASE + 1.0
    with pytest.raises(HealthCheckError):
        a.check(0.5)
    lock.fail_with = None
    assert a.try_acquire_or_renew()
    a.check(0.5)
    assert not a.stats.credentials_refused
