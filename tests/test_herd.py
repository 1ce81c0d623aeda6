"""A herd of ticks due at one instant: fenced batches and message templates.

Against a real Redis as lease store and broker.  The templates are compared
byte for byte with the message kombu itself would push for the same tick
(same delivery tag and send time, which kombu otherwise draws at random / reads
from the clock); the batches are shown to be refused whole for a deposed term,
to be bounded, and to dispatch each fire time exactly once.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from celery import Celery
from celery.schedules import crontab
from celery.signals import before_task_publish
from kombu.transport.virtual import base as kombu_virtual

from celery_leader.election.redislock import RedisLock
from celery_leader.schedule.entries import Entry, entry_from_config
from celery_leader.schedule.herd import (
    HERD_ARGS_PER_TICK,
    HERD_BATCH,
    HERD_BATCH_ARGS,
    Claim,
    delivery_tags,
    pending_message,
    uuid5_text,
)
from celery_leader.schedule.publish import capture_redis_publish
from celery_leader.schedule.runner import ScheduleRunner
from celery_leader.schedule.store import to_ms
from celery_leader.schedule.template import TickValues
from celery_leader.schedule.tickstart import read_sent_record
from tests.test_atomic_publish import Rig
from tests.waiting import wait_until

UTC = timezone.utc
FIRE = datetime(2031, 3, 4, 5, 0, tzinfo=UTC)


@pytest.fixture
def rig(redis_url: str, election_name: str) -> Iterator[Rig]:
    made = Rig(redis_url, election_name)
    yield made
    made.close()


def entry(app: Celery, name: str = "job", **spec: Any) -> Entry:
    return entry_from_config(name, {"task": "proj.job", "schedule": 60.0, "args": ["a", 1],
                                    **spec}, app)


# ------------------------------------------------------------- templates

SPECS: dict[str, dict[str, Any]] = {
    "plain": {},
    "kwargs-unicode": {"kwargs": {"who": "Zoë \"quoted\" / ✓"}, "args": []},
    "routing": {"options": {"queue": "reports", "routing_key": "reports.hourly"}},
    "exchange": {"options": {"exchange": "jobs", "routing_key": "jobs", "queue": "jobs"}},
    "priority": {"options": {"queue": "ticks", "priority": 7}},
    "headers": {"options": {"headers": {"tenant": "t-1", "n": 3}}},
    "expires": {"options": {"expires": 90.5}},
    "countdown": {"options": {"countdown": 5}},
    "limits-serializer": {"options": {"time_limit": 30, "soft_time_limit": 20,
                                      "serializer": "json", "compression": "zlib",
                                      "shadow": "nice-name", "ignore_result": True}},
}


@pytest.mark.parametrize("tracked", [True, False], ids=["tick-tracking", "untracked"])
@pytest.mark.parametrize("prefix", ["", "pfx:"], ids=["no-prefix", "global_keyprefix"])
@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
def test_template_is_byte_for_byte_what_kombu_pushes(
        rig: Rig, spec: str, prefix: str, tracked: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    lock, term = rig.lead("a")
    conf: dict[str, Any] = {"broker_transport_options": {"global_keyprefix": prefix}} \
        if prefix else {}
    runner = rig.runner(lock, tick_run_once=tracked, **conf)
    job = entry(runner.app, name="job \"1\" ü", **SPECS[spec])
    template = runner.herd.template(job)
    assert template is not None, "this entry should have a template"
    fire_ms = to_ms(FIRE)
    tick = f"{job.name}@{fire_ms}"
    task_id = "9d0f1f5e-0000-4000-8000-000000000001"
    tag = "4e1c6c3a-1111-4111-8111-111111111111"
    now = datetime(2031, 3, 4, 5, 0, 0, 123456, tzinfo=UTC).astimezone(runner.app.timezone)

    mine = template.render(TickValues(task_id, FIRE.isoformat(), term, tick), now,
                           delivery_tag=tag)

    # kombu's own: the tick's publish as the per-tick path makes it, with the same
    # delivery tag and send time; its LPUSH recorded, not run.
    monkeypatch.setattr(kombu_virtual.Channel, "_next_delivery_tag", lambda self: tag)
    monkeypatch.setattr(runner.app, "now", lambda: now)
    data = json.loads(_pending(runner, job, fire_ms, term, task_id))
    pushes = capture_redis_publish(runner.app, rig.client, lambda producer: runner._send_task(
        data, producer, FIRE.isoformat(), term, tick))
    assert pushes == [(mine.key, mine.payload)]
    assert rig.client.llen(mine.key) == 0  # both only recorded: nothing was sent


OTHER_ARGS: dict[str, dict[str, Any]] = {
    "positional": {"args": ["b", 2, {"nested": [1.5, None, True]}]},
    "unicode-kwargs": {"args": [], "kwargs": {"who": "Zoë ✓ \"q\" \\ /", "n": 7}},
    "long": {"args": ["x" * 5000, list(range(300))], "kwargs": {"k": "y" * 3000}},
    "none": {"args": [], "kwargs": {}},
}


@pytest.mark.parametrize("other", list(OTHER_ARGS), ids=list(OTHER_ARGS))
@pytest.mark.parametrize("spec", ["plain", "routing", "headers", "expires"])
def test_entries_alike_share_one_template_and_still_match_kombu(
        rig: Rig, spec: str, other: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry with the task and options of one already templated gets the
    shared template (no kombu publish), filled with its own args and kwargs:
    still byte for byte what kombu pushes for it."""
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    first = entry(runner.app, name="first", **SPECS[spec])
    assert runner.herd.template(first) is not None
    builds: list[str] = []
    real_send = runner.herd.send
    runner.herd.send = lambda *a: builds.append("send") or real_send(*a)  # type: ignore
    spec_b = {**SPECS[spec], **OTHER_ARGS[other]}
    job = entry(runner.app, name="second ü", **spec_b)
    template = runner.herd.template(job)
    assert template is not None and builds == [], "built again instead of shared"
    fire_ms = to_ms(FIRE)
    tick = f"{job.name}@{fire_ms}"
    task_id = "9d0f1f5e-0000-4000-8000-000000000002"
    tag = "4e1c6c3a-1111-4111-8111-111111111112"
    now = datetime(2031, 3, 4, 5, 0, 0, 654321, tzinfo=UTC).astimezone(runner.app.timezone)
    mine = template.render(TickValues(task_id, FIRE.isoformat(), term, tick), now,
                           delivery_tag=tag)
    monkeypatch.setattr(kombu_virtual.Channel, "_next_delivery_tag", lambda self: tag)
    monkeypatch.setattr(runner.app, "now", lambda: now)
    data = json.loads(_pending(runner, job, fire_ms, term, task_id))
    pushes = capture_redis_publish(runner.app, rig.client, lambda producer: runner._send_task(
        data, producer, FIRE.isoformat(), term, tick))
    assert pushes == [(mine.key, mine.payload)]


