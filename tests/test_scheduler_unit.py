"""ScheduleRunner's Redis state logic, against a real Redis, with a fake clock.

No broker and no worker: the app's ``send_task`` is replaced by a recorder
(and its broker is ``memory://``, so ticks take the publish-then-clear path),
because the claims here are about the fenced state in Redis (what is claimed,
by which term, what is sent and what is skipped), not about delivery.  The
atomic publish into a Redis broker is tested in test_atomic_publish.py.  The
loop is the real ``ScheduleRunner.run(term, stop)`` in a thread; the test moves
the injected ``now`` forward and wakes the runner, then waits (bounded) for the
outcome in Redis or in the recorder.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest
import redis
from celery import Celery

from celery_leader import cron
from celery_leader.config import ConfigurationError
from celery_leader.entries import EntryError
from celery_leader.record import LeaderElectionRecord
from celery_leader.redislock import RedisLock
from celery_leader.schedule.entries import Entry, entry_from_config
from celery_leader.scheduler import (
    TASK_ID_NAMESPACE,
    ScheduleRunner,
    ScheduleStore,
    beat_election_name,
    beat_lock,
)
from celery_leader.settings import LeaderSettings
from tests.sched_procs import wait_until

UTC = timezone.utc
# A whole second far from any DST change; the fake clock counts from here.
T0 = datetime(2031, 3, 4, 5, 6, 0, tzinfo=UTC).timestamp()
RETRY = 0.1  # the runner re-reads runtime entries (and retries sends) this often
EVERY_SECOND = {"task": "app.tick", "schedule": cron("* * * * * *"), "args": ("s",)}


def at(offset: float) -> datetime:
    return datetime.fromtimestamp(T0 + offset, UTC)


def iso(offset: float) -> str:
    return at(offset).isoformat()


class Clock:
    """The ``now`` handed to ScheduleRunner: moves only when the test says so."""

    def __init__(self, offset: float = 0.0) -> None:
        self.value = T0 + offset

    def __call__(self) -> float:
        return self.value

    def set(self, offset: float) -> None:
        self.value = T0 + offset


class Sent:
    """Replaces ``app.send_task``; records every call, or raises while ``fail`` is set."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail: Exception | None = None
        self._guard = threading.Lock()

    def __call__(self, name: str, args: Any = None, kwargs: Any = None, task_id: str = "",
                 headers: Any = None, **options: Any) -> None:
        if self.fail is not None:
            raise self.fail
        with self._guard:
            self.calls.append({"task": name, "args": list(args or ()), "kwargs": kwargs,
                               "task_id": task_id, "headers": dict(headers or {}),
                               "options": options})

    def fire_times(self, label: str = "s") -> list[str]:
        with self._guard:
            return [c["headers"]["leader_fire_time"] for c in self.calls
                    if c["args"][:1] == [label]]

    def terms(self, label: str = "s") -> list[int]:
        with self._guard:
            return [c["headers"]["leader_term"] for c in self.calls if c["args"][:1] == [label]]


def lead(client: redis.Redis, name: str, identity: str) -> tuple[RedisLock, int]:
    """Make ``identity`` the holder of election ``name`` with a fresh term (as an
    acquisition does): its lock and term."""
    lock = RedisLock(client, name=name, identity=identity)
    client.delete(lock.lease_key)
    observation = lock.create(LeaderElectionRecord(holder_identity=identity,
                                                   lease_duration=60.0))
    assert observation.record is not None
    return lock, observation.record.term


class Harness:
    """One election in the test's own Redis database: apps, locks, runners."""

    def __init__(self, redis_url: str, name: str) -> None:
        self.redis_url = redis_url
        self.name = name
        self.client = redis.Redis.from_url(redis_url)
        self.threads: list[tuple[threading.Thread, threading.Event, ScheduleRunner]] = []

    def app(self, beat_schedule: dict[str, Any] | None = None) -> Celery:
        app = Celery("sched_unit", broker="memory://", set_as_current=False)
        app.conf.update(leader_name=self.name, leader_redis_url=self.redis_url,
                        beat_schedule={"every": EVERY_SECOND} if beat_schedule is None
                        else beat_schedule)
        app.send_task = Sent()  # type: ignore[method-assign]
        return app

    def settings(self, **overrides: Any) -> LeaderSettings:
        values: dict[str, Any] = {"redis_url": self.redis_url, "name": self.name,
                                  "lease_duration": 60.0, "renew_deadline": 40.0,
                                  "retry_period": RETRY, "catch_up": "latest"}
        values.update(overrides)
        return LeaderSettings(**values)

    def lock(self, identity: str) -> RedisLock:
        return RedisLock(self.client, name=self.name, identity=identity)

    def lead(self, identity: str) -> tuple[RedisLock, int]:
        return lead(self.client, self.name, identity)

    def runner(self, app: Celery, lock: RedisLock, clock: Clock,
               still_leading: Callable[[], bool] = lambda: True,
               **settings: Any) -> ScheduleRunner:
        return ScheduleRunner(app, lock, self.settings(**settings), still_leading=still_leading,
                              now=clock)

    def start(self, runner: ScheduleRunner, term: int) -> threading.Event:
        stop = threading.Event()
        thread = threading.Thread(target=runner.run, args=(term, stop), daemon=True)
        thread.start()
        self.threads.append((thread, stop, runner))
        return stop

    def thread_of(self, runner: ScheduleRunner) -> threading.Thread:
        return next(t for t, _, r in self.threads if r is runner)

    def stop(self, runner: ScheduleRunner) -> None:
        for thread, stop, candidate in self.threads:
            if candidate is runner:
                stop.set()
                runner.wake()
                thread.join(5)
                assert not thread.is_alive(), "ScheduleRunner.run did not return after stop"

    def states(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in
                self.client.hgetall(self.lock("x").key("schedule:state")).items()}

    def pending(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in
                self.client.hgetall(self.lock("x").key("schedule:pending")).items()}

    def last(self, entry: str = "every") -> str | None:
        state = self.states().get(entry)
        return None if state is None else at(state["last"] / 1000 - T0).isoformat()

    def close(self) -> None:
        for thread, stop, runner in self.threads:
            stop.set()
            runner.wake()
            thread.join(5)
        self.client.close()


