"""A leader-only message the leader was running when it died runs again under a
later term, on every broker: real ``celery worker`` processes (prefork), the
lease on the test's Redis, the broker either that same Redis (the leader queue's
in-flight records, leaderqueue.py) or a real RabbitMQ (tests/rabbitmq.py: the
leader queue consumed through kombu, in-flight work recovered by the broker's
redelivery of an unacknowledged message).

The task acks early (Celery's default): the case where the message is gone from
the broker once accepted unless the worker makes it late-acked.  The whole
leader (main process and pool children: a machine or container dying) is
SIGKILLed in the middle of the body.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.celery_procs import FAILOVER_BOUND, Cluster, stopped_at_end, wait_until
from tests.leader_runs import Interruption, check_leader_runs
from tests.rabbitmq import SERVER, RabbitMQ

pytestmark = pytest.mark.integration

APP = "tests.apps.faults_app"
EARLY_TASK = "tests.apps.faults_app.leader_early"
LEADER_QUEUE = "celery_leader"
WORKER_ARGS = ("--without-mingle", "--without-gossip", "--without-heartbeat")
BOOT = 45.0
BODY = 30.0  # the cut-off body: far longer than the test waits for its rerun
SETTLE = 2.0


# The start-up line each broker's worker logs before it is ready (brokers.py).
COLUMNS = {"redis": "guarantees column \"Redis broker on the lease's Redis\": leader queue",
           "rabbitmq": "guarantees column 'RabbitMQ' (transport 'py-amqp'): leader queue "
                       "'celery_leader' is consumed through kombu; leader-only tasks "
                       "acknowledge late with reject-on-worker-lost (made so here: "
                       "tests.apps.faults_app.leader_early"}


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker_url(request: pytest.FixtureRequest, broker: str, redis_url: str) -> str:
    """The broker: the lease's own Redis, or a real RabbitMQ (skips if not installed)."""
    if broker == "redis":
        return redis_url
    return str(request.getfixturevalue("rabbitmq_url"))


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, broker_url: str,
            election_name: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, redis_url, election_name, app=APP,
                   env={"EVENTS_URL": redis_url, "BROKER_URL": broker_url})
    with stopped_at_end(request, made,
                        lambda: f"worker output ({tmp_path}):\n{made.logs()}\n"
                                f"{made.events.dump()}"):
        yield made


