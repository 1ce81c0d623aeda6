"""A tick counts as done when its task starts (celery_leader/tickstart.py).

Against a real Redis used as lease store and broker: the tick is pushed by the
scheduler's fenced publish (the herd's claim, or PUBLISH_TICK_LUA for a tick
sent through send_task: tests parametrized over ``path`` run both), taken out
of the broker list the way a consumer that then dies would take it, and found
again by the leader's sweep.  That a real worker's copy runs once is shown at
the end and by the fault tests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_leader.redislock import FENCED
from celery_leader.schedule.entries import entry_from_config
from celery_leader.schedule.herd import pending_message
from celery_leader.schedule.tickstart import (
    LIST_SCAN,
    MAX_COPIES,
    MAX_UNSTARTED_MS,
    START_TICK_LUA,
    LostTicks,
    TickStartClaim,
    guard_tick_starts,
    read_sent_record,
    sent_record,
)
from tests.celery_procs import wait_until
from tests.dispatch import fire as dispatch
from tests.test_atomic_publish import FIRE, PATHS, Rig

QUEUE = "celery"


@pytest.fixture
def rig(redis_url: str, election_name: str) -> Iterator[Rig]:
    made = Rig(redis_url, election_name)
    yield made
    made.close()


def sent(rig: Rig, lock: Any) -> dict[str, Any]:
    runner_keys = lock.key("schedule:sent")
    return {tick.decode(): read_sent_record(raw)
            for tick, raw in rig.client.hgetall(runner_keys).items()}


def look_now(rig: Rig, lock: Any) -> None:
    """Make every sent tick due for the sweep (instead of waiting its delay)."""
    key = lock.key("schedule:sent-at")
    for tick in rig.client.zrange(key, 0, -1):
        rig.client.zadd(key, {tick: 0})


def fire(rig: Rig, **conf: Any) -> tuple[Any, int, Any, str]:
    lock, term = rig.lead("a")
    runner = rig.runner(lock, **conf)
    tick = rig.fire(runner, term)
    return lock, term, runner, tick


@pytest.mark.parametrize("path", PATHS)
def test_the_push_records_the_tick_as_sent_in_the_same_step(rig: Rig, path: str) -> None:
    lock, _, runner, tick = fire(rig, send_task=path == "send_task")
    [record] = sent(rig, lock).values()
    [(key, payload)] = record["pushes"]
    assert key == QUEUE and rig.client.lrange(QUEUE, 0, -1) == [payload.encode()]
    assert record["tags"] == [json.loads(payload)["properties"]["delivery_tag"]]
    assert record["unacked"] == "unacked"
    headers = json.loads(payload)["headers"]
    assert headers["leader_tick"] == tick
    assert headers["leader_tick_keys"] == [lock.key("schedule:started"),
                                           lock.key("schedule:sent"),
                                           lock.key("schedule:sent-at")]
    due = rig.client.zscore(lock.key("schedule:sent-at"), tick)
    assert due is not None and due > time.time() * 1000 + 0.9 * runner.tick_look_after * 1000


def test_the_sent_record_keeps_the_message_verbatim_after_a_small_head(rig: Rig) -> None:
    """Not JSON-encoded a second time: the record is a head, a newline, the message."""
    lock, _, _, tick = fire(rig)
    raw = rig.client.hget(lock.key("schedule:sent"), tick) or b""
    [payload] = rig.client.lrange(QUEUE, 0, -1)
    head, _, rest = raw.partition(b"\n")
    assert rest == payload
    assert json.loads(head)["pushes"] == [[QUEUE, len(payload)]]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", ["head-and-messages", "older-all-json"])
def test_the_sweep_pushes_a_swallowed_tick_again_from_either_record_form(
        rig: Rig, form: str, path: str) -> None:
    lock, term, runner, tick = fire(rig, send_task=path == "send_task")
    [payload] = rig.client.lrange(QUEUE, 0, -1)
    sent_key = lock.key("schedule:sent")
    record = read_sent_record(rig.client.hget(sent_key, tick) or b"")
    if form == "older-all-json":  # written by a leader of the previous version
        rig.client.hset(sent_key, tick, json.dumps(record))
    rig.client.rpop(QUEUE)  # popped by a consumer that died before kombu recorded it
    look_now(rig, lock)
    assert LostTicks(lock, runner.ticks, look_after=60).repush(term)
    assert rig.client.lrange(QUEUE, 0, -1) == [payload]
    again = read_sent_record(rig.client.hget(sent_key, tick) or b"")
    assert again == {**record, "copies": 1}
    look_now(rig, lock)
    assert LostTicks(lock, runner.ticks, look_after=60).repush(term)  # waiting: not again
    assert rig.client.llen(QUEUE) == 1


def test_an_unreadable_or_truncated_sent_record_is_dropped_by_the_sweep(rig: Rig) -> None:
    lock, term, runner, tick = fire(rig)
    sent_key = lock.key("schedule:sent")
    raw = rig.client.hget(sent_key, tick) or b""
    rig.client.hset(sent_key, tick, raw[:-5])  # shorter than its head says
    rig.client.rpop(QUEUE)
    look_now(rig, lock)
    assert LostTicks(lock, runner.ticks, look_after=60).repush(term)
    assert rig.client.llen(QUEUE) == 0 and sent(rig, lock) == {}
    assert rig.client.zcard(lock.key("schedule:sent-at")) == 0
    with pytest.raises(ValueError):
        read_sent_record(raw[:-5])


def test_only_the_first_copy_starts_and_a_lost_reply_asked_again_still_runs(rig: Rig) -> None:
    lock, _, runner, tick = fire(rig)
    keys = runner.ticks.headers(tick)["leader_tick_keys"]
    claim = TickStartClaim(lambda: rig.client)
    assert claim.claim(tick, keys)
    assert not claim.claim(tick, keys)  # another copy
    assert sent(rig, lock) == {}
    assert rig.client.zcard(lock.key("schedule:sent-at")) == 0
    # The same attempt asking again (its reply was lost) is told to run, another not.
    rig.client.hset(keys[1], "t@2", sent_record([], [], "", at_ms=0))
    start = rig.client.register_script(START_TICK_LUA)
    assert start(keys=keys, args=["t@2", "attempt-1", 60_000]) == 1
    assert start(keys=keys, args=["t@2", "attempt-1", 60_000]) == 1
    assert start(keys=keys, args=["t@2", "attempt-2", 60_000]) == 0


def test_a_swallowed_tick_is_sent_again_and_a_waiting_or_held_one_is_not(rig: Rig) -> None:
    lock, term, runner, tick = fire(rig)
    lost = LostTicks(lock, runner.ticks, look_after=60)
    [payload] = rig.client.lrange(QUEUE, 0, -1)

    look_now(rig, lock)
    assert lost.repush(term)  # still waiting in its list: nothing to do
    assert rig.client.llen(QUEUE) == 1

    rig.client.rpop(QUEUE)  # delivered, and held in kombu's unacked hash
    tag = json.loads(payload)["properties"]["delivery_tag"]
    rig.client.hset("unacked", tag, payload)
    look_now(rig, lock)
    assert lost.repush(term)
    assert rig.client.llen(QUEUE) == 0

    rig.client.hdel("unacked", tag)  # a consumer popped it and died before recording it
    look_now(rig, lock)
    assert lost.repush(term)
    assert rig.client.lrange(QUEUE, 0, -1) == [payload]
    assert sent(rig, lock)[tick]["copies"] == 1
    # Looked at again only after twice the delay.
    due = rig.client.zscore(lock.key("schedule:sent-at"), tick)
    assert due is not None and due > time.time() * 1000 + 110_000


def test_a_started_tick_leaves_nothing_to_sweep_and_a_deposed_term_sweeps_nothing(
        rig: Rig) -> None:
    lock, term, runner, tick = fire(rig)
    rig.client.rpop(QUEUE)
    lead_b, term_b = rig.lead("b")
    look_now(rig, lock)
    assert LostTicks(lock, runner.ticks, 60)._repush(
        term, keys=[runner.ticks.sent, runner.ticks.sent_at],
        args=[60_000, 100, 1000, MAX_COPIES, MAX_UNSTARTED_MS]) == FENCED
    assert rig.client.llen(QUEUE) == 0
    assert TickStartClaim(lambda: rig.client).claim(tick, runner.ticks.headers(tick)[
        "leader_tick_keys"])
    assert sent(rig, lock) == {} and rig.client.zcard(lock.key("schedule:sent-at")) == 0
    assert LostTicks(lead_b, runner.ticks, 60).repush(term_b)
    assert rig.client.llen(QUEUE) == 0


def test_a_task_body_runs_for_the_copy_that_claims_the_start_only(rig: Rig) -> None:
    from celery.exceptions import Ignore

    _lock, _, runner, tick = fire(rig)
    app = Celery("guarded", set_as_current=False)
    runs: list[str] = []

    @app.task(bind=True)
    def job(self: Any, label: str) -> str:
        runs.append(label)
        return label

    guard_tick_starts(app.tasks, TickStartClaim(lambda: rig.client))
    headers = runner.ticks.headers(tick)
    assert _run_with_request(job, headers, "first") == "first"
    with pytest.raises(Ignore):
        _run_with_request(job, headers, "second")
    assert _run_with_request(job, {}, "plain") == "plain"  # not a tick: never claimed
    assert runs == ["first", "plain"]


def _run_with_request(task: Any, headers: dict[str, Any], label: str) -> Any:
    task.push_request(**headers)
    try:
        return task.run(label)
    finally:
        task.pop_request()


@contextmanager
def one_worker(tmp_path: Path, redis_url: str,
               election_name: str) -> Iterator[tuple[Any, redis.Redis, list[str], Celery]]:
    """A real prefork worker with install(app); the tick keys of its election and a
    sender app; everything stopped afterwards, whatever happened."""
    from tests.celery_procs import Cluster

    client = redis.Redis.from_url(redis_url)
    cluster = Cluster(tmp_path, redis_url, election_name)
    sender = Celery("sender", broker=redis_url, set_as_current=False)
    try:
        cluster.start(1, pool="prefork")
        cluster.wait_ready(timeout=45)
        keys = [f"celery-leader:{{{election_name}}}:schedule:{suffix}"
                for suffix in ("started", "sent", "sent-at")]
        yield cluster, client, keys, sender
    finally:
        sender.close()
        cluster.stop()
        cluster.events.close()
        client.close()


@pytest.mark.integration
def test_a_real_worker_runs_a_tick_once_whatever_copies_reach_it(
        tmp_path: Path, redis_url: str, election_name: str) -> None:
    with one_worker(tmp_path, redis_url, election_name) as (cluster, client, keys, sender):
        # The token a leader's claim writes (sent_record without pushes: another broker).
        client.hset(keys[1], "t@1", sent_record([], [], "", at_ms=int(time.time() * 1000)))
        for copy in range(3):
            sender.send_task("tests.apps.leader_app.plain_work", args=[f"copy{copy}"],
                             headers={"leader_tick": "t@1", "leader_tick_keys": keys})
        wait_until(lambda: cluster.logs().count("already started; skipping") == 2, 30,
                   "two copies to be skipped", cluster.logs)
        assert len(cluster.events.of("plain_start")) == 1, cluster.events.dump()
        assert not client.hexists(keys[1], "t@1")  # the token is consumed ...
        assert client.zcard(keys[0]) == 1  # ... its attempt remembered (ATTEMPT_TTL_MS)


@pytest.mark.integration
def test_a_tick_that_expired_before_it_started_consumes_its_token_without_running(
        tmp_path: Path, redis_url: str, election_name: str) -> None:
    """Celery revokes it before its body: its token would otherwise wait a week."""
    with one_worker(tmp_path, redis_url, election_name) as (cluster, client, keys, sender):
        client.hset(keys[1], "t@2", sent_record([], [], "", at_ms=int(time.time() * 1000)))
        client.zadd(keys[2], {"t@2": time.time() * 1000 + 60_000})
        sender.send_task("tests.apps.leader_app.plain_work", args=["expired"],
                         expires=datetime.now(UTC) - timedelta(seconds=5),
                         headers={"leader_tick": "t@2", "leader_tick_keys": keys})
        wait_until(lambda: not client.hexists(keys[1], "t@2"), 30,
                   "the expired tick's token to be consumed", cluster.logs)
        assert client.zcard(keys[2]) == 0
        assert "revoked before it started" in cluster.logs()
        assert not cluster.events.of("plain_start"), cluster.events.dump()


def test_a_tick_in_a_backlog_longer_than_the_search_gets_no_copy_until_it_is_shorter(
        rig: Rig) -> None:
    """A herd leaves thousands of ticks waiting: none may be copied into the backlog."""
    lock, term, runner, tick = fire(rig)
    lost = LostTicks(lock, runner.ticks, look_after=60)
    [payload] = rig.client.rpop(QUEUE, 1)  # swallowed ...
    rig.client.lpush(QUEUE, *[f"other {i}" for i in range(LIST_SCAN + 1)])  # ... in a backlog
    look_now(rig, lock)
    assert lost.repush(term)
    assert rig.client.llen(QUEUE) == LIST_SCAN + 1 and sent(rig, lock)[tick]["copies"] == 0
    rig.client.rpop(QUEUE, 2)  # the backlog drains below the search length
    look_now(rig, lock)
    assert lost.repush(term)
    assert rig.client.lindex(QUEUE, 0) == payload and sent(rig, lock)[tick]["copies"] == 1


def test_entries_sending_an_unregistered_task_are_named_in_one_line(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A herd of 2,000 entries of one task made 2,000 warning lines."""
    lock, _ = rig.lead("a")
    runner = rig.runner(lock)
    entries = {f"h{i}": entry_from_config(f"h{i}", {"task": "not.registered", "schedule": 60},
                                          runner.app) for i in range(50)}
    with caplog.at_level("WARNING", logger="celery_leader.scheduler"):
        runner.config_entries = entries
        runner._load(FIRE)
    lines = [r.getMessage() for r in caplog.records if "does not register" in r.getMessage()]
    assert len(lines) == 1 and "50 entries 'h0', 'h1', 'h2', ... send task" in lines[0], lines