@pytest.fixture
def h(redis_url: str, election_name: str) -> Iterator[Harness]:
    harness = Harness(redis_url, election_name)
    yield harness
    harness.close()


def sent(app: Celery) -> Sent:
    recorder = app.send_task
    assert isinstance(recorder, Sent)
    return recorder


def expected_ids(name: str, entry: str, offsets: list[float]) -> list[str]:
    return [str(uuid.uuid5(TASK_ID_NAMESPACE, f"{name}:{entry}@{round((T0 + o) * 1000)}"))
            for o in offsets]


def spy_loads(runner: ScheduleRunner) -> list[datetime]:
    """Records the ``started_at`` of every (re)load of the entries."""
    loads: list[datetime] = []
    original = runner._load

    def load(started_at: datetime, previous: Any = None) -> Any:
        result = original(started_at, previous)
        loads.append(started_at)
        return result

    runner._load = load  # type: ignore[method-assign]
    return loads


def advance(clock: Clock, runner: ScheduleRunner, offset: float) -> None:
    clock.set(offset)
    runner.wake()


def first_term(h: Harness, until: float) -> int:
    """Term 1 (identity "a") leads from 0.5 s and dispatches every second up to ``until``."""
    app = h.app()
    clock = Clock(0.5)
    lock, term = h.lead("a")
    runner = h.runner(app, lock, clock)
    h.start(runner, term)
    for second in range(1, int(until) + 1):
        advance(clock, runner, second + 0.2)
        wait_until(lambda s=second: h.last() == iso(s), 5, what=f"term 1 claims {second}")
    h.stop(runner)
    assert sent(app).fire_times() == [iso(s) for s in range(1, int(until) + 1)]
    return term


# ---------------------------------------------------------------- catch-up policies


@pytest.mark.parametrize(("policy", "caught_up"), [
    ("all", [4, 5, 6, 7, 8, 9, 10]),
    ("latest", [10]),
    ("none", []),
])
def test_catch_up_policy_after_a_leadership_gap(h: Harness, policy: str,
                                                caught_up: list[int]) -> None:
    """Term 1 stops after claiming 3; term 2 starts at 10.5, so 4..10 were missed."""
    term1 = first_term(h, until=3)
    app = h.app()
    clock = Clock(10.5)
    lock, term2 = h.lead("b")
    assert term2 > term1
    runner = h.runner(app, lock, clock, catch_up=policy)
    h.start(runner, term2)
    # Whatever the policy, the missed ticks are passed over in one step: the
    # state ends at the last missed tick (as "skipped" when it was not sent).
    wait_until(lambda: h.last() == iso(10), 5, what="term 2 passes over the missed ticks")
    assert h.states()["every"]["skipped"] is (policy == "none")
    # Claimed in one step; sent right after it (the memory broker: pending copies).
    wait_until(lambda: len(sent(app).fire_times()) >= len(caught_up), 5,
               what="term 2 sends what it caught up")
    assert sent(app).fire_times() == [iso(s) for s in caught_up]
    # Ticks after the leadership started are sent under every policy, once.
    advance(clock, runner, 11.1)
    wait_until(lambda: h.last() == iso(11), 5, what="term 2 sends 11")
    advance(clock, runner, 12.1)
    wait_until(lambda: h.last() == iso(12), 5, what="term 2 sends 12")
    h.stop(runner)
    assert sent(app).fire_times() == [iso(s) for s in [*caught_up, 11, 12]]
    assert set(sent(app).terms()) == {term2}
    assert h.pending() == {}


def test_per_entry_catch_up_overrides_the_global_policy(h: Harness) -> None:
    first_term(h, until=2)
    schedule = {"every": EVERY_SECOND, "all": {**EVERY_SECOND, "args": ("all",),
                                                "catch_up": "all"}}
    app = h.app(schedule)
    clock = Clock(6.5)
    lock, term = h.lead("b")
    runner = h.runner(app, lock, clock, catch_up="none")
    h.start(runner, term)
    # "every" continues from 2 (state of term 1), "all" has no state: it starts now.
    wait_until(lambda: h.last() == iso(6), 5)
    advance(clock, runner, 7.1)
    wait_until(lambda: h.last() == iso(7) and h.last("all") == iso(7), 5)
    h.stop(runner)
    assert sent(app).fire_times("s") == [iso(7)]  # 3..6 missed, policy none
    assert sent(app).fire_times("all") == [iso(7)]


# ---------------------------------------------------------------- misfire grace