class Sender:
    """A plain Celery app sending the early-ack leader-only task to the leader queue."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery("brokers-sender", broker=broker_url, set_as_current=False)
        self.app.conf.broker_connection_retry_on_startup = True
        self.sent: dict[str, str] = {}

    def send(self, label: str, seconds: float = 0.0) -> str:
        result = self.app.send_task(EARLY_TASK, args=[label, seconds], queue=LEADER_QUEUE)
        self.sent[result.id] = label
        return str(result.id)

    def queue_state(self) -> str:
        """The leader queue as the broker sees it (for a failure's report)."""
        try:
            with self.app.connection_for_write() as connection:
                declared = connection.default_channel.queue_declare(LEADER_QUEUE, passive=True)
                return (f"broker: {LEADER_QUEUE} has {declared.message_count} ready "
                        f"message(s), {declared.consumer_count} consumer(s)")
        except Exception as exc:
            return f"broker: cannot look at {LEADER_QUEUE}: {exc!r}"

    def close(self) -> None:
        self.app.close()


def _runs(cluster: Cluster, task_id: str) -> list[dict[str, Any]]:
    return [e for e in cluster.events.of("task_start") if e["task_id"] == task_id]


def test_early_ack_message_cut_off_by_the_leaders_death_runs_under_a_later_term(
        cluster: Cluster, broker: str, broker_url: str) -> None:
    workers = cluster.start(2, "prefork", args=WORKER_ARGS)
    cluster.wait_ready(workers, BOOT)
    for worker in workers:  # said at start, before any leadership, at WARNING
        before_ready = worker.log().split(" ready.", 1)[0]
        assert f"WARNING/MainProcess] celery-leader: {COLUMNS[broker]}" in before_ready, (
            worker.log())
    leader, started = cluster.wait_leader(BOOT)
    term = int(started["term"])
    sender = Sender(broker_url)
    try:
        finished = sender.send("finished")
        wait_until(lambda: cluster.events.of("task_done", task_id=finished), BOOT,
                   "the first message to finish",
                   lambda: f"{sender.queue_state()}\n{cluster.logs()}\n{cluster.events.dump()}")
        cut = sender.send("cut", seconds=BODY)
        [running] = cluster.events.wait_kind("task_start", BOOT,
                                             where=lambda e: e["task_id"] == cut,
                                             what="the long body to start on the leader")
        assert running["term"] == term, running
        # The whole leader at once (main process and pool children), mid-body.
        os.killpg(leader.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert leader.wait_exit(10) == -signal.SIGKILL
        cluster.wait_leader(FAILOVER_BOUND + 15, after_term=term,
                            among=[w for w in workers if w is not leader])
        again = wait_until(lambda: [e for e in _runs(cluster, cut) if e["term"] > term],
                           FAILOVER_BOUND + 15,
                           "the cut-off message to run again under a later term",
                           lambda: f"{cluster.logs()}\n{cluster.events.dump()}")
        print(f"ran again {again[0]['at'] - killed:.2f} s after the kill, under term "
              f"{again[0]['term']}")
        time.sleep(SETTLE)  # a copy of the finished message would arrive by now
        problems, excused = check_leader_runs(sender.sent, cluster.events.of("task_start"),
                                              cluster.events.all(),
                                              [Interruption(leader.pid, running["at"])])
        assert not problems, "; ".join(problems)
        assert excused, "the cut-off run was not run again"
        assert len(_runs(cluster, finished)) == 1
    finally:
        sender.close()


def test_early_ack_message_that_finished_as_the_leader_died_never_runs_again(
        cluster: Cluster, broker: str, broker_url: str) -> None:
    """The worst moment for "never again once finished": the body has ended and
    its task id is claimed ``done``, but the leader never acknowledged it (its
    main process is stopped while the pool child finishes, then the whole leader
    is SIGKILLed).  Through kombu the broker redelivers it to the next leader,
    which must refuse it; on the lease's Redis its in-flight record ended with
    the ``done`` claim, so nothing comes back at all."""
    workers = cluster.start(2, "prefork", args=WORKER_ARGS)
    cluster.wait_ready(workers, BOOT)
    leader, started = cluster.wait_leader(BOOT)
    term = int(started["term"])
    sender = Sender(broker_url)
    claims = cluster.events.client
    try:
        ended = sender.send("ended", seconds=1.0)
        wait_until(lambda: _runs(cluster, ended), BOOT, "the body to start on the leader",
                   lambda: f"{sender.queue_state()}\n{cluster.logs()}\n{cluster.events.dump()}")
        os.kill(leader.pid, signal.SIGSTOP)  # the main process: it acknowledges late
        wait_until(lambda: claims.get(f"celery-leader:{{{cluster.election}}}:task:{ended}")
                   == b"done", 15.0, "the body to end and its task id to be claimed done")
        os.killpg(leader.pid, signal.SIGKILL)
        assert leader.wait_exit(10) == -signal.SIGKILL
        successor, _ = cluster.wait_leader(FAILOVER_BOUND + 15, after_term=term,
                                           among=[w for w in workers if w is not leader])
        if broker != "redis":  # the broker hands the unacknowledged copy to the new leader
            wait_until(lambda: f"[{ended}] already ran; skipping duplicate" in successor.log(),
                       15.0, "the new leader to refuse the finished message's copy",
                       cluster.logs)
        time.sleep(SETTLE)
        assert len(_runs(cluster, ended)) == 1, cluster.events.dump()
    finally:
        sender.close()


CONSUMER_TIMEOUT_MS = 3000


@pytest.fixture
def short_timeout_rabbitmq() -> Iterator[RabbitMQ]:
    """A RabbitMQ of this test's own whose consumer_timeout is 3 s, checked every second."""
    if not SERVER.exists():
        pytest.skip("RabbitMQ is not installed (make test installs Debian's rabbitmq-server)")
    server = RabbitMQ(consumer_timeout_ms=CONSUMER_TIMEOUT_MS, channel_tick_ms=1000)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def test_leader_only_body_longer_than_rabbitmqs_consumer_timeout_stops_the_leader(
        request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, election_name: str,
        short_timeout_rabbitmq: RabbitMQ) -> None:
    """What RabbitMQ's consumer_timeout does to a leader-only body that outlasts
    it, now that leader-only tasks acknowledge late there (measured, for the
    README): the broker closes the leader's channel (PRECONDITION_FAILED),
    Celery calls that unrecoverable and the leader worker shuts down once the
    body ended; the body runs once, and the next leader refuses the copy the
    broker gave back.  So consumer_timeout must exceed the longest body."""
    cluster = Cluster(tmp_path, redis_url, election_name, app=APP,
                      env={"EVENTS_URL": redis_url, "BROKER_URL": short_timeout_rabbitmq.url})
    with stopped_at_end(request, cluster,
                        lambda: f"worker output ({tmp_path}):\n{cluster.logs()}\n"
                                f"{cluster.events.dump()}"):
        workers = cluster.start(2, "prefork", args=WORKER_ARGS)
        cluster.wait_ready(workers, BOOT)
        leader, started = cluster.wait_leader(BOOT)
        sender = Sender(short_timeout_rabbitmq.url)
        try:
            long = sender.send("long", seconds=4 * CONSUMER_TIMEOUT_MS / 1000)
            cluster.events.wait_kind("task_done", 60, where=lambda e: e["task_id"] == long,
                                     what="the long body to end")
            assert leader.wait_exit(30) == 1, leader.log()  # Celery's unrecoverable error
            assert "PRECONDITION_FAILED - delivery acknowledgement on channel" in leader.log()
            successor, _ = cluster.wait_leader(FAILOVER_BOUND + 15,
                                               after_term=int(started["term"]),
                                               among=[w for w in workers if w is not leader])
            wait_until(lambda: f"[{long}] already ran; skipping duplicate" in successor.log(),
                       15.0, "the next leader to refuse the long body's copy", cluster.logs)
            after = sender.send("after")
            cluster.events.wait_kind("task_done", 30, where=lambda e: e["task_id"] == after,
                                     what="a later message to run on the next leader")
            time.sleep(SETTLE)
        finally:
            sender.close()
        assert len(_runs(cluster, long)) == 1, cluster.events.dump()
