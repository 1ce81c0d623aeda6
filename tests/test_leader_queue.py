"""The reliable leader queue (celery_leader/leaderqueue.py) against a real Redis.

Messages are published by a plain Celery app (no install()) exactly as senders
do, and read back through the same scripts a leading worker runs.  The fault
tests with real workers (crash, partition, freeze) are in
test_leader_queue_faults.py; this file pins each step of the mechanism.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_leader.leaderqueue import (
    DELIVERY_HEADER,
    FinishRun,
    LeaderQueue,
    inflight_key,
    task_claim_key,
)
from celery_leader.redislock import RedisLock
from celery_leader.taskruns import done_ttl_ms
from tests.celery_procs import Cluster, wait_until
from tests.test_scheduler_unit import lead

QUEUE = "celery_leader"


class Rig:
    def __init__(self, redis_url: str, name: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.name = name
        self.sender = Celery("sender", broker=redis_url, set_as_current=False)
        self.received: list[Any] = []
        self.guarded: set[str] = set()

    def send(self, label: str, task: str = "proj.leader_work") -> str:
        return str(self.sender.send_task(task, args=[label], queue=QUEUE).id)

    def queue(self, lock: RedisLock) -> LeaderQueue:
        leader_queue = LeaderQueue(lock, QUEUE, keeps_record=self.guarded.__contains__,
                                   deliver=lambda callback: callback(),
                                   handler=lambda: self.received.append, capacity=lambda: 10)
        leader_queue.use_lists([QUEUE])
        return leader_queue

    def records(self, lock: RedisLock) -> dict[str, dict[str, Any]]:
        return {tag.decode(): json.loads(raw)
                for tag, raw in self.client.hgetall(inflight_key(lock)).items()}

    def waiting_ids(self) -> list[str]:
        """Task ids in the list, oldest (next to be taken) first."""
        return [json.loads(raw)["headers"]["id"]
                for raw in reversed(self.client.lrange(QUEUE, 0, -1))]

    def close(self) -> None:
        self.sender.close()
        self.client.close()


@pytest.fixture
def rig(redis_url: str, election_name: str) -> Iterator[Rig]:
    made = Rig(redis_url, election_name)
    yield made
    made.close()


def run_until(queue: LeaderQueue, term: int, done: Any, timeout: float = 10.0) -> None:
    """Run the take loop in a thread until ``done()``; always stopped."""
    stop = threading.Event()
    thread = threading.Thread(target=queue.run, args=(term, stop), daemon=True)
    thread.start()
    try:
        wait_until(done, timeout, "the leader queue loop")
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_taking_records_each_message_in_flight_under_the_term_in_the_same_step(
        rig: Rig) -> None:
    lock, term = lead(rig.client, rig.name, "a")
    ids = [rig.send(f"m{i}") for i in range(3)]
    run_until(rig.queue(lock), term, lambda: len(rig.received) == 3)

    assert [message.headers["id"] for message in rig.received] == ids  # FIFO
    assert rig.client.llen(QUEUE) == 0
    records = rig.records(lock)
    assert sorted(record["id"] for record in records.values()) == sorted(ids)
    assert {record["term"] for record in records.values()} == {term}
    for message in rig.received:  # the task sees which record is its own
        assert message.headers[DELIVERY_HEADER] == message.delivery_tag
        assert message.delivery_tag in records


def test_a_deposed_term_takes_nothing(rig: Rig) -> None:
    old_lock, old_term = lead(rig.client, rig.name, "a")
    lead(rig.client, rig.name, "b")
    ids = [rig.send("m0")]
    stop = threading.Event()
    rig.queue(old_lock).run(old_term, stop)  # returns at once: fenced

    assert rig.received == []
    assert rig.waiting_ids() == ids
    assert rig.records(old_lock) == {}


def test_the_doorbell_waits_without_taking_even_when_its_client_dies(
        rig: Rig, redis_url: str) -> None:
    # The worst case for a blocking pop: a client blocked on the list when the
    # message arrives, and gone before it can read the reply.
    doorbell = redis.Redis.from_url(redis_url, socket_timeout=10, client_name="doorbell-test")
    blocked = threading.Thread(
        target=lambda: doorbell.execute_command("BLMOVE", QUEUE, QUEUE, "RIGHT", "RIGHT", 5),
        daemon=True)
    blocked.start()
    wait_until(lambda: any(b"name=doorbell-test" in line and b"cmd=blmove" in line
                           for line in rig.client.execute_command(
                               "CLIENT", "LIST", "TYPE", "normal").splitlines()),
               5, "the doorbell to block")
    task_id = rig.send("m0")
    blocked.join(5)
    doorbell.close()
    assert rig.waiting_ids() == [task_id]


def test_the_next_term_requeues_what_an_older_term_left_unfinished_and_drops_the_finished(
        rig: Rig) -> None:
    old_lock, old_term = lead(rig.client, rig.name, "a")
    rig.guarded.add("proj.leader_work")  # bodies end their own records
    unfinished, finished = rig.send("unfinished"), rig.send("finished")
    run_until(rig.queue(old_lock), old_term, lambda: len(rig.received) == 2)
    FinishRun(old_lock)(finished, True, 60_000, rig.received[1].delivery_tag)
    for message in rig.received:
        message.ack()  # an early ack: the record of the unfinished body stays
    assert [r["id"] for r in rig.records(old_lock).values()] == [unfinished]
    later = rig.send("later")  # waits behind the recovered one

    lock, term = lead(rig.client, rig.name, "b")
    assert rig.queue(lock).recover(term)

    assert rig.waiting_ids() == [unfinished, later]
    assert rig.records(lock) == {}
    assert rig.client.get(task_claim_key(lock, finished)) == b"done"


def test_ack_of_a_plain_message_ends_its_record_and_a_requeue_puts_it_back_first(
        rig: Rig) -> None:
    lock, term = lead(rig.client, rig.name, "a")
    acked, requeued = rig.send("acked"), rig.send("requeued")
    run_until(rig.queue(lock), term, lambda: len(rig.received) == 2)
    later = rig.send("later")
    rig.received[0].ack()
    rig.received[1].reject(requeue=True)

    assert rig.records(lock) == {}
    assert rig.waiting_ids() == [requeued, later]
    assert acked not in rig.waiting_ids()


def test_recover_of_a_deposed_term_is_refused(rig: Rig) -> None:
    old_lock, old_term = lead(rig.client, rig.name, "a")
    rig.send("m0")
    run_until(rig.queue(old_lock), old_term, lambda: len(rig.received) == 1)
    lock, _term = lead(rig.client, rig.name, "b")
    assert not rig.queue(old_lock).recover(old_term)
    assert rig.client.llen(QUEUE) == 0 and len(rig.records(lock)) == 1


@pytest.mark.integration
@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_a_running_leader_task_is_in_flight_under_its_term_not_in_kombus_unacked(
        tmp_path: Path, redis_url: str, election_name: str, pool: str) -> None:
    cluster = Cluster(tmp_path, redis_url, election_name)
    try:
        cluster.start(1, pool=pool)
        _leader, started = cluster.wait_leader(timeout=45)
        sent_at = time.monotonic()
        [task_id] = cluster.send({"task": "leader_work", "args": ["slow", 1.5]})
        start = cluster.events.wait_kind("task_start", 20)[0]
        assert start["term"] == started["term"]
        client = cluster.events.client
        lock = RedisLock(client, name=election_name, identity="observer")
        records = {json.loads(raw)["id"]: json.loads(raw)
                   for raw in client.hvals(inflight_key(lock))}
        assert records[task_id]["term"] == started["term"]
        assert not client.exists("unacked"), "kombu took a leader-queue message"
        cluster.events.wait_kind("task_done", 20)
        wait_until(lambda: not client.hlen(inflight_key(lock)), 10, "the record to end")
        assert client.get(task_claim_key(lock, task_id)) == b"done"
        # Kept while a copy can still arrive (kombu's visibility timeout), not a day.
        assert 3600_000 < client.pttl(task_claim_key(lock, task_id)) <= done_ttl_ms({})
        assert start["at"] - sent_at < 5
    finally:
        cluster.stop()
        cluster.events.close()