def test_misfire_grace_drops_missed_ticks_older_than_the_grace(h: Harness) -> None:
    first_term(h, until=3)
    app = h.app()
    clock = Clock(10.5)
    lock, term = h.lead("b")
    runner = h.runner(app, lock, clock, catch_up="all", misfire_grace=3.0)
    h.start(runner, term)
    wait_until(lambda: h.last() == iso(10), 5)
    h.stop(runner)
    # 4..7 are more than 3 s late at 10.5; 8, 9 and 10 are within the grace.
    assert sent(app).fire_times() == [iso(8), iso(9), iso(10)]


def test_misfire_grace_applies_to_late_current_ticks_and_per_entry(h: Harness) -> None:
    """A loop that falls behind (here: the clock jumps) sends only ticks within
    the grace; an entry's own misfire_grace overrides the global one."""
    schedule = {"every": EVERY_SECOND,
                "loose": {**EVERY_SECOND, "args": ("loose",), "misfire_grace": 10}}
    app = h.app(schedule)
    clock = Clock(0.5)
    lock, term = h.lead("a")
    runner = h.runner(app, lock, clock, catch_up="all", misfire_grace=1.0)
    h.start(runner, term)
    advance(clock, runner, 1.1)
    wait_until(lambda: h.last() == iso(1) and h.last("loose") == iso(1), 5)
    advance(clock, runner, 5.5)  # 2..5 became due at once
    wait_until(lambda: h.last() == iso(5) and h.last("loose") == iso(5), 5)
    h.stop(runner)
    assert sent(app).fire_times() == [iso(1), iso(5)]  # 2, 3, 4 are > 1 s late
    assert sent(app).fire_times("loose") == [iso(s) for s in (1, 2, 3, 4, 5)]
    assert h.states()["every"]["skipped"] is False


def test_a_tick_due_within_the_same_millisecond_is_fired_not_spun_on(h: Harness) -> None:
    """The loop pops an entry when its fire time, in whole ms, is not after now
    (in whole ms).  An interval entry anchored at a sub-ms instant can be due by
    that test while its exact fire time is still a fraction of a ms away: it must
    still be fired and queued again later, or the loop re-pops it forever (a
    busy loop that stops all dispatching and ignores the stop event)."""
    app = h.app({"every-1s": {"task": "app.tick", "schedule": 1.0, "args": ("i",)}})
    lock, term = h.lead("a")
    runner = h.runner(app, lock, Clock())
    started = at(0.0003)
    loaded = runner._load(started)
    assert loaded.queue.first() == at(1.0003)
    now = at(1.0001)
    assert round(loaded.queue.first().timestamp() * 1000) == round(now.timestamp() * 1000)
    assert runner._fire_all_due(loaded, term, now, started) is True
    assert round(loaded.queue.first().timestamp() * 1000) > round(now.timestamp() * 1000)
    # Not silently passed over (fire times travel in whole ms: 1.0003 is 1.000).
    assert sent(app).fire_times("i") == [iso(1)]
    # Fired once; asked again at the same instant, nothing more is due.
    assert runner._fire_all_due(loaded, term, now, started) is True
    assert len(sent(app).calls) == 1
    assert loaded.queue.first() == at(2.0003)
    now = at(2.0001)
    assert runner._fire_all_due(loaded, term, now, started) is True
    assert round(loaded.queue.first().timestamp() * 1000) > round(now.timestamp() * 1000)
    assert sent(app).fire_times("i") == [iso(1), iso(2)]


def test_next_term_continues_exactly_where_the_previous_one_stopped(h: Harness) -> None:
    term1 = first_term(h, until=5)
    app = h.app()
    clock = Clock(5.6)  # a prompt hand-over: nothing was missed
    lock, term2 = h.lead("b")
    runner = h.runner(app, lock, clock, catch_up="none")
    h.start(runner, term2)
    for second in (6, 7, 8):
        advance(clock, runner, second + 0.1)
        wait_until(lambda s=second: h.last() == iso(s), 5)
    h.stop(runner)
    assert sent(app).fire_times() == [iso(s) for s in (6, 7, 8)]
    assert h.states()["every"]["term"] == term2 > term1


def test_term_restarted_on_the_same_replica_does_not_resend(h: Harness) -> None:
    """run() entered twice for one term (e.g. after an error) continues from Redis."""
    app = h.app()
    clock = Clock(0.5)
    lock, term = h.lead("a")
    runner = h.runner(app, lock, clock)
    h.start(runner, term)
    advance(clock, runner, 2.2)
    wait_until(lambda: h.last() == iso(2), 5)
    h.stop(runner)
    again = h.runner(app, lock, clock)
    h.start(again, term)
    advance(clock, again, 3.2)
    wait_until(lambda: h.last() == iso(3), 5)
    h.stop(again)
    assert sent(app).fire_times() == [iso(1), iso(2), iso(3)]


def test_a_fire_time_is_claimed_once_by_concurrent_claimers(h: Harness) -> None:
    """The claim is atomic and only moves forward: of two runners racing for the
    same fire times in one term, exactly one claims (and sends) each tick."""
    apps = [h.app(), h.app()]
    clock = Clock(0.5)
    lock, term = h.lead("a")
    runners = [h.runner(app, lock, clock) for app in apps]
    loads = [spy_loads(runner) for runner in runners]
    for runner in runners:
        h.start(runner, term)
    wait_until(lambda: all(loads), 5, what="both runners loaded their slots")
    for second in (1, 2, 3, 4):
        clock.set(second + 0.2)
        for runner in runners:
            runner.wake()
        wait_until(lambda s=second: h.last() == iso(s), 5)
    for runner in runners:
        h.stop(runner)
    fire_times = sent(apps[0]).fire_times() + sent(apps[1]).fire_times()
    assert sorted(fire_times) == [iso(s) for s in (1, 2, 3, 4)]
    assert h.pending() == {}


