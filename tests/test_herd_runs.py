"""An entry source's run count, kept by the call that claims the tick
(HERD_DISPATCH_LUA with run records, source.RecordsRuns).

Against a real Redis as lease store and broker (and a second database as
"another broker"): a published claim is counted in the same script call that
claims (and pushes) it, whichever way it publishes, pipelined or not; a claim
passed over, a claim already made, a refused (fenced) batch or a batch that
fails count nothing, and a failing count claims nothing.  Entries of no
source add no argument to the script.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest
import redis
from celery import Celery

from celery_leader.election.redislock import RedisLock
from celery_leader.schedule.entries import Entry, entry_from_config
from celery_leader.schedule.herd import HERD_ARGS_PER_TICK, HERD_BATCH_ARGS, Claim
from celery_leader.schedule.runner import ScheduleRunner
from celery_leader.schedule.source import RecordsRuns, RunRecord
from celery_leader.schedule.store import to_ms
from tests.test_atomic_publish import Rig
from tests.test_herd import RecordingSource

UTC = timezone.utc
FIRE = to_ms(datetime(2031, 3, 4, 5, 0, tzinfo=UTC))
MINUTE = 60_000


class CountingSource(RecordingSource):
    """An EntrySource that counts runs in ``key`` (pk = the entry's name + '-pk')."""

    def __init__(self, key: str, entries: list[Entry], base: int = 10) -> None:
        super().__init__(entries)
        self.key = key
        self.base = base

    def run_record(self, entry: Entry) -> RunRecord | None:
        if entry.name not in self.served:
            return None
        return RunRecord(self.key, f"{entry.name}-pk", self.base)


@pytest.fixture
def rig(redis_url: str, election_name: str) -> Iterator[Rig]:
    made = Rig(redis_url, election_name)
    yield made
    made.close()


def counted(app: Celery, name: str) -> Entry:
    return replace(entry_from_config(name, {"task": "proj.job", "schedule": 60.0,
                                            "args": [name]}, app), source="counting")


def plain(app: Celery, name: str) -> Entry:
    return entry_from_config(name, {"task": "proj.job", "schedule": 60.0, "args": [name]}, app)


def with_source(rig: Rig, lock: RedisLock, broker: str | None = None,
                names: tuple[str, ...] = ("a", "b", "c")) -> tuple[ScheduleRunner,
                                                                   CountingSource]:
    runner = rig.runner(lock, broker=broker)
    key = lock.key("schedule:counted-runs")  # in the schedule's hash slot
    source = CountingSource(key, [counted(runner.app, n) for n in names])
    runner.source = source
    return runner, source


def runs(rig: Rig, source: CountingSource) -> dict[str, dict[str, Any]]:
    return {k.decode(): json.loads(v) for k, v in rig.client.hgetall(source.key).items()}


def count_of(record: dict[str, Any]) -> tuple[int, int]:
    """(total runs, last fire ms), as the django source writes them back."""
    return int(record["base"]) + int(record["count"]), int(record["last"])


@pytest.mark.parametrize("path", ["push", "other-broker", "pipelined"])
def test_every_published_claim_is_counted_in_its_claim_and_nothing_else(
        rig: Rig, other_redis_url: str, path: str) -> None:
    lock, term = rig.lead("a")
    runner, source = with_source(rig, lock,
                                 broker=other_redis_url if path == "other-broker" else None)
    if path == "pipelined":
        runner.herd.batch_size = 2
    a, b, c = (source.served[n] for n in "abc")
    claims = [Claim(a, FIRE - 2 * MINUTE, True), Claim(a, FIRE - MINUTE, True),
              Claim(a, FIRE, True),  # catch-up: three ticks of one entry, one batch or more
              Claim(b, FIRE, True), Claim(plain(runner.app, "p"), FIRE, True),
              Claim(c, FIRE, False)]  # passed over: claimed, not sent, not counted
    pipelined_before = runner.herd.pipelined_batches
    assert runner.herd.dispatch(claims, term)
    if path == "pipelined":
        assert runner.herd.pipelined_batches > pipelined_before
    assert {name: count_of(r) for name, r in runs(rig, source).items()} == {
        "a": (13, FIRE), "b": (11, FIRE)}
    assert runs(rig, source)["a"]["pk"] == "a-pk"
    sent = redis.Redis.from_url(other_redis_url if path == "other-broker" else rig.lease_url)
    assert sent.llen("celery") == 5  # what was counted (4) was sent, and "p"
    sent.close()
    # The same claims again: already claimed, sent and counted; nothing twice.
    assert runner.herd.dispatch(claims, term)
    assert {name: count_of(r) for name, r in runs(rig, source).items()} == {
        "a": (13, FIRE), "b": (11, FIRE)}
    # The next tick counts on, whatever base the source now says.
    source.base = 99
    assert runner.herd.dispatch([Claim(b, FIRE + MINUTE, True)], term)
    assert count_of(runs(rig, source)["b"]) == (12, FIRE + MINUTE)


def test_a_record_of_another_identity_starts_afresh_and_an_old_record_counts_on(
        rig: Rig) -> None:
    """Records written before (the same JSON as the old per-tick script's) go on;
    one of another row id (the row was deleted and made again) starts afresh."""
    lock, term = rig.lead("a")
    runner, source = with_source(rig, lock)
    rig.client.hset(source.key, mapping={
        "a": json.dumps({"pk": "a-pk", "base": "3", "count": 4, "last": str(FIRE - MINUTE)}),
        "b": json.dumps({"pk": "old-pk", "base": "3", "count": 4, "last": "1"}),
        "c": "not json"})
    a, b, c = (source.served[n] for n in "abc")
    assert runner.herd.dispatch([Claim(e, FIRE, True) for e in (a, b, c)], term)
    assert {name: count_of(r) for name, r in runs(rig, source).items()} == {
        "a": (8, FIRE), "b": (11, FIRE), "c": (11, FIRE)}


def test_a_refused_batch_counts_nothing_and_a_failing_count_claims_nothing(
        rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner, source = with_source(rig, lock)
    a, b = source.served["a"], source.served["b"]
    # The runs hash cannot be written (a string): the whole batch fails,
    # before its push and its claims.
    rig.client.set(source.key, "in the way")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        runner.herd.dispatch([Claim(a, FIRE, True), Claim(b, FIRE, True)], term)
    assert rig.client.llen("celery") == 0
    assert rig.client.hlen(lock.key("schedule:state")) == 0
    rig.client.delete(source.key)
    # Deposed: the batch is refused whole, its count too.
    rig.lead("b")
    assert not runner.herd.dispatch([Claim(a, FIRE, True)], term)
    assert rig.client.exists(source.key) == 0 and rig.client.llen("celery") == 0


def test_entries_of_no_source_pay_no_argument(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner, source = with_source(rig, lock)
    batch = [Claim(plain(runner.app, f"p{i}"), FIRE, True) for i in range(50)]
    prepared = runner.herd._prepare(batch, term, atomic=True)
    assert len(prepared.args) == HERD_BATCH_ARGS + HERD_ARGS_PER_TICK * len(batch)
    assert len(prepared.keys) == 6 + 1  # the schedule's and the broker list
    # A source without run records (the RecordsRuns protocol) counts nothing either.
    assert isinstance(source, RecordsRuns)
    runner.source = None
    prepared = runner.herd._prepare([Claim(source.served["a"], FIRE, True)], term, True)
    assert len(prepared.args) == HERD_BATCH_ARGS + HERD_ARGS_PER_TICK
