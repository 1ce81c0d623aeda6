"""The leader elector: a port of client-go ``tools/leaderelection``, made safe.

Differences from client-go, each enforced where marked ``INVARIANT``:

- A leader stops acting at ``renew_deadline`` after the start of its last
  successful renew request, measured on its own monotonic clock, by a guard
  thread that does not depend on the renew loop (which may be stuck in I/O).
- Every leadership has a fencing ``term`` from the lock; work can be fenced
  with ``lock.claim(key, term)``.
- Release happens only after ``on_started_leading`` returned (bounded by
  ``renew_deadline``) and is conditional on holder and term.
- ``run()`` contends again after losing leadership; lock errors never end it.
- The holder is the identity *and* the lock's instance id: two electors given
  the same identity are two holders, so exactly one leads (client-go lets both
  take the lease in turn, each believing it leads).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from . import metrics
from .clock import Clock, SystemClock
from .config import JITTER_FACTOR, LeaderElectionConfig, to_seconds
from .record import LeaderElectionRecord
from .redact import secret_safe_logger
from .redislock import credentials_refused
from .resourcelock import LockConflictError, Observation

# Logger names are part of the interface (users configure them): the old module's.
log = secret_safe_logger("celery_leader.elector")

# How often waits re-check the caller's stop event (it cannot wake us itself).
STOP_POLL_INTERVAL = 0.1
# A follower facing an unreachable lock retries at most this many retry periods
# apart, so it still contends within a few seconds of the lock coming back.
MAX_BACKOFF_FACTOR = 4
# While backing off, each wait is drawn from (1 - BACKOFF_JITTER, 1] x the
# current ceiling: below the bound the warning names, and spread so that
# electors cut off at the same moment do not come back in step.
BACKOFF_JITTER = 0.5


class HealthCheckError(Exception):
    """The elector is wedged or holds a lease it has not renewed in time."""


@dataclass
class _Leadership:
    term: int
    stop: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    work_done: threading.Event = field(default_factory=threading.Event)
    work_failed: bool = False


class LeaderElector:
    def __init__(self, config: LeaderElectionConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.lock = config.lock
        self._clock: Clock = clock or SystemClock()
        self._lease, self._renew_deadline, self._retry = config.timings()
        self._name = config.name or self.lock.describe()
        self._identity = self.lock.identity()
        self._instance = self.lock.instance()

        self._state = threading.RLock()
        self._wake = threading.Event()
        self._step_down = threading.Event()
        # What this replica last saw in the lock, and when (local monotonic).
        self._observed: Observation = Observation(raw=None, record=None)
        self._observed_time = self._clock.monotonic()
        self._observed_ttl_deadline: float | None = None
        # The last holder (identity, instance) reported to on_new_leader.
        self._reported_holder = ("", "")
        self._duplicate_warned: str | None = None  # instance named in the last warning
        self._malformed_logged: bytes | None = None
        # This replica's own lease, valid only while ``_leadership`` is set.
        self._leadership: _Leadership | None = None
        self._own_raw: bytes | None = None
        self._renewed_at = 0.0  # start of the last successful acquire/renew request
        self._last_loop = self._clock.monotonic()
        self._running = False
        self._stop: threading.Event | None = None
        self._last_conflict = False  # the last attempt found someone else's bytes
        self._failures = 0  # consecutive failed lock calls (back-off, log throttling)
        self._last_failure = ""
        # Since when (monotonic) every lock call has failed with Redis refusing
        # this replica's credentials; None after a success or any other error.
        self._refused_since: float | None = None
        self.last_stop_reason = ""
        self._lease_listeners: list[Callable[[int, float], None]] = []
        self.stats = metrics.ElectionStats()  # counters only; read at scrape time
        if config.watchdog is not None:
            config.watchdog.set_leader_election(self)

    # ------------------------------------------------------------------ queries

    def is_leader(self) -> bool:
        """True only while this replica may act: it holds an unexpired leadership."""
        with self._state:
            leadership = self._leadership
            return (
                leadership is not None
                and not leadership.ended.is_set()
                and self._clock.monotonic() < self._renewed_at + self._renew_deadline
            )

    @property
    def term(self) -> int:
        """The fencing term of the current leadership; 0 when not leading."""
        with self._state:
            return self._leadership.term if self.is_leader() and self._leadership else 0

    def get_leader(self) -> str:
        """The identity of the last observed holder ('' when none)."""
        return self._reported_holder[0]

    def observed_record(self) -> LeaderElectionRecord | None:
        return self._observed.record

    def observed_term(self) -> int:
        """The term in the lease as last seen (0 before any)."""
        record = self._observed.record
        return record.term if record else 0

    def lease_remaining(self) -> float:
        """Seconds until the lease last seen expires unless renewed, on this
        replica's monotonic clock from when it saw it change (0 when none)."""
        with self._state:
            record, seen_at = self._observed.record, self._observed_time
        if record is None or not record.holder_identity:
            return 0.0
        return max(0.0, seen_at + record.lease_duration - self._clock.monotonic())

    def valid_until(self) -> float:
        """Monotonic instant at which this replica stops acting (0.0 when not leading).

        CLOCK_MONOTONIC is system-wide, so other processes on this host may
        compare it with their own ``time.monotonic()``.
        """
        with self._state:
            leadership = self._leadership
            if leadership is None or leadership.ended.is_set():
                return 0.0
            return self._renewed_at + self._renew_deadline

    def add_lease_listener(self, listener: Callable[[int, float], None]) -> None:
        """Call ``listener(term, valid_until)`` on every acquire and renew, and
        ``listener(0, 0.0)`` when leadership ends; for sharing leadership with
        other processes.  Runs on elector threads: keep it fast."""
        self._lease_listeners.append(listener)

    def _notify_lease(self, term: int, valid_until: float) -> None:
        for listener in self._lease_listeners:
            _call_safely("lease listener", listener, term, valid_until)

    def check(self, max_tolerable_expired_lease: float = 0.0) -> None:
        """client-go ``Check``: raise when a leader has not renewed for a lease +
        tolerance, or when the election loop itself has stopped making progress."""
        tolerance = to_seconds("max_tolerable_expired_lease", max_tolerable_expired_lease)
        now = self._clock.monotonic()
        with self._state:
            leadership = self._leadership
            leading = leadership is not None and not leadership.ended.is_set()
            if leading and now - self._renewed_at > self._lease + tolerance:
                raise HealthCheckError(
                        f"failed election to renew leadership on lease {self._name}"
                    )
            # A follower wakes at least every jittered retry period; a leader
            # renews every retry period but may wait out a renew deadline.
            loop_bound = max(self._lease, (1 + JITTER_FACTOR) * self._retry * MAX_BACKOFF_FACTOR
                             + self._renew_deadline)
            if self._running and now - self._last_loop > loop_bound + tolerance:
                raise HealthCheckError(
                    f"election loop for {self._name} stalled for {now - self._last_loop:.1f}s"
                )
            # Refused credentials (a rotated password, a revoked ACL grant) are not
            # an outage to wait out: a restart with the new secret fixes them.
            refused_since = self._refused_since
            if refused_since is not None and now - refused_since > self._lease + tolerance:
                raise HealthCheckError(
                    f"Redis has refused the credentials of lock {self._name} for "
                    f"{now - refused_since:.1f}s ({self._last_failure})"
                )

    # ------------------------------------------------------------------ control

    def step_down(self) -> None:
        """Hand leadership over now: release the lease, then wait one retry
        period before contending again so a follower gets it."""
        if self.is_leader():
            self._step_down.set()
            self._wake.set()

    def stop(self) -> None:
        """Set the event ``run()`` was given and wake it at once (setting the
        event directly is noticed within STOP_POLL_INTERVAL)."""
        if self._stop is not None:
            self._stop.set()
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Contend and lead until ``stop`` is set.  Losing leadership never ends this."""
        self._stop = stop
        self._running = True
        unsubscribe = self.lock.subscribe(self._wake.set)
        try:
            while not stop.is_set():
                self._last_loop = self._clock.monotonic()
                if self._acquire(stop):
                    self._lead(stop)
        finally:
            self._running = False
            unsubscribe()

    # ------------------------------------------------------------------ core

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the lease afterwards.

        At most one round trip while leading (CAS on the bytes it last wrote)
        and at most two while following (read, then CAS).
        """
        started = self._clock.monotonic()
        self._last_conflict = False
        with self._state:
            leadership = self._leadership
            renewing = leadership is not None and not leadership.ended.is_set()
            desired = LeaderElectionRecord(
                holder_identity=self._identity,
                holder_instance=self._instance,
                lease_duration=self._lease,
                term=leadership.term if (renewing and leadership) else 0,
            )
            own_raw = self._own_raw if renewing else None
        try:
            if own_raw is not None:
                written = self.lock.update(desired, own_raw)
                self.stats.renew_seconds.observe(self._clock.monotonic() - started)
            else:
                current = self.lock.get()
                # INVARIANT: another holder's record is timed from when its
                # reply arrived, never earlier, so a slow read cannot make a
                # lease look older than it is.
                seen_at = self._clock.monotonic()
                self._observe(current, seen_at)
                if current.raw is None:
                    written = self.lock.create(desired)
                elif self._may_take(current, seen_at):
                    written = self.lock.update(desired, current.raw)
                else:
                    # A follower that only reads has reached the lock too: it
                    # stops backing off without having to win the lease.
                    self._lock_recovered()
                    return False
        except LockConflictError as conflict:
            self._last_conflict = True
            self._lock_recovered()  # a reply, if not the one hoped for
            if own_raw is not None:
                self.stats.renew_failures += 1
            self._observe(conflict.observation, self._clock.monotonic())
            return False
        except Exception as exc:  # Redis down, timeouts, script errors
            if own_raw is not None:
                self.stats.renew_failures += 1
            self._lock_failed(exc)
            return False
        self._lock_recovered()
        self._observe(written, started)
        with self._state:
            self._own_raw = written.raw
            self._renewed_at = started  # INVARIANT: the request's start, not its end
            # Under the state lock, so a renew can never be announced after the
            # end of its leadership.
            if renewing and leadership is not None and not leadership.ended.is_set():
                self._notify_lease(leadership.term, started + self._renew_deadline)
        return True

    def _lock_failed(self, exc: Exception) -> None:
        # One clear line when the lock starts failing or the error changes, not
        # one per retry period: an unreachable Redis is a state, not an event.
        self._failures += 1
        self.stats.lock_error(exc)
        message = f"{type(exc).__name__}: {exc}"
        refused = credentials_refused(exc)
        with self._state:
            if not refused:  # an outage is waited out, never a reason to restart
                self._refused_since = None
            elif self._refused_since is None:
                self._refused_since = self._clock.monotonic()
            self.stats.credentials_refused = refused
        if message != self._last_failure:
            self._last_failure = message
            if refused:
                log.error("leader election %s: Redis refuses the credentials of lock %s "
                          "(%s): fix the password or the ACL user's grants (the health "
                          "check fails while this lasts)", self._name, self.lock.describe(),
                          message)
                return
            log.warning("leader election %s: lock %s failed (%s); retrying every %.1fs at most",
                        self._name, self.lock.describe(), message,
                        self._retry * MAX_BACKOFF_FACTOR)

    def _lock_recovered(self) -> None:
        with self._state:
            self._refused_since = None
            self.stats.credentials_refused = False
        if self._failures:
            log.warning("leader election %s: lock %s reachable again after %d failed attempts",
                        self._name, self.lock.describe(), self._failures)
        self._failures = 0
        self._last_failure = ""

    def _may_take(self, current: Observation, now: float) -> bool:
        record = current.record
        if record is None:
            # Malformed: replace it only once it has stood unchanged for a lease.
            return self._observed_time + self._lease <= now
        # Our own record (this instance) is renewed at once.  One with our
        # identity but another instance is another running elector (or an
        # earlier run of this replica): INVARIANT: it is waited out like any
        # other holder, so two replicas given one identity never both lead.
        if not record.holder_identity or record.held_by(self._identity, self._instance):
            return True
        # INVARIANT: expiry judged on our monotonic clock from when we saw it change.
        return self._observed_time + record.lease_duration <= now

    def _observe(self, observation: Observation, now: float) -> None:
        with self._state:
            previous = self._observed
            if observation.raw != previous.raw:
                self._observed = observation
                self._observed_time = now
                self._warn_if_identity_is_shared(previous, observation)
            if observation.ttl is not None:
                self._observed_ttl_deadline = now + observation.ttl
            else:
                self._observed_ttl_deadline = None
            malformed = observation.raw is not None and observation.record is None
            if malformed and self._malformed_logged != observation.raw:
                self._malformed_logged = observation.raw
                log.error("leader election %s: malformed lease record in %s (%s); it will "
                          "be replaced once it has stood for one lease", self._name,
                          self.lock.describe(), observation.error)
            record = observation.record
            holder = (record.holder_identity, record.holder_instance) if record else ("", "")
            if not holder[0] or holder == self._reported_holder:
                return
            self._reported_holder = holder
            self.stats.new_holder(holder[0], record.term if record else 0)
        callback = self.config.callbacks.on_new_leader
        if callback is not None:
            _call_safely("on_new_leader", callback, holder[0])  # the identity, as configured

    def _warn_if_identity_is_shared(self, previous: Observation, current: Observation) -> None:
        """Warn once per other instance seen *renewing* a lease under our identity.

        A record of ours from an earlier run of this replica merely waits to
        expire; one that changes while we watch has a live writer: a second
        replica was given this identity.
        """
        record, earlier = current.record, previous.record
        if (record is None or earlier is None
                or record.holder_identity != self._identity
                or record.holder_instance == self._instance
                or not earlier.held_by(record.holder_identity, record.holder_instance)
                or record.holder_instance == self._duplicate_warned):
            return
        self._duplicate_warned = record.holder_instance
        log.warning("leader election %s: identity %r is in use by another running elector "
                    "(instance %s; this one is %s): every replica needs its own identity "
                    "(e.g. POD_NAME unset?). This one follows until that one stops.",
                    self._name, self._identity, record.holder_instance or "-", self._instance)

    # ------------------------------------------------------------------ follower

    def _acquire(self, stop: threading.Event) -> bool:
        if self._step_down.is_set():  # just handed over: let a follower take it
            self._step_down.clear()
            # Not cut short by wake-ups: step_down() and our own release's
            # pub/sub message both set _wake, and would let us retake at once.
            self._wait(stop, self._retry, wakeable=False)
        while not stop.is_set():
            self._last_loop = self._clock.monotonic()
            self._wake.clear()  # a wake-up during the attempt triggers another at once
            if self.try_acquire_or_renew():
                return True
            self._wait(stop, self._follower_delay())
        return False

    def _follower_delay(self) -> float:
        """Jittered retry period, shortened to the moment the lease's server-side
        TTL says it really expires, so a crash fails over in about one lease.

        While the lock fails, a back-off instead: an unreachable Redis greeted by
        every replica every few milliseconds recovers slower, and the expiry read
        before the outage says nothing about when the lock answers again.
        """
        if self._failures:
            # INVARIANT: while the lock fails, waits lie between one retry period
            # and the MAX_BACKOFF_FACTOR retry periods the warning names (doubling
            # per failure), and no earlier-read lease expiry shortens them.
            ceiling = self._retry * min(2.0 ** min(self._failures, 16), MAX_BACKOFF_FACTOR)
            return ceiling * (1 - random.random() * BACKOFF_JITTER)
        delay = self._retry * (1 + random.random() * JITTER_FACTOR)
        with self._state:
            ttl_deadline = self._observed_ttl_deadline
        if ttl_deadline is not None:
            delay = min(delay, max(0.0, ttl_deadline - self._clock.monotonic()) + 0.002)
        return delay

    def _wait(self, stop: threading.Event, timeout: float, wakeable: bool = True) -> None:
        deadline = self._clock.monotonic() + timeout
        while not stop.is_set():
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return
            if not wakeable:
                stop.wait(min(remaining, STOP_POLL_INTERVAL))
            elif self._wake.wait(min(remaining, STOP_POLL_INTERVAL)):
                return

    # ------------------------------------------------------------------ leader

    def _lead(self, stop: threading.Event) -> None:
        with self._state:
            record = self._observed.record
            leadership = _Leadership(term=record.term if record else 0)
            self._leadership = leadership
            self._notify_lease(leadership.term, self._renewed_at + self._renew_deadline)
        log.info("leader election %s: %s became leader (term %d)", self._name, self._identity,
                 leadership.term)
        self.lock.record_event(f"{self._identity} became leader (term {leadership.term})")
        metrics.provider.set_leader(self._name, True)
        self.stats.started(self._identity, leadership.term)
        threading.Thread(target=self._guard, args=(leadership,),
                         name=f"celery-leader-guard-{self._name}", daemon=True).start()
        threading.Thread(target=self._work, args=(leadership,),
                         name=f"celery-leader-work-{self._name}", daemon=True).start()
        try:
            self._renew_loop(stop, leadership)
        finally:
            self._end(leadership, "stopped")

    def _work(self, leadership: _Leadership) -> None:
        try:
            self.config.callbacks.on_started_leading(leadership.stop)
        except Exception:
            # A failing leader must not keep the lease: step down and let another try.
            log.exception("leader election %s: on_started_leading raised; stepping down",
                          self._name)
            leadership.work_failed = True
            self._wake.set()
        finally:
            leadership.work_done.set()

    def _guard(self, leadership: _Leadership) -> None:
        # INVARIANT: stop acting at renew_deadline after the last successful
        # renew request started, whatever the renew loop is blocked on.
        while True:
            with self._state:
                remaining = self._renewed_at + self._renew_deadline - self._clock.monotonic()
            if remaining <= 0:
                self._end(leadership, "renew deadline exceeded")
                return
            if leadership.ended.wait(remaining):
                return

    def _renew_loop(self, stop: threading.Event, leadership: _Leadership) -> None:
        def must_hand_over() -> bool:
            return stop.is_set() or self._step_down.is_set() or leadership.work_failed

        while not leadership.ended.is_set():
            # Renew every retry period; other wake-ups (pub/sub) only matter if
            # they ask this leader to hand over.
            next_renew = self._clock.monotonic() + self._retry
            while not (must_hand_over() or leadership.ended.is_set()):
                remaining = next_renew - self._clock.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                self._wait(stop, remaining)
            if leadership.ended.is_set():
                return
            if must_hand_over():
                self._hand_over(leadership)
                return
            self._last_loop = self._clock.monotonic()
            if not self.try_acquire_or_renew() and self._last_conflict:
                # The bytes we wrote are gone: another holder, or the lease expired.
                self._end(leadership, "lease lost")
                return

    def _hand_over(self, leadership: _Leadership) -> None:
        requested = self._step_down.is_set() and not leadership.work_failed
        voluntary = self._step_down.is_set() or leadership.work_failed
        if leadership.work_failed:
            self._step_down.set()  # like step_down(): pause before contending again
        leadership.stop.set()
        if not (voluntary or self.config.release_on_cancel):
            return  # let the lease expire; _end() below stops acting now
        # INVARIANT: release only after on_started_leading returned (bounded by
        # renew_deadline), renewing meanwhile so nobody else leads in between.
        give_up_at = self._clock.monotonic() + self._renew_deadline
        while not leadership.work_done.is_set() and not leadership.ended.is_set():
            remaining = give_up_at - self._clock.monotonic()
            if remaining <= 0:
                log.warning("leader election %s: on_started_leading still running after "
                            "renew_deadline; releasing anyway", self._name)
                break
            if leadership.work_done.wait(min(remaining, self._retry)):
                break
            self.try_acquire_or_renew()
        if leadership.ended.is_set():
            return
        why = ("step-down requested" if requested else
               "on_started_leading failed" if leadership.work_failed else "stopping")
        self._end(leadership, "released", why)
        try:
            if self.lock.release(leadership.term):
                self.lock.record_event(f"{self._identity} released the lease "
                                       f"(term {leadership.term})")
        except Exception as exc:
            log.warning("leader election %s: release failed (%r); the lease will expire",
                        self._name, exc)

    def _end(self, leadership: _Leadership, reason: str, why: str = "") -> None:
        """End ``leadership``; ``why`` (the log line's only) says what asked for it."""
        # INVARIANT: exactly once per leadership, and is_leader() is false first.
        with self._state:
            if leadership.ended.is_set():
                return
            leadership.ended.set()
            self._own_raw = None
            self._notify_lease(0, 0.0)
        leadership.stop.set()
        log.info("leader election %s: %s stopped leading (term %d): %s%s", self._name,
                 self._identity, leadership.term, reason, f" ({why})" if why else "")
        metrics.provider.set_leader(self._name, False)
        self.stats.stopped(self._identity, leadership.term, reason)
        self.last_stop_reason = reason
        _call_safely("on_stopped_leading", self.config.callbacks.on_stopped_leading)


def _call_safely(name: str, callback: Callable[..., object], *args: object) -> None:
    try:
        callback(*args)
    except Exception:
        log.exception("leader election callback %s raised", name)