# ---------------------------------------------------------------- fencing


@pytest.mark.parametrize("taker", ["b", "a"], ids=["other-identity", "same-identity-new-term"])
def test_fenced_claim_stops_dispatching(h: Harness, taker: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    app = h.app()
    clock = Clock(0.5)
    lock, term = h.lead("a")
    runner = h.runner(app, lock, clock)  # still_leading stays True: only Redis can tell
    h.start(runner, term)
    advance(clock, runner, 1.1)
    wait_until(lambda: h.last() == iso(1), 5)
    _, newer = h.lead(taker)  # the lease now names another holder, or another term
    assert newer > term
    with caplog.at_level(logging.INFO, logger="celery_leader.scheduler"):
        advance(clock, runner, 3.1)
        thread = h.thread_of(runner)
        wait_until(lambda: not thread.is_alive(), 5, what="run() returns once fenced")
    assert sent(app).fire_times() == [iso(1)]
    assert h.states()["every"] == {**h.states()["every"], "last": round((T0 + 1) * 1000),
                                   "term": term}
    assert h.pending() == {}
    assert f"term {term} is over" in caplog.text


def test_deposed_leader_leaves_its_claim_pending_and_the_next_term_sends_it(
        h: Harness) -> None:
    """still_leading() turns False between claim and publish: the claimed tick is
    not sent by the old term, and the next term sends it with the same task id."""
    app = h.app()
    clock = Clock(0.5)
    lock, term1 = h.lead("a")
    leading = threading.Event()
    leading.set()
    runner = h.runner(app, lock, clock, still_leading=leading.is_set)
    h.start(runner, term1)
    advance(clock, runner, 1.1)
    # Sent, not only claimed: the claim is written before the publish checks
    # still_leading(), so clearing it on the claim alone races with the publish.
    wait_until(lambda: sent(app).fire_times() == [iso(1)], 5)
    leading.clear()
    advance(clock, runner, 2.1)
    wait_until(lambda: h.last() == iso(2), 5)
    h.stop(runner)
    assert sent(app).fire_times() == [iso(1)]
    assert list(h.pending()) == [f"every@{round((T0 + 2) * 1000)}"]

    app2 = h.app()
    clock2 = Clock(2.4)
    lock2, term2 = h.lead("b")
    runner2 = h.runner(app2, lock2, clock2)
    h.start(runner2, term2)
    wait_until(lambda: sent(app2).fire_times() == [iso(2)], 5)
    advance(clock2, runner2, 3.1)
    wait_until(lambda: h.last() == iso(3), 5)
    h.stop(runner2)
    calls = sent(app2).calls
    assert [c["task_id"] for c in calls] == expected_ids(h.name, "every", [2, 3])
    assert [c["headers"]["leader_term"] for c in calls] == [term2, term2]
    assert sent(app2).fire_times() == [iso(2), iso(3)]
    assert h.pending() == {}


def test_claimed_but_unpublished_tick_of_a_crashed_term_is_republished(h: Harness) -> None:
    """Simulated crash between the fenced claim and the publish."""
    app = h.app()
    clock = Clock(0.5)
    lock, term1 = h.lead("a")
    runner = h.runner(app, lock, clock)
    runner._publish = lambda tick, message, term: None  # type: ignore[method-assign]
    h.start(runner, term1)
    advance(clock, runner, 1.1)
    wait_until(lambda: h.last() == iso(1), 5)
    h.stop(runner)
    assert sent(app).calls == []
    (tick, pending), = h.pending().items()
    assert (tick, pending["term"], pending["fire_ms"]) == (
        f"every@{round((T0 + 1) * 1000)}", term1, round((T0 + 1) * 1000))

    app2 = h.app()
    clock2 = Clock(1.3)
    lock2, term2 = h.lead("b")
    runner2 = h.runner(app2, lock2, clock2)
    h.start(runner2, term2)
    wait_until(lambda: len(sent(app2).calls) == 1, 5, what="term 2 re-publishes tick 1")
    advance(clock2, runner2, 2.1)
    wait_until(lambda: h.last() == iso(2), 5)
    h.stop(runner2)
    call = sent(app2).calls[0]
    assert call["task_id"] == pending["task_id"] == expected_ids(h.name, "every", [1])[0]
    assert {key: call["headers"][key] for key in ("leader_fire_time", "leader_term")} == {
        "leader_fire_time": iso(1), "leader_term": term2}
    assert call["headers"]["leader_tick"] == f"every@{round((T0 + 1) * 1000)}"
    assert call["task"] == "app.tick" and call["args"] == ["s"]
    assert sent(app2).fire_times() == [iso(1), iso(2)]  # 1 is not claimed twice
    assert h.pending() == {}


def test_stale_term_cannot_adopt_pending_ticks(h: Harness) -> None:
    """A runner whose term is no longer current finds an older pending tick: the
    fenced adoption fails and it dispatches nothing."""
    app = h.app()
    clock = Clock(0.5)
    lock, term1 = h.lead("a")
    runner = h.runner(app, lock, clock)
    runner._publish = lambda tick, message, term: None  # type: ignore[method-assign]
    h.start(runner, term1)
    advance(clock, runner, 1.1)
    wait_until(lambda: h.last() == iso(1), 5)
    h.stop(runner)
    lock2, term2 = h.lead("b")
    _, term3 = h.lead("c")  # term 2 is already over when its runner starts
    app2 = h.app()
    runner2 = h.runner(app2, lock2, Clock(5.5))
    h.start(runner2, term2)
    thread = h.thread_of(runner2)
    wait_until(lambda: not thread.is_alive(), 5, what="stale runner returns")
    assert sent(app2).calls == []
    assert [p["term"] for p in h.pending().values()] == [term1]
    assert term3 > term2


def test_send_failure_is_retried_with_the_same_task_id(h: Harness) -> None:
    app = h.app()
    clock = Clock(0.5)
    lock, term = h.lead("a")
    runner = h.runner(app, lock, clock)
    sent(app).fail = ConnectionError("broker down")
    h.start(runner, term)
    advance(clock, runner, 1.1)
    wait_until(lambda: h.last() == iso(1) and h.pending(), 5)
    sent(app).fail = None
    wait_until(lambda: sent(app).calls, 5, what="retried within a retry period")
    wait_until(lambda: not h.pending(), 5)
    h.stop(runner)
    assert [c["task_id"] for c in sent(app).calls] == expected_ids(h.name, "every", [1])
    assert sent(app).fire_times() == [iso(1)]


class FlakyRedis:
    """The store's client, with HDEL failing ``failures`` times (a Redis blip)."""

    def __init__(self, client: Any, failures: int) -> None:
        self._client = client
        self.failures = failures

    def hdel(self, *args: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise redis.ConnectionError("blip")
        return self._client.hdel(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_redis_error_after_a_send_does_not_send_the_tick_again(h: Harness) -> None:
    """send_task succeeded but removing the pending copy failed: run() retries
    after a retry period and must not publish that tick a second time."""
    app = h.app()
    clock = Clock(0.5)
    lock, term = h.lead("a")
    runner = h.runner(app, lock, clock)
    runner.store.client = FlakyRedis(runner.store.client, failures=1)
    h.start(runner, term)
    advance(clock, runner, 1.1)
    wait_until(lambda: sent(app).calls, 5)
    wait_until(lambda: not h.pending(), 5, what="the pending copy is cleaned up")
    advance(clock, runner, 2.1)
    wait_until(lambda: h.last() == iso(2) and len(sent(app).calls) >= 2, 5)
    h.stop(runner)
    assert sent(app).fire_times() == [iso(1), iso(2)]


# ---------------------------------------------------------------- messages


def test_task_ids_are_deterministic_and_headers_are_set(h: Harness) -> None:
    schedule = {"every": {**EVERY_SECOND, "kwargs": {"k": 1},
                          "options": {"queue": "ticks", "headers": {"mine": "kept"},
                                      "priority": 3}}}
    app = h.app(schedule)
    clock = Clock(0.5)
    lock, term = h.lead("a")
    runner = h.runner(app, lock, clock)
    h.start(runner, term)
    advance(clock, runner, 2.2)
    wait_until(lambda: h.last() == iso(2), 5)
    h.stop(runner)
    calls = sent(app).calls
    assert [c["task_id"] for c in calls] == expected_ids(h.name, "every", [1, 2])
    for call, second in zip(calls, (1, 2), strict=True):
        fire = call["headers"]["leader_fire_time"]
        parsed = datetime.fromisoformat(fire)
        assert parsed == at(second) and parsed.utcoffset() is not None
        assert parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert fire.endswith("+00:00")
        tick = f"every@{round(at(second).timestamp() * 1000)}"
        assert call["headers"] == {"mine": "kept", "leader_fire_time": fire,
                                   "leader_term": term, **runner.ticks.headers(tick)}
        assert call["options"] == {"queue": "ticks", "priority": 3}
        assert call["task"] == "app.tick" and call["args"] == ["s"]
        assert call["kwargs"] == {"k": 1}
    # The same tick gets the same id whoever sends it; another tick, another id.
    assert len(set(expected_ids(h.name, "every", [1, 2, 1]))) == 2


# ---------------------------------------------------------------- runtime entries


def _raw_entry(task: str, schedule: dict[str, Any], **extra: Any) -> str:
    return json.dumps({"task": task, "schedule": schedule, **extra})


def test_bad_runtime_entries_are_skipped_with_a_logged_error(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    app = h.app()
    store = ScheduleStore.for_app(app)
    store.add("good", "app.tick", cron("* * * * * *"), args=["good"])
    store.client.hset(store.entries_key, mapping={
        "not-json": "{this is not json",
        "weird-type": _raw_entry("app.tick", {"type": "lunar", "phase": "full"}),
        "bad-cron": _raw_entry("app.tick", {"type": "cron", "expr": "61 * * * *"}),
        "no-task": json.dumps({"schedule": {"type": "interval", "seconds": 1}}),
    })
    clock = Clock(0.5)
    lock, term = h.lead("a")
    runner = h.runner(app, lock, clock)
    with caplog.at_level(logging.ERROR, logger="celery_leader.scheduler"):
        h.start(runner, term)
        advance(clock, runner, 1.1)
        wait_until(lambda: h.last() == iso(1) and h.last("good") == iso(1), 5)
        h.stop(runner)
    assert sent(app).fire_times("s") == [iso(1)]
    assert sent(app).fire_times("good") == [iso(1)]
    assert set(h.states()) == {"every", "good"}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for name in ("not-json", "weird-type", "bad-cron", "no-task"):
        assert any(f"'{name}'" in message for message in errors), (name, errors)
    assert "unknown schedule type 'lunar'" in caplog.text
    assert "61 * * * *" in caplog.text


def test_runtime_entries_added_disabled_removed_while_running(h: Harness) -> None:
    """Runs on the real clock: every change is picked up within one retry period.

    ``sub`` runs every 0.1 s; the config entry keeps its one-per-second rhythm
    through all the changes.
    """
    app = h.app()
    store = ScheduleStore.for_app(app)
    lock, term = h.lead("a")
    runner = ScheduleRunner(app, lock, h.settings(retry_period=0.3), now=time.time)
    sends: list[tuple[float, str, str]] = []
    recorder = sent(app)

    def timed(name: str, args: Any = None, **kw: Any) -> None:
        recorder(name, args=args, **kw)
        label = next(iter(args or ["?"]))
        sends.append((time.monotonic(), label, kw["headers"]["leader_fire_time"]))

    app.send_task = timed  # type: ignore[method-assign]
    h.start(runner, term)
    slack = 0.35  # thread scheduling on a loaded 2-core machine

    def sub_sends(after: float = 0.0) -> list[float]:
        return [t for t, label, _ in sends if label == "sub" and t > after]

    added = time.monotonic()
    store.add("sub", "app.tick", 0.1, args=["sub"])
    wait_until(lambda: sub_sends(), 0.3 + 0.1 + slack + 1, what="added entry fires")
    assert sub_sends()[0] - added <= 0.3 + 0.1 + slack

    wait_until(lambda: len(sub_sends()) >= 5, 5)
    disabled = time.monotonic()
    store.disable("sub")
    time.sleep(0.3 + slack + 0.5)  # a measurement window
    late = [t - disabled for t in sub_sends(disabled)]
    assert all(delay <= 0.3 + slack for delay in late), late
    count = len(sub_sends())

    enabled = time.monotonic()
    store.enable("sub")
    wait_until(lambda: sub_sends(enabled), 0.3 + 0.1 + slack + 1, what="re-enabled fires")
    first = sub_sends(enabled)[0]
    assert first - enabled <= 0.3 + 0.1 + slack
    # No catch-up for the ~1 s it was disabled: nothing but one tick in the first 50 ms.
    assert len([t for t in sub_sends(enabled) if t - first < 0.05]) == 1
    assert len(sub_sends()) > count

    removed = time.monotonic()
    assert store.remove("sub") is True
    time.sleep(0.3 + slack + 0.5)
    assert all(t - removed <= 0.3 + slack for t in sub_sends(removed))
    h.stop(runner)
    # The config entry never missed or repeated a second.
    seconds = [datetime.fromisoformat(f).timestamp() for _, label, f in sends if label == "s"]
    assert seconds == [seconds[0] + i for i in range(len(seconds))]
    assert len(seconds) >= 2


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"task": "app.t", "schedule": "every day"}, "invalid schedule"),
    ({"schedule": 5}, "needs a task name"),
    ({"task": "app.t", "schedule": -1}, "must be positive"),
    ({"task": "app.t", "schedule": 5, "options": {"colour": "red"}}, "unknown option"),
    ({"task": "app.t", "schedule": 5, "catch_up": "sometimes"}, "catch_up"),
    ({"task": "app.t", "schedule": 5, "misfire_grace": 0}, "misfire_grace"),
    ({"task": "app.t", "schedule": 5, "args": "abc"}, "args"),
    ("not a dict", "must be a dict"),
])
def test_bad_beat_schedule_entry_raises_naming_it(h: Harness, spec: Any,
                                                  fragment: str) -> None:
    app = h.app({"fine": EVERY_SECOND, "broken-entry": spec})
    lock, _ = h.lead("a")
    with pytest.raises(EntryError, match=fragment) as info:
        h.runner(app, lock, Clock())
    assert "'broken-entry'" in str(info.value)