def test_a_template_is_not_shared_when_its_parts_cannot_be_reproduced(rig: Rig) -> None:
    """Another serializer or compression: each entry gets its own template."""
    lock, term = rig.lead("a")
    runner = rig.runner(lock, task_compression="zlib")
    one, two = entry(runner.app, name="one"), entry(runner.app, name="two", args=["z"])
    first, second = runner.herd.template(one), runner.herd.template(two)
    assert first is not None and second is not None
    assert first.entry_parts is None and runner.herd._shared == {}
    values = TickValues("9d0f1f5e-0000-4000-8000-000000000003", FIRE.isoformat(), term, "t")
    assert first.render(values, delivery_tag="g").payload \
        != second.render(values, delivery_tag="g").payload


def _pending(runner: ScheduleRunner, job: Entry, fire_ms: int, term: int, task_id: str) -> str:
    return pending_message(job, fire_ms, term, runner.lock.name, task_id,
                           tracked=runner.lost_ticks is not None)


def test_entries_a_template_cannot_reproduce_are_sent_by_send_task(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    absolute = entry(runner.app, options={"expires": datetime(2040, 1, 1, tzinfo=UTC)})
    assert runner.herd.template(absolute) is None
    claims = [Claim(absolute, to_ms(FIRE), True)]
    assert runner.herd.dispatch(claims, term)
    [raw] = rig.client.lrange("celery", 0, -1)
    message = json.loads(raw)
    assert message["headers"]["expires"].startswith("2040-01-01")
    assert rig.client.hlen(lock.key("schedule:pending")) == 0


def test_fast_task_ids_and_delivery_tags_are_uuid5_and_uuid4_strings() -> None:
    namespace = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")
    for name in ["s:e1@1", "sched:Zoë ✓ \"x\"@1700000000000", "", "x" * 300]:
        assert uuid5_text(namespace.bytes, name) == str(uuid.uuid5(namespace, name))
    tags = delivery_tags(2000)
    assert len(set(tags)) == 2000
    for tag in tags:
        parsed = uuid.UUID(tag)
        assert str(parsed) == tag and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


# ------------------------------------------------------------- batches

def herd_entries(app: Celery, n: int, **spec: Any) -> list[Entry]:
    return [entry(app, name=f"e{i:05d}", **spec) for i in range(n)]


def broker_ticks(client: redis.Redis, key: str = "celery") -> list[tuple[str, str, int]]:
    out = []
    for raw in client.lrange(key, 0, -1):
        headers = json.loads(raw)["headers"]
        out.append((headers["leader_tick"], headers["id"], headers["leader_term"]))
    return out


def count_calls(runner: ScheduleRunner) -> list[int]:
    """Wrap the batch script: the number of ticks of each call."""
    sizes: list[int] = []
    script = runner.herd.script

    class Counting:
        def __call__(self, term: int, keys: Any = (), args: Any = ()) -> Any:
            sizes.append((len(args) - 2 - HERD_BATCH_ARGS) // HERD_ARGS_PER_TICK)
            return script(term, keys=keys, args=args)

    runner.herd.script = Counting()  # type: ignore[assignment]
    return sizes


def test_a_herd_is_dispatched_once_in_bounded_batches(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    n = 2 * HERD_BATCH + 37
    entries = herd_entries(runner.app, n)
    sizes = count_calls(runner)
    claims = [Claim(e, to_ms(FIRE), True) for e in entries]
    assert runner.herd.dispatch(claims, term)
    assert sizes == [HERD_BATCH, HERD_BATCH, 37]
    ticks = broker_ticks(rig.client)
    assert len(ticks) == n and len({t for t, _, _ in ticks}) == n
    assert len({task_id for _, task_id, _ in ticks}) == n
    assert runner.dispatched == n
    # Tracked for tick-start (tickstart.py), nothing left pending.
    assert rig.client.hlen(lock.key("schedule:sent")) == n
    assert rig.client.zcard(lock.key("schedule:sent-at")) == n
    raw = rig.client.hget(lock.key("schedule:sent"), ticks[0][0]) or b""
    record = read_sent_record(raw)
    [(key, payload)] = record["pushes"]
    assert key == "celery" and record["copies"] == 0
    assert payload.encode() in rig.client.lrange("celery", 0, -1)
    # The message is stored verbatim after the head, not JSON-encoded again.
    assert raw.endswith(b"\n" + payload.encode()) and raw.count(payload.encode()) == 1
    assert rig.client.hlen(lock.key("schedule:pending")) == 0
    # The same claims again: already claimed, nothing sent twice.
    assert runner.herd.dispatch(claims, term)
    assert rig.client.llen("celery") == n


def test_a_deposed_leaders_batch_is_refused_whole_and_the_successor_sends_it(
        rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    entries = herd_entries(runner.app, 300)
    claims = [Claim(e, to_ms(FIRE), True) for e in entries]
    assert runner.herd.dispatch(claims[:100], term)  # the first batch went out
    lock2, term2 = rig.lead("b")  # a successor: term 1 is over mid-herd
    assert runner.herd.dispatch(claims[100:], term) is False
    assert rig.client.llen("celery") == 100
    assert rig.client.hlen(lock.key("schedule:state")) == 100  # nothing of the refused batch
    assert rig.client.hlen(lock.key("schedule:pending")) == 0
    successor = rig.runner(lock2)
    assert successor.herd.dispatch(claims, term2)  # it knows only what Redis says
    ticks = broker_ticks(rig.client)
    assert len(ticks) == 300 and len({t for t, _, _ in ticks}) == 300
    assert sorted(term for _, _, term in ticks) == [term] * 100 + [term2] * 200


def state_entries(rig: Rig, lock: RedisLock) -> set[str]:
    return {name.decode() for name in rig.client.hkeys(lock.key("schedule:state"))}


def test_pipelined_batches_dispatch_a_herd_once(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    n = 3 * HERD_BATCH + 37
    claims = [Claim(e, to_ms(FIRE), True) for e in herd_entries(runner.app, n)]
    assert runner.herd.dispatch(claims, term)
    assert runner.herd.pipelined_batches == 4  # each batch sent before the last reply
    ticks = broker_ticks(rig.client)
    assert len(ticks) == n == len({t for t, _, _ in ticks}) == runner.dispatched
    assert rig.client.hlen(lock.key("schedule:sent")) == n
    assert runner.herd.dispatch(claims, term)  # again: all claimed already
    assert rig.client.llen("celery") == n


def test_a_batch_refused_in_a_pipeline_applies_no_later_batch(rig: Rig) -> None:
    """Batch 2 of 3 fails in Redis (its queue's key is not a list); batch 3, sent
    before that reply was read and fine on its own, must not apply (the chain)."""
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    first = herd_entries(runner.app, HERD_BATCH)
    broken = [entry(runner.app, name=f"b{i:05d}", options={"queue": "broken"})
              for i in range(HERD_BATCH)]
    last = [entry(runner.app, name=f"z{i:05d}") for i in range(37)]
    assert all(runner.herd.template(e) is not None for e in first + broken + last)
    rig.client.set("broken", "not a list")  # after kombu declared the queue
    claims = [Claim(e, to_ms(FIRE), True) for e in first + broken + last]
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        runner.herd.dispatch(claims, term)  # the ordinary call of batch 2 says why
    assert state_entries(rig, lock) == {e.name for e in first}
    assert rig.client.llen("celery") == HERD_BATCH
    assert runner.herd.claims_done == HERD_BATCH


def test_a_leader_deposed_while_batches_are_in_flight_applies_a_prefix_only(
        rig: Rig) -> None:
    """Deposed while batch 2 is in flight (when batch 1's reply is read): batch 2
    may have run before the new term began, nothing later does; the successor
    sends exactly the rest."""
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    n = 4 * HERD_BATCH
    entries = herd_entries(runner.app, n)
    deposed: list[tuple[RedisLock, int]] = []

    def depose_once(claim: Claim) -> None:
        if not deposed:
            deposed.append(rig.lead("b"))

    runner.herd.claimed = depose_once
    claims = [Claim(e, to_ms(FIRE), True) for e in entries]
    assert runner.herd.dispatch(claims, term) is False
    done = state_entries(rig, lock)
    assert done in ({e.name for e in entries[:HERD_BATCH]},
                    {e.name for e in entries[:2 * HERD_BATCH]})
    [(lock2, term2)] = deposed
    assert rig.client.llen("celery") == len(done)
    successor = rig.runner(lock2)
    assert successor.herd.dispatch(claims, term2)
    ticks = broker_ticks(rig.client)
    assert len(ticks) == n == len({t for t, _, _ in ticks})
    assert sorted(t for _, _, t in ticks) == [term] * len(done) + [term2] * (n - len(done))


def test_another_broker_gets_claims_in_batches_and_pipelined_pushes(
        rig: Rig, other_redis_url: str) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock, broker=other_redis_url)
    entries = herd_entries(runner.app, HERD_BATCH + 10)
    sizes = count_calls(runner)
    assert runner.herd.dispatch([Claim(e, to_ms(FIRE), True) for e in entries], term)
    assert sizes == [HERD_BATCH, 10]
    broker = redis.Redis.from_url(other_redis_url)
    try:
        ticks = broker_ticks(broker)
    finally:
        broker.close()
    assert len(ticks) == len(entries) == len({t for t, _, _ in ticks})
    assert rig.client.llen("celery") == 0
    assert rig.client.hlen(lock.key("schedule:pending")) == 0
    assert runner.dispatched == len(entries)


def test_a_deposed_leader_with_another_broker_pushes_nothing(
        rig: Rig, other_redis_url: str) -> None:
    """Claimed in time, but the leadership ended before the push: left pending
    for the next leader (which adopts and sends it)."""
    lock, term = rig.lead("a")
    leading = [True]
    runner = rig.runner(lock, broker=other_redis_url)
    runner.still_leading = lambda: leading[0]
    runner.herd.still_leading = lambda: leading[0]
    real = runner.herd.script

    def claim_then_depose(term: int, keys: Any = (), args: Any = ()) -> Any:
        result = real(term, keys=keys, args=args)
        leading[0] = False
        return result

    runner.herd.script = claim_then_depose  # type: ignore[assignment]
    entries = herd_entries(runner.app, 20)
    assert runner.herd.dispatch([Claim(e, to_ms(FIRE), True) for e in entries], term)
    broker = redis.Redis.from_url(other_redis_url)
    try:
        assert broker.llen("celery") == 0
        assert rig.client.hlen(lock.key("schedule:pending")) == 20
        lock2, term2 = rig.lead("b")
        successor = rig.runner(lock2, broker=other_redis_url)
        assert successor._recover_pending(term2)
        assert len({t for t, _, _ in broker_ticks(broker)}) == broker.llen("celery") == 20
    finally:
        broker.close()


def test_the_runner_dispatches_a_herd_due_at_one_instant(rig: Rig) -> None:
    """Through the loop: every entry due at the same minute is sent once, with
    catch-up: the latest missed tick only."""
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    entries = [entry_from_config(f"c{i}", {"task": "proj.job", "schedule": crontab(minute="*"),
                                           "catch_up": "latest"}, runner.app)
               for i in range(1200)]
    runner.config_entries = {e.name: e for e in entries}
    started = FIRE - timedelta(minutes=3, seconds=30)
    loaded = runner._load(started)
    now = FIRE + timedelta(seconds=1)
    assert runner._fire_all_due(loaded, term, now, started + timedelta(minutes=10))
    ticks = broker_ticks(rig.client)
    assert len(ticks) == 1200
    assert {t.rsplit("@", 1)[1] for t, _, _ in ticks} == {str(to_ms(FIRE))}
    assert loaded.queue.fire_times() == dict.fromkeys(runner.config_entries,
                                                      FIRE + timedelta(minutes=1))


# ------------------------------------------------ metrics and entry sources

class RecordingSource:
    """An entry source (source.py) serving fixed entries and recording what the
    runner reports back."""

    def __init__(self, entries: list[Entry]) -> None:
        self.served = {e.name: e for e in entries}
        self.claims: list[tuple[str, datetime, bool]] = []

    def watch(self, wake: Callable[[], None]) -> None:
        pass

    def version(self) -> Hashable:
        return 1

    def entries(self) -> dict[str, Entry]:
        return self.served

    def claimed(self, entry: Entry, fire: datetime, published: bool) -> None:
        self.claims.append((entry.name, fire, published))


@pytest.mark.parametrize("path", ["push", "other-broker", "send_task"])
def test_a_herd_counts_and_reports_every_tick_as_one_by_one_does(
        rig: Rig, other_redis_url: str, path: str) -> None:
    """Every tick through the batches bumps the same metrics (sent, lateness,
    last dispatch, skipped by policy / grace, caught up) and is reported to
    its entry source, whichever way the batch publishes it."""
    lock, term = rig.lead("a")
    runner = rig.runner(lock, broker=other_redis_url if path == "other-broker" else None)
    kinds: dict[str, dict[str, Any]] = {
        "all": {"catch_up": "all"},
        "latest": {"catch_up": "latest"},
        "none": {"catch_up": "none"},
        "grace": {"catch_up": "all", "misfire_grace": 100},
        "gone": {"catch_up": "none", "misfire_grace": 0.5},
    }
    entries = [replace(entry_from_config(f"{kind}-{i}", {
        "task": "proj.job", "schedule": crontab(minute="*"), **spec}, runner.app),
        source="recording") for kind, spec in kinds.items() for i in range(3)]
    runner.source = source = RecordingSource(entries)
    loaded = runner._load(FIRE - timedelta(minutes=3, seconds=30))
    # Due: FIRE-3, -2, -1 min and FIRE; the first two were missed (before started_at).
    started_at, now = FIRE - timedelta(seconds=90), FIRE + timedelta(seconds=1)
    before = time.time()

    def noticed(*args: Any, **kwargs: Any) -> None:
        pass

    if path == "send_task":
        before_task_publish.connect(noticed, weak=False)
    try:
        assert runner._fire_all_due(loaded, term, now, started_at)
    finally:
        before_task_publish.disconnect(noticed)

    minutes = {m: FIRE + timedelta(minutes=m) for m in (-3, -2, -1, 0)}
    sent_of = {"all": [-3, -2, -1, 0], "latest": [-2, -1, 0], "none": [-1, 0],
               "grace": [-1, 0], "gone": []}
    expected = {(f"{kind}-{i}", minutes[m], True) for kind, ms in sent_of.items()
                for i in range(3) for m in ms}
    expected |= {(f"gone-{i}", FIRE, False) for i in range(3)}  # claimed, passed over
    assert sorted(source.claims) == sorted(expected)
    stats = runner.stats
    assert runner.dispatched == stats.dispatched[""] == 3 * (4 + 3 + 2 + 2) == 33
    assert stats.lateness[""].count == 33
    assert stats.last_dispatch >= before
    assert stats.skipped == {("", "catch_up_policy"): 3 * (1 + 2 + 2),
                             ("", "misfire_grace"): 3 * (2 + 2)}
    assert stats.caught_up == {"": 3 * (2 + 1)}
    assert len(stats.recent) == 20 and all(r.term == term for r in stats.recent)


def test_a_refused_batch_counts_only_the_entries_that_went_through(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    runner.herd.batch_size = 10
    entries = [entry_from_config(f"e{i:02d}", {"task": "proj.job", "catch_up": "latest",
                                               "schedule": crontab(minute="*")}, runner.app)
               for i in range(25)]
    runner.config_entries = {e.name: e for e in entries}
    loaded = runner._load(FIRE - timedelta(minutes=2, seconds=30))
    real = runner.herd.script
    calls = [0]

    def deposed_after_two(term: int, keys: Any = (), args: Any = ()) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            rig.lead("b")
        return real(term, keys=keys, args=args)

    runner.herd.script = deposed_after_two  # type: ignore[assignment]
    # Three ticks due per entry (FIRE-2, -1 min, FIRE), all missed: the latest is
    # sent, two skipped.  One claim per entry: two batches of 10 went through.
    assert not runner._fire_all_due(loaded, term, FIRE + timedelta(seconds=1),
                                    FIRE + timedelta(minutes=5))
    assert runner.dispatched == runner.stats.dispatched[""] == 20
    assert runner.stats.skipped == {("", "catch_up_policy"): 40, ("", "misfire_grace"): 0}
    assert runner.stats.caught_up == {"": 20}


def test_the_loop_builds_templates_while_idle_before_the_herd(rig: Rig) -> None:
    """Templates are built ahead, between ticks, so the herd renders only; and
    entries alike share one kombu publish (one build for 300 entries)."""
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    entries = [entry_from_config(f"w{i}", {"task": "proj.job", "args": [i],
                                          "schedule": crontab(minute=0, hour=0)}, runner.app)
               for i in range(300)]
    runner.config_entries = {e.name: e for e in entries}
    # Midnight (their tick) is 45 s away: within TEMPLATES_AHEAD, so built ahead.
    shift = (int(time.time()) // 86400 + 1) * 86400 - 45 - time.time()
    runner._now = lambda: time.time() + shift  # type: ignore[method-assign]
    builds: list[str] = []
    real_send = runner.herd.send
    runner.herd.send = lambda *a: builds.append("send") or real_send(*a)  # type: ignore
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(term, stop), daemon=True)
    thread.start()
    try:
        wait_until(lambda: not runner._cold and len(runner.herd._templates) == 300, 30,
                   "templates built while idle")
        assert builds == ["send"]
        assert all(runner.herd._templates[e.name][1] is not None for e in entries)
    finally:
        stop.set()
        runner.wake()
        thread.join(10)
    assert not thread.is_alive()


def test_batches_acknowledged_by_replicas_are_not_pipelined(rig: Rig) -> None:
    """A pipelined batch's WAIT would go on another connection and prove nothing."""
    lock, _ = rig.lead("a")
    runner = rig.runner(lock)
    assert runner.herd._pipelining()
    lock.wait_replicas = 1
    assert not runner.herd._pipelining()
