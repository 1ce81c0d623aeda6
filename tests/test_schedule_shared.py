"""One schedule shared by both dispatch modes, against a real Redis with a fake clock.

The workers' election and the standalone beats' election both run a
ScheduleRunner on the same progress keys; ``schedule:dispatcher`` names the one
leadership that owns the schedule.  Checked here, with the real loop in threads:

- while one election's leader owns the schedule, the other's refuses (one log
  line naming ``leader_beat``), and every schedule script it runs is refused
  atomically, so no fire time is claimed or sent twice;
- once the owner's leadership ends (its lease released, or held by a newer
  leader), the other takes over where it stopped: none twice, none dropped;
- the standalone beat's progress from before (``{<name>-beat}`` keys) is merged
  once (the later ``last`` wins), and an old-version beat still leading blocks
  dispatching;
- enable/disable of beat_schedule entries, removal of runtime entries.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from celery_leader.record import LeaderElectionRecord
from celery_leader.redislock import RedisLock
from celery_leader.scheduler import ScheduleStore, ScheduleTakenOver, beat_lock
from tests.dispatch import fire
from tests.sched_procs import wait_until
from tests.test_scheduler_unit import (
    EVERY_SECOND,
    T0,
    Clock,
    Harness,
    advance,
    at,
    iso,
    sent,
    spy_loads,
)

REFUSAL = "not dispatching the schedule"


@pytest.fixture
def h(redis_url: str, election_name: str) -> Any:
    harness = Harness(redis_url, election_name)
    yield harness
    harness.close()


def lead_beat(h: Harness, identity: str) -> tuple[RedisLock, int]:
    """Make ``identity`` the leader of the standalone beats' election."""
    lock = beat_lock(h.settings(), identity)
    h.client.delete(lock.lease_key)
    record = lock.create(LeaderElectionRecord(holder_identity=identity,
                                              lease_duration=60.0)).record
    assert record is not None
    return lock, record.term


def owner(h: Harness) -> dict[str, Any] | None:
    return ScheduleStore(None, h.lock("x")).dispatcher()


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if REFUSAL in r.getMessage()]


def ms(offset: float) -> int:
    return round((T0 + offset) * 1000)


# ---------------------------------------------------------------- one owner