def test_both_modes_share_one_schedule_in_one_hash_slot(h: Harness) -> None:
    """The beats' election has its own lease and terms, but its keys carry the
    workers' hash tag, and the schedule's keys are the same whichever mode runs."""
    settings = h.settings()
    assert beat_election_name(settings, standalone=False) == h.name
    assert beat_election_name(settings, standalone=True) == f"{h.name}-beat"
    worker_lock = h.lock("w")
    beats = beat_lock(settings, "b")
    assert beats.lease_key == f"celery-leader:{{{h.name}}}:{h.name}-beat:lease"
    assert beats.counter_key == f"celery-leader:{{{h.name}}}:{h.name}-beat:counter"
    assert worker_lock.lease_key == f"celery-leader:{{{h.name}}}:lease"
    app = h.app()
    as_worker = ScheduleRunner(app, worker_lock, settings)
    as_beat = ScheduleRunner(app, beats, settings)
    assert (as_worker.standalone, as_beat.standalone) == (False, True)
    assert as_worker.other_lease_key == beats.lease_key
    assert as_beat.other_lease_key == worker_lock.lease_key
    for attribute in ("state_key", "pending_key", "first_seen_key", "entries_key",
                      "dispatcher_key", "overrides_key"):
        assert getattr(as_worker.store, attribute) == getattr(as_beat.store, attribute) == \
            getattr(ScheduleStore.for_app(app), attribute)
    assert as_beat.store.state_key == f"celery-leader:{{{h.name}}}:schedule:state"
    # A lock outside the schedule's slot is refused at construction.
    with pytest.raises(ConfigurationError, match="hash slot"):
        ScheduleRunner(app, RedisLock(h.client, name=f"{h.name}-beat", identity="x"), settings)