def election_keys(rig: Rig, lock: Any) -> tuple[int, int]:
    """How many keys the election holds in Redis, and their bytes (MEMORY USAGE)."""
    keys = list(rig.client.scan_iter(match=lock.key("*"), count=1000))
    return len(keys), sum(rig.client.memory_usage(key) or 0 for key in keys)


def run_ticks(rig: Rig, lock: Any, term: int, runner: Any, count: int, first: int) -> None:
    """Claim, push, take and start ``count`` ticks of one entry, as a worker would."""
    claim = TickStartClaim(lambda: rig.client)
    for second in range(first, first + count):
        tick = rig.fire(runner, term, at=datetime.fromtimestamp(FIRE.timestamp() + second, UTC))
        assert rig.client.rpop(QUEUE)  # the worker's consumer takes it ...
        assert claim.claim(tick, runner.ticks.headers(tick)["leader_tick_keys"])  # ... starts it


@pytest.mark.parametrize("path", PATHS)
def test_redis_holds_no_more_keys_after_many_ticks_than_after_a_few(
        rig: Rig, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tick once left a start marker for 7 days: one key per tick run."""
    lock, term = rig.lead("a")
    runner = rig.runner(lock, send_task=path == "send_task")
    run_ticks(rig, lock, term, runner, 5, first=0)
    few_keys, few_bytes = election_keys(rig, lock)
    run_ticks(rig, lock, term, runner, 300, first=5)
    many_keys, _ = election_keys(rig, lock)
    assert many_keys == few_keys
    # The attempts of the last minute are kept, then forgotten at the next start.
    monkeypatch.setattr("celery_leader.schedule.tickstart.ATTEMPT_TTL_MS", 0)
    run_ticks(rig, lock, term, runner, 5, first=305)
    later_keys, later_bytes = election_keys(rig, lock)
    assert later_keys == few_keys and later_bytes <= few_bytes + 256, (few_bytes, later_bytes)


def test_a_tick_pushed_again_and_again_without_starting_is_forgotten(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Consumed by a worker without install(app), it would be pushed forever."""
    lock, term, runner, tick = fire(rig)
    lost = LostTicks(lock, runner.ticks, look_after=60)
    for copies in range(1, MAX_COPIES + 1):
        assert rig.client.rpop(QUEUE)  # consumed, never started
        look_now(rig, lock)
        assert lost.repush(term)
        assert sent(rig, lock)[tick]["copies"] == copies
    assert rig.client.rpop(QUEUE)
    look_now(rig, lock)
    with caplog.at_level("ERROR", logger="celery_leader.tickstart"):
        assert lost.repush(term)
    assert sent(rig, lock) == {} and rig.client.zcard(lock.key("schedule:sent-at")) == 0
    assert rig.client.llen(QUEUE) == 0
    assert any(tick in r.getMessage() and "never started" in r.getMessage()
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("path", PATHS)
def test_a_tick_for_another_broker_gets_its_token_with_its_claim_kept_until_old(
        rig: Rig, other_redis_url: str, path: str) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock, broker=other_redis_url, send_task=path == "send_task")
    tick = rig.fire(runner, term)
    [record] = sent(rig, lock).values()
    assert record["pushes"] == []  # the sweep cannot see that broker ...
    lost = LostTicks(lock, runner.ticks, look_after=60)
    look_now(rig, lock)
    assert lost.repush(term)
    assert sent(rig, lock)[tick]["copies"] == 0  # ... so it never pushes it again
    raw = rig.client.hget(lock.key("schedule:sent"), tick) or b""
    head, _, rest = raw.partition(b"\n")
    old = json.dumps({**json.loads(head), "at": int(time.time() * 1000) - MAX_UNSTARTED_MS - 1})
    rig.client.hset(lock.key("schedule:sent"), tick, old.encode() + b"\n" + rest)
    look_now(rig, lock)
    assert lost.repush(term)
    assert sent(rig, lock) == {}


def test_a_copy_of_a_started_tick_sent_again_from_its_pending_copy_is_not_pushed(
        rig: Rig) -> None:
    """A leader sent a tick through send_task and died before clearing its pending
    copy; the tick started.  The next leader's publish finds its token consumed."""
    lock, term = rig.lead("a")
    runner = rig.runner(lock, send_task=True)
    entry = entry_from_config("job", {"task": "proj.job", "schedule": 60.0}, runner.app)
    assert dispatch(runner, entry, FIRE, term, publish=True)
    tick = f"job@{round(FIRE.timestamp() * 1000)}"
    assert rig.client.rpop(QUEUE)
    assert TickStartClaim(lambda: rig.client).claim(tick, runner.ticks.headers(tick)[
        "leader_tick_keys"])
    message = json.loads(pending_copy(entry, tick, term, lock.name))
    rig.client.hset(lock.key("schedule:pending"), tick, json.dumps(message))
    lock_b, term_b = rig.lead("b")
    runner_b = rig.runner(lock_b, send_task=True)
    assert runner_b._recover_pending(term_b)
    assert rig.client.llen(QUEUE) == 0 and rig.pending(lock) == {}


def pending_copy(entry: Any, tick: str, term: int, election: str) -> str:
    fire_ms = int(tick.rpartition("@")[2])
    return pending_message(entry, fire_ms, term, election, "some-task-id", tracked=True)