@pytest.mark.parametrize("first", ["worker", "beat"])
@pytest.mark.parametrize("ending", ["released", "new-holder"])
def test_the_other_election_refuses_then_takes_over_where_the_owner_stopped(
        h: Harness, first: str, ending: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = {"catch_up": "all"}
    clock = Clock(0.5)
    worker_lock, worker_term = h.lead("w")
    beats, beat_term = lead_beat(h, "b")
    apps = {"worker": h.app(), "beat": h.app()}
    runners = {"worker": h.runner(apps["worker"], worker_lock, clock, **settings),
               "beat": h.runner(apps["beat"], beats, clock, **settings)}
    terms = {"worker": worker_term, "beat": beat_term}
    second = "beat" if first == "worker" else "worker"
    h.start(runners[first], terms[first])
    wait_until(lambda: (owner(h) or {}).get("identity") == ("w" if first == "worker" else "b"),
               5, what=f"the {first} owns the schedule")
    with caplog.at_level(logging.INFO, logger="celery_leader.scheduler"):
        h.start(runners[second], terms[second])
        wait_until(lambda: refusals(caplog), 5, what=f"the {second} refuses")
        for tick in (1, 2, 3):
            clock.set(tick + 0.2)
            for runner in runners.values():
                runner.wake()
            wait_until(lambda t=tick: h.last() == iso(t), 5, what=f"tick {tick}")
        # The refusing leader retried every 0.1 s meanwhile, and logged once.
        [line] = refusals(caplog)
        assert "leader_beat = False" in line and "takes over when" in line, line
        assert sent(apps[second]).calls == []

        # The owner's leadership ends: its lease is released, or a newer leader
        # of its election (one that does not dispatch) holds it.
        h.stop(runners[first])
        owner_lock = worker_lock if first == "worker" else beats
        if ending == "released":
            assert owner_lock.release(terms[first])
        elif first == "worker":
            h.lead("w-without-leader-beat")
        else:
            lead_beat(h, "b-next")
        clock.set(5.2)  # 4 and 5 became due while nobody dispatched
        wait_until(lambda: h.last() == iso(5), 5, what=f"the {second} takes over",
                   describe=caplog.text.__str__)
        advance(clock, runners[second], 6.2)
        wait_until(lambda: h.last() == iso(6), 5)
    h.stop(runners[second])
    assert sent(apps[first]).fire_times() == [iso(s) for s in (1, 2, 3)]
    assert sent(apps[second]).fire_times() == [iso(s) for s in (4, 5, 6)]
    assert (owner(h) or {})["election"] == (beats.name if second == "beat" else h.name)
    assert "takes over the schedule from" in caplog.text
    assert h.pending() == {}


def test_a_non_owner_cannot_claim_publish_or_adopt(h: Harness) -> None:
    """Every schedule script checks ownership in the same atomic step as the term:
    a leader of the other election, calling them directly, changes nothing."""
    worker_lock, worker_term = h.lead("w")
    beats, beat_term = lead_beat(h, "b")
    owner_app, intruder_app = h.app(), h.app()
    clock = Clock(0.5)
    # Claimed but left pending: the owner's leadership check fails between its
    # claim and its publish (as if it paused there and lost the lease).
    owning = h.runner(owner_app, worker_lock, clock, still_leading=lambda: False)
    intruder = h.runner(intruder_app, beats, clock)
    entry = owning.config_entries["every"]
    assert fire(owning, entry, at(1), worker_term)
    before = (h.states(), h.pending(), owner(h))
    assert len(before[1]) == 1 and sent(owner_app).calls == []
    with pytest.raises(ScheduleTakenOver):
        fire(intruder, entry, at(2), beat_term)
    with pytest.raises(ScheduleTakenOver):
        intruder._recover_pending(beat_term)  # would adopt the owner's pending tick
    assert (h.states(), h.pending(), owner(h)) == before
    assert sent(intruder_app).calls == []
    # A stale term of the owner's own election is fenced first (the lease check).
    _, newer = h.lead("w2")
    assert fire(owning, entry, at(3), worker_term) is False
    assert newer > worker_term and h.states() == before[0]


# ---------------------------------------------------------------- the old beat keys


def legacy(h: Harness, suffix: str) -> str:
    return f"celery-leader:{{{h.name}-beat}}:schedule:{suffix}"


def message(h: Harness, second: int, term: int) -> str:
    return json.dumps({"entry": "every", "task": "app.tick", "args": ["s"], "kwargs": {},
                       "options": {}, "fire_ms": ms(second), "term": term,
                       "task_id": f"old-{second}"})


def test_old_standalone_beat_progress_is_merged_once(h: Harness,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Before the modes shared keys, the beat kept its progress under
    ``{<name>-beat}``.  Here the workers claimed up to 2 and the old beat up to 3,
    leaving 3 pending (claimed, maybe not sent) and an older pending 1 (which
    the workers' progress already covers)."""
    h.client.hset(h.lock("x").key("schedule:state"), "every",
                  json.dumps({"last": ms(2), "term": 4}))
    h.client.hset(legacy(h, "state"), mapping={
        "every": json.dumps({"last": ms(3), "term": 9}),
        "ten": json.dumps({"last": ms(-7), "term": 9})})
    h.client.hset(legacy(h, "pending"), mapping={
        f"every@{ms(3)}": message(h, 3, 9), f"every@{ms(1)}": message(h, 1, 8)})
    h.client.hset(legacy(h, "first-seen"), "later", ms(-20))
    h.client.hset(h.lock("x").key("schedule:first-seen"), "later", ms(-10))
    schedule = {"every": EVERY_SECOND,
                "ten": {"task": "app.tick", "schedule": 10.0, "args": ("ten",)},
                "later": {"task": "app.tick", "schedule": 60.0, "args": ("later",)}}
    app = h.app(schedule)
    clock = Clock(3.5)
    lock, term = h.lead("w")
    runner = h.runner(app, lock, clock, catch_up="all")
    with caplog.at_level(logging.WARNING, logger="celery_leader.scheduler"):
        h.start(runner, term)
        wait_until(lambda: sent(app).fire_times() == [iso(3)], 5,
                   what="the old beat's pending tick 3 is sent")
        advance(clock, runner, 4.1)
        wait_until(lambda: h.last() == iso(4), 5)
    h.stop(runner)
    # 1 and 2 are not sent again, 3 once (adopted, with its task id), then 4.
    assert sent(app).fire_times() == [iso(3), iso(4)]
    assert sent(app).calls[0]["task_id"] == "old-3"
    assert sent(app).fire_times("ten") == [iso(3)]  # from the old beat's last (-7) + 10
    assert h.states()["ten"]["last"] == ms(3)
    assert int(h.client.hget(h.lock("x").key("schedule:first-seen"), "later")) == ms(-20)
    for suffix in ("state", "pending", "first-seen"):
        assert not h.client.exists(legacy(h, suffix)), suffix
    assert not h.client.exists(h.lock("x").key("schedule:migrated"))
    assert "1 dropped" in caplog.text and "1 pending ticks moved" in caplog.text

    # A migration interrupted after the merge (the old keys not yet deleted) is
    # not applied twice: a tick it already moved is not moved again.
    h.client.hset(legacy(h, "pending"), f"every@{ms(3)}", message(h, 3, 9))
    h.client.hset(h.lock("x").key("schedule:migrated"), f"every@{ms(3)}", 1)
    again = h.runner(h.app(schedule), lock, clock, catch_up="all")
    assert again._migrate_legacy(term)
    assert h.pending() == {}


def test_an_old_version_beat_still_leading_blocks_dispatching(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    old_lease = f"celery-leader:{{{h.name}-beat}}:lease"
    h.client.set(old_lease, json.dumps({"holderIdentity": "old-beat", "term": 3}), px=60_000)
    app = h.app()
    clock = Clock(0.5)
    lock, term = h.lead("w")
    runner = h.runner(app, lock, clock)
    with caplog.at_level(logging.WARNING, logger="celery_leader.scheduler"):
        h.start(runner, term)
        wait_until(lambda: "older celery-leader version" in caplog.text, 5)
        advance(clock, runner, 1.2)
        wait_until(lambda: runner.store.client.exists(old_lease), 1)
        assert sent(app).calls == [] and owner(h) is None
        h.client.delete(old_lease)  # the old beat stopped
        wait_until(lambda: owner(h) is not None, 5)
        advance(clock, runner, 2.2)
        wait_until(lambda: h.last() == iso(2), 5)
    h.stop(runner)
    assert caplog.text.count("older celery-leader version") == 1
    assert sent(app).fire_times() == [iso(2)]


# ---------------------------------------------------------------- entries


def test_a_disabled_beat_schedule_entry_is_not_dispatched_until_enabled(h: Harness) -> None:
    app = h.app({"every": EVERY_SECOND, "other": {**EVERY_SECOND, "args": ("o",)}})
    store = ScheduleStore.for_app(app)
    assert store.disable("every").enabled is False
    clock = Clock(0.5)
    lock, term = h.lead("w")
    runner = h.runner(app, lock, clock)
    loads = spy_loads(runner)
    h.start(runner, term)
    advance(clock, runner, 2.2)
    wait_until(lambda: h.last("other") == iso(2), 5)
    assert sent(app).fire_times() == [] and h.last() is None
    assert store.enable("every").enabled is True
    assert h.client.hlen(store.overrides_key) == 0  # back to what beat_schedule says
    wait_until(lambda: len(loads) == 2, 5, what="picked up within a retry period")
    advance(clock, runner, 3.2)
    wait_until(lambda: h.last() == iso(3), 5)
    h.stop(runner)
    assert sent(app).fire_times() == [iso(3)]


def test_a_runtime_entry_clashing_with_beat_schedule_is_ignored_with_one_error(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Stored before beat_schedule got an entry of that name (add() refuses it)."""
    app = h.app()
    store = ScheduleStore.for_app(app)
    store.client.hset(store.entries_key, "every", json.dumps(
        {"task": "app.other", "schedule": {"type": "interval", "seconds": 0.5}}))
    clock = Clock(0.5)
    lock, _ = h.lead("w")
    runner = h.runner(app, lock, clock)
    with caplog.at_level(logging.ERROR, logger="celery_leader.scheduler"):
        runner._load(at(0.5))
        loaded = runner._load(at(0.6), runner._load(at(0.5)))
    assert "every" in loaded.queue.fire_times() and "every" not in loaded.held
    assert runner._entry(loaded, "every").task == "app.tick"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "'app.other'" in errors[0] and "'app.tick'" in errors[0]


def test_a_removed_runtime_entry_leaves_no_progress_behind(h: Harness) -> None:
    app = h.app({})
    store = ScheduleStore.for_app(app)
    store.add("rt", "app.tick", 1.0, args=["rt"])
    clock = Clock(0.5)
    lock, term = h.lead("w")
    runner = h.runner(app, lock, clock)
    h.start(runner, term)
    advance(clock, runner, 1.6)
    wait_until(lambda: h.last("rt") is not None, 5)
    h.stop(runner)
    assert h.client.hexists(store.first_seen_key, "rt")
    entry = store.get("rt")
    assert store.remove("rt") is True
    assert not h.client.hexists(store.state_key, "rt")
    assert not h.client.hexists(store.first_seen_key, "rt")
    # A runner that loaded it before the removal can neither claim it nor
    # record its first-seen time again.
    calls = len(sent(app).calls)
    assert fire(runner, entry, at(5), term)
    assert store.first_seen(["rt"], ms(5), runtime=True) == {}
    assert not h.client.hexists(store.state_key, "rt")
    assert not h.client.hexists(store.first_seen_key, "rt")
    assert len(sent(app).calls) == calls and h.pending() == {}