def started_at_half_a_second(h: Harness, app: Celery) -> tuple[ScheduleRunner, Clock,
                                                                  list[datetime]]:
    """A runner of ``app`` leading from 0.5 s, once it has loaded its entries;
    its clock, and the instants it (re)loaded them at (spy_loads)."""
    clock = Clock(0.5)
    lock, term = h.lead("a")
    runner = h.runner(app, lock, clock)
    loads = spy_loads(runner)
    h.start(runner, term)
    wait_until(lambda: loads, 5, what="the runner loaded its entries")
    return runner, clock, loads


def test_runtime_change_does_not_postpone_an_entry_that_has_not_fired_yet(h: Harness) -> None:
    """A runtime change re-reads the entries; an unchanged interval entry that has
    not fired yet keeps its first fire time (started_at + interval)."""
    app = h.app({"every-10s": {"task": "app.tick", "schedule": 10.0, "args": ("ten",)}})
    runner, clock, loads = started_at_half_a_second(h, app)
    advance(clock, runner, 5.0)
    ScheduleStore.for_app(app).add("rt", "app.tick", cron("* * * * * *"), args=["rt"])
    wait_until(lambda: len(loads) == 2, 5, what="the runner re-read the entries")
    advance(clock, runner, 6.1)
    wait_until(lambda: h.last("rt") == iso(6), 5, what="the runtime entry was picked up")
    advance(clock, runner, 10.6)
    wait_until(lambda: sent(app).fire_times("ten"), 5, what="the 10 s entry fires at 10.5")
    h.stop(runner)
    assert sent(app).fire_times("ten") == [iso(10.5)]


