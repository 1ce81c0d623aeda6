"""What celery-leader keeps in Redis is bounded by the schedule and the work in
flight, never by how many ticks ran or how long the cluster lived.

The start tokens of ticks are covered in tests/test_tick_start.py (the number
of keys after many ticks); here: the progress of entries that left the
schedule (schedule/forget.py), and the replica registry (status.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_leader.schedule.entries import entry_from_config
from celery_leader.schedule.forget import FORGET_AFTER_MS
from celery_leader.status import ReplicaRegistry
from celery_leader.taskruns import DONE_AFTER_REDELIVERY_S, done_ttl_ms
from tests.sched_procs import Replicas
from tests.test_atomic_publish import FIRE, Rig
from tests.waiting import wait_until

DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def rig(redis_url: str, election_name: str) -> Iterator[Rig]:
    made = Rig(redis_url, election_name)
    yield made
    made.close()


def now_ms() -> int:
    return int(time.time() * 1000)


def state(last_ms: int) -> str:
    return json.dumps({"last": last_ms, "term": 1, "election": "x", "task_id": "t",
                       "skipped": False})


def seed(client: Any, lock: Any) -> None:
    """Progress of entries the schedule has, and of some it no longer has."""
    old, recent = now_ms() - FORGET_AFTER_MS - DAY_MS, now_ms() - 60_000
    client.hset(lock.key("schedule:state"), mapping={
        "kept": state(old),  # in beat_schedule: always kept
        "runtime": state(old),  # a runtime entry: kept (its removal takes it along)
        "gone-old": state(old),  # removed, last ticked long ago: forgotten
        "gone-recent": state(recent),  # removed, ticked a minute ago: kept for now
    })
    client.hset(lock.key("schedule:first-seen"), mapping={
        "gone-old": str(old), "never-ticked-old": str(old), "never-ticked-new": str(recent)})
    client.hset(lock.key("schedule:entries"), "runtime",
                json.dumps({"task": "proj.job", "schedule": 60}))


def test_the_progress_of_entries_long_gone_from_the_schedule_is_forgotten(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    runner.config_entries = {"kept": entry_from_config(
        "kept", {"task": "proj.job", "schedule": 60.0}, runner.app)}
    seed(rig.client, lock)
    loaded = runner._load(FIRE)
    assert runner._forget_removed(loaded, term)
    states = set(rig.client.hkeys(lock.key("schedule:state")))
    first_seen = set(rig.client.hkeys(lock.key("schedule:first-seen")))
    assert states == {b"kept", b"runtime", b"gone-recent"}
    assert b"gone-old" not in first_seen and b"never-ticked-old" not in first_seen
    assert b"never-ticked-new" in first_seen


def test_a_deposed_leader_forgets_nothing(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    seed(rig.client, lock)
    loaded = runner._load(FIRE)
    rig.lead("b")
    assert not runner._forget_removed(loaded, term)
    assert b"gone-old" in set(rig.client.hkeys(lock.key("schedule:state")))


@pytest.mark.integration
def test_a_leading_worker_forgets_what_removed_entries_left(
        tmp_path: Path, redis_url: str, election_name: str) -> None:
    replicas = Replicas(tmp_path, redis_url, election_name)
    key = f"celery-leader:{{{election_name}}}:schedule:"
    try:
        old = now_ms() - FORGET_AFTER_MS - DAY_MS
        replicas.client.hset(key + "state", "removed-long-ago", state(old))
        replicas.client.hset(key + "first-seen", "removed-long-ago", str(old))
        replicas.worker()
        replicas.wait_leader(election_name)
        wait_until(lambda: not replicas.client.hexists(key + "state", "removed-long-ago")
                   and not replicas.client.hexists(key + "first-seen", "removed-long-ago"),
                   30, "the removed entry's progress to be forgotten", replicas.logs)
        assert "forgot the progress of 1 entries" in replicas.logs()
    finally:
        replicas.stop()


def test_replicas_killed_without_a_goodbye_leave_the_registry_without_a_reader(
        rig: Rig) -> None:
    """Only a reader of the page forgot them: every deploy's pod names stayed."""
    lock, _ = rig.lead("a")
    registry = ReplicaRegistry(lock, "alive", interval=0.05)
    stale = json.dumps({"role": "follower", "term": 0, "at_ms": now_ms() - 3_600_000})
    rig.client.hset(registry.key, mapping={f"killed-{n}": stale for n in range(50)})
    stop = threading.Event()
    beating = threading.Thread(target=registry.run, args=(stop, lambda: (False, 0)))
    beating.start()
    try:
        wait_until(lambda: rig.client.hkeys(registry.key) == [b"alive"], 10,
                   "the killed replicas to be forgotten")
    finally:
        stop.set()
        beating.join(10)


def test_a_finished_task_id_is_kept_as_long_as_a_copy_can_arrive() -> None:
    assert done_ttl_ms({}) == (3600 + DONE_AFTER_REDELIVERY_S) * 1000
    assert done_ttl_ms({"visibility_timeout": 7200}) == (7200 + DONE_AFTER_REDELIVERY_S) * 1000
    assert done_ttl_ms({"visibility_timeout": 60}) == done_ttl_ms({})
    assert done_ttl_ms({"visibility_timeout": "nonsense"}) == done_ttl_ms({})