def test_runtime_entries_not_fired_keep_their_first_fire_time_unless_changed(
        h: Harness) -> None:
    """Runtime entries are read again from Redis, not held to compare (Loaded):
    across a reload, one unchanged (or written again unchanged) keeps its first
    fire time; one changed before its first tick counts from the change, as a
    beat_schedule entry enabled while leading does."""
    app = h.app({})
    store = ScheduleStore.for_app(app)
    store.add("same", "app.tick", 10.0, args=["same"])
    store.add("rewritten", "app.tick", 10.0, args=["rewritten"])
    store.add("changed", "app.tick", 10.0, args=["changed"])
    runner, clock, loads = started_at_half_a_second(h, app)
    advance(clock, runner, 5.0)
    store.enable("rewritten")  # already enabled: the same definition written again
    store.update("changed", schedule=8.0)
    wait_until(lambda: len(loads) >= 2, 5, what="the runner re-read the entries")
    assert loads[-1] == at(5.0)
    advance(clock, runner, 10.6)
    wait_until(lambda: h.last("same") and h.last("rewritten"), 5, what="10.5 fired")
    assert h.last("changed") is None  # 0.5 + 8 passed: counted from 5.0 instead
    advance(clock, runner, 13.1)
    wait_until(lambda: h.last("changed"), 5, what="the changed entry fires at 13.0")
    h.stop(runner)
    assert sent(app).fire_times("same") == sent(app).fire_times("rewritten") == [iso(10.5)]
    assert sent(app).fire_times("changed") == [iso(13.0)]


def test_an_entry_that_has_not_fired_keeps_its_first_fire_time_across_leaders(
        h: Harness) -> None:
    """An interval entry that has not fired yet is anchored where the first leader
    saw it: a change of leader before its first tick neither postpones nor skips it
    (anchored at the new leader's start, it would fire at 14.5 instead of 10.5)."""
    schedule = {"every-10s": {"task": "app.tick", "schedule": 10.0, "args": ("ten",)}}
    clock = Clock(0.5)
    lock, term = h.lead("a")
    first = h.runner(h.app(schedule), lock, clock)
    loads = spy_loads(first)
    h.start(first, term)
    wait_until(lambda: loads, 5, what="the first leader loaded its entries")
    clock.set(4.5)
    h.stop(first)
    app = h.app(schedule)
    lock, term = h.lead("b")
    second = h.runner(app, lock, clock)
    h.start(second, term)
    advance(clock, second, 10.6)
    wait_until(lambda: sent(app).fire_times("ten"), 5, what="the 10 s entry fires at 10.5")
    h.stop(second)
    assert sent(app).fire_times("ten") == [iso(10.5)]


def test_unknown_task_name_is_warned_once_and_still_sent(
        redis_client: redis.Redis, election_name: str, caplog: pytest.LogCaptureFixture) -> None:
    from celery import Celery

    from celery_leader.scheduler import ScheduleRunner
    from celery_leader.settings import LeaderSettings

    app = Celery("unknown-task-app", set_as_current=False)
    app.conf.beat_schedule = {"typo": {"task": "proj.tasks.no_such_task", "schedule": 60.0}}
    lock = RedisLock(redis_client, election_name, "a")
    runner = ScheduleRunner(app, lock, LeaderSettings(redis_url="redis://unused",
                                                      name=election_name))
    started = datetime.now(timezone.utc)
    with caplog.at_level(logging.WARNING, logger="celery_leader.scheduler"):
        loaded = runner._load(started)
        runner._load(started, loaded)
    assert caplog.text.count("proj.tasks.no_such_task") == 1
    assert "typo" in loaded.queue.fire_times()


# ------------------------------------------- reloads: what an entry keeps

class FixedSource:
    """An entry source (source.py) serving what ``serve()`` returns, at version 1."""

    def __init__(self, serve: Callable[[], dict[str, Entry]]) -> None:
        self.serve = serve

    def watch(self, wake: Callable[[], None]) -> None:
        pass

    def version(self) -> int:
        return 1

    def entries(self) -> dict[str, Entry]:
        return self.serve()

    def claimed(self, entry: Entry, fire: datetime, published: bool) -> None:
        pass


@pytest.mark.parametrize("kind", ["beat_schedule", "runtime"])
def test_an_entry_re_enabled_while_leading_sends_no_tick_of_its_disabled_time_later(
        h: Harness, kind: str) -> None:
    """Re-enabled at 100 after firing at 10: its next tick is 110, not 20, at that
    reload and at any later one (here: another entry added at 101), and for the
    next leader too.  Before, a later reload counted from the tick before it was
    disabled and sent 20, 30, ... 100 at once."""
    every_10 = {"task": "app.tick", "schedule": 10.0, "args": ("ten",)}
    app = h.app({"ten": every_10} if kind == "beat_schedule" else {})
    store = ScheduleStore.for_app(app)
    if kind == "runtime":
        store.add("ten", "app.tick", 10.0, args=["ten"])
    lock, term = h.lead("a")
    runner = h.runner(app, lock, Clock(0.0))
    started = at(0.0)

    def load(offset: float, loaded: Any) -> Any:
        loaded = runner._load(at(offset), loaded)
        assert runner._pass_over_resumed(loaded, term)
        return loaded

    loaded = runner._load(started)
    assert runner._fire_all_due(loaded, term, at(10.1), started)
    store.disable("ten")
    loaded = load(12.0, loaded)
    store.enable("ten")
    loaded = load(100.0, loaded)
    assert loaded.queue.fire_times()["ten"] == at(110.0)
    store.add("other", "app.tick", 3600.0, args=["other"])
    loaded = load(101.0, loaded)
    assert loaded.queue.fire_times()["ten"] == at(110.0)
    assert runner._fire_all_due(loaded, term, at(101.1), started)
    assert sent(app).fire_times("ten") == [iso(10)]
    # The next leader agrees: its progress in Redis says where it resumed.
    lock_b, _ = h.lead("b")
    successor = h.runner(h.app({"ten": every_10} if kind == "beat_schedule" else {}),
                         lock_b, Clock(105.0))
    assert successor._load(at(105.0)).queue.fire_times()["ten"] == at(110.0)


def test_a_runtime_entry_anchored_within_a_millisecond_of_its_tick_keeps_it(
        h: Harness) -> None:
    """A runtime entry is not held: across a reload it keeps its fire time when
    its first-seen time outlived every write since.  Started 0.4 ms before the
    minute, its first-seen time is stored as the minute itself (whole ms):
    computed again from that at a reload just after the minute (before the tick
    was sent), its first tick moved a minute later."""
    app = h.app({})
    store = ScheduleStore.for_app(app)
    store.add("minutely", "app.tick", cron("* * * * *"), args=["m"])
    store.add("other", "app.tick", 3600.0, args=["o"])
    lock, term = h.lead("a")
    runner = h.runner(app, lock, Clock(-0.0004))
    started = at(-0.0004)
    loaded = runner._load(started)
    assert loaded.queue.fire_times()["minutely"] == at(0.0)
    store.update("other", schedule=1800.0)  # a reload as the tick falls due, before it is sent
    loaded = runner._load(at(0.0006), loaded)
    assert loaded.queue.fire_times()["minutely"] == at(0.0)
    assert runner._fire_all_due(loaded, term, at(0.1), started)
    assert sent(app).fire_times("m") == [iso(0)]


def test_a_source_entry_named_like_a_runtime_one_removed_mid_load_is_not_queued_twice(
        h: Harness) -> None:
    """The runtime entry "x" is loaded, then removed before the source's entries
    are read: the source's "x" must not take the name in the same load (the
    queue would hold "x" twice, and the source's entry fire on both)."""
    app = h.app({})
    store = ScheduleStore.for_app(app)
    store.add("x", "app.tick", 10.0, args=["runtime"])
    lock, _ = h.lead("a")
    runner = h.runner(app, lock, Clock(0.0))
    row = replace(entry_from_config("x", {"task": "app.tick", "schedule": 5.0,
                                          "args": ["row"]}, app), source="rows")

    def removing_then_serving() -> dict[str, Entry]:
        store.remove("x")  # after the runtime entries were read
        return {"x": row}

    runner.source = FixedSource(removing_then_serving)
    loaded = runner._load(at(0.0))
    assert [name for _, name in loaded.queue.within(None, at(3600))] == ["x"]
    assert "x" not in loaded.held


def test_a_source_entry_that_has_not_fired_keeps_its_anchor_across_leaders(
        h: Harness) -> None:
    """An entry source's interval entry is anchored where the schedule first saw
    it (its first-seen time, recorded as a beat_schedule entry's is): the next
    leader does not postpone its first tick.  (A first cut of the memory change
    recorded it as a runtime entry's, which the script refuses for a name not in
    the runtime hash: every leader anchored it at its own start.)"""
    every_10 = replace(entry_from_config("row", {"task": "app.tick", "schedule": 10.0,
                                                 "args": ["row"]}, h.app({})), source="rows")

    first = h.runner(h.app({}), h.lead("a")[0], Clock(0.5))
    first.source = FixedSource(lambda: {"row": every_10})
    assert first._load(at(0.5)).queue.fire_times()["row"] == at(10.5)
    second = h.runner(h.app({}), h.lead("b")[0], Clock(4.5))
    second.source = FixedSource(lambda: {"row": every_10})
    assert second._load(at(4.5)).queue.fire_times()["row"] == at(10.5)
