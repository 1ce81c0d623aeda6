"""A leader-only message, once sent, runs exactly once: black-box faults with real workers.

Each replica (tests/apps/faults_app.py, real ``celery worker`` processes, solo and
prefork) reaches Redis through a TCP proxy of its own (tests/tcpproxy.py): its
broker and its lease both go through it, so a test can freeze one replica's
network (no FIN, no RST), heal it or reset its connections.  What the replicas do
is recorded directly in the real Redis (``test:events``).  Senders are plain
Celery (``send_task`` to the leader queue from this process, no
``celery_leader.install``).

The faults land where kombu's Redis transport loses a message today
(celery/kombu#305): Redis pops it with the ``BRPOP`` of a consumer that can no
longer receive it (SIGKILLed a few ms ago, frozen, cut off), and kombu records a
message as unacknowledged only once the reply reached a live client.  So each
test waits until its target is *inside* its ``BRPOP`` (the proxy sees the command
sent and no reply since) before it strikes, and sends at once.

Every test checks the same thing (:func:`check_runs`): every message sent ran
once, by task id (bounded wait for all, then a short settle to catch doubles),
and each run happened on a replica that was leading: its recorded term is
non-zero and is a term that replica started leading under (``started_leading``),
at or after that start and not after that leadership stopped.  The one double
allowed is Celery's at-least-once: a run the fault caught in flight on the
replica it cut off (its "done" claim or its ack could not reach Redis) may run
again under the next term (tests/leader_runs.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from tests.celery_procs import FAILOVER_BOUND, Cluster, Worker, stopped_at_end, wait_until
from tests.leader_runs import (
    IN_FLIGHT,
    Interruption,
    check_leader_runs,
    identity_pid,
    leaderships,
)
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration

APP = "tests.apps.faults_app"
LEADER_TASK = "tests.apps.faults_app.leader_noop"
LEADER_QUEUE = "celery_leader"
TICK_QUEUE = "celery"
POOLS = ["solo", "prefork"]
CONCURRENCY = {"solo": 1, "prefork": 2}  # Cluster.start runs every worker with -c 2
# Less traffic and a faster boot; nothing here needs them.
WORKER_ARGS = ("--without-mingle", "--without-gossip", "--without-heartbeat")
BOOT = 45.0
# A message the old leader had taken comes back within the visibility timeout
# (6 s, faults_app) after the new leader is up: the bound for every message to run.
ALL_RUN = 6.0 + 12.0
SETTLE = 1.5  # after every message ran once and the broker is empty: catch doubles
STREAM_EVERY = 0.05
PARTITION = 15.0


# ---------------------------------------------------------------- the cluster


class FaultCluster:
    """Replicas of faults_app, each behind a TcpProxy of its own; everything is
    stopped in :meth:`stop` (partitions ended first, so nobody waits on a cut)."""

    def __init__(self, tmp_path: Path, redis_url: str, election: str) -> None:
        self.redis_url = redis_url
        self.cluster = Cluster(tmp_path, redis_url, election, app=APP,
                               env={"EVENTS_URL": redis_url})
        self.events = self.cluster.events
        self.proxies: dict[str, TcpProxy] = {}
        self.senders: list[Sender] = []

    def start(self, count: int, pool: str, beat: bool = False) -> list[Worker]:
        def through_proxy(name: str) -> dict[str, Any]:
            proxy = self.proxies[name] = TcpProxy.to_url(self.redis_url)
            return {"env": {"REDIS_URL": proxy.url(self.redis_url),
                            "FAULTS_BEAT": "1" if beat else "0"}}

        workers = self.cluster.start(count, pool, args=WORKER_ARGS, per_worker=through_proxy)
        self.cluster.wait_ready(workers, BOOT)
        return workers

    def proxy(self, worker: Worker) -> TcpProxy:
        return self.proxies[worker.name]

    def leader(self, after_term: int = 0, among: list[Worker] | None = None,
               timeout: float = BOOT) -> tuple[Worker, int]:
        worker, event = self.cluster.wait_leader(timeout, after_term=after_term, among=among)
        return worker, int(event["term"])

    def sender(self) -> Sender:
        sender = Sender(self.redis_url)
        self.senders.append(sender)
        return sender

    def stop(self) -> None:
        try:
            for sender in self.senders:
                sender.close()
            for proxy in self.proxies.values():
                proxy.reset()
            self.cluster.stop()
        finally:
            for proxy in self.proxies.values():
                proxy.close()

    def describe(self) -> str:
        traces = []
        for name, proxy in self.proxies.items():
            lines = [f"  {at:.3f} c{conn} {way} {data[:80]!r}"
                     for at, conn, way, data in list(proxy.trace)[-25:]]
            traces.append(f"--- proxy of {name} (last chunks)\n" + "\n".join(lines))
        return "\n".join([self.cluster.logs(), self.events.dump(), *traces])


class Sender:
    """A plain Celery app publishing leader-only messages over one warm connection."""

    def __init__(self, redis_url: str) -> None:
        self.app = Celery("faults-sender", broker=redis_url, set_as_current=False)
        self.app.conf.broker_connection_retry_on_startup = True
        self.producer = self.app.producer_pool.acquire(block=True)
        self.sent: dict[str, str] = {}  # task id -> label
        self.at: dict[str, float] = {}  # label -> monotonic time just before sending

    def send(self, label: str, seconds: float = 0.0) -> str:
        self.at[label] = time.monotonic()
        result = self.app.send_task(LEADER_TASK, args=[label, seconds], queue=LEADER_QUEUE,
                                    producer=self.producer)
        self.sent[result.id] = label
        return str(result.id)

    def close(self) -> None:
        self.producer.release()
        self.app.close()


class Stream(threading.Thread):
    """One leader-only message every ``every`` seconds, from a sender of its own."""

    def __init__(self, sender: Sender, prefix: str, every: float = STREAM_EVERY) -> None:
        super().__init__(name=f"stream-{prefix}", daemon=True)
        self.sender, self.prefix, self.every = sender, prefix, every
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        due = time.monotonic()
        index = 0
        try:
            while not self.done.is_set():
                self.sender.send(f"{self.prefix}{index}")
                index += 1
                due += self.every
                self.done.wait(max(0.0, due - time.monotonic()))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> dict[str, str]:
        self.done.set()
        self.join(10.0)
        assert self.error is None, f"the stream's sender failed: {self.error!r}"
        return dict(self.sender.sent)

    def __enter__(self) -> Stream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(10.0)


@pytest.fixture
def faults(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str,
           election_name: str) -> Iterator[FaultCluster]:
    made = FaultCluster(tmp_path, redis_url, election_name)
    with stopped_at_end(request, made,
                        lambda: f"worker output ({tmp_path}):\n{made.describe()}"):
        yield made



# ---------------------------------------------------------------- the check


def _backlog(client: redis.Redis) -> int:
    """Messages still waiting in a queue, or taken and not yet acknowledged."""
    waiting = sum(client.llen(key) for key in client.scan_iter(match="celery*")
                  if client.type(key) == b"list")
    return int(waiting + client.hlen("unacked"))


def check_runs(faults: FaultCluster, sent: dict[str, str],
               interrupted: tuple[Worker, float] | None = None,
               timeout: float = ALL_RUN) -> None:
    """Every message of ``sent`` (task id -> label) runs exactly once, on a leader
    (tests/leader_runs.py).  ``interrupted``: the worker a fault cut off (or froze)
    and when; a run it had in flight then may run again under the next term."""
    events = faults.events

    def runs() -> list[dict[str, Any]]:
        return [e for e in events.of("task_start") if e["task_id"] in sent]

    deadline = time.monotonic() + timeout
    poll(lambda: {e["task_id"] for e in runs()} >= set(sent), deadline)
    # Settle: nothing left that could still be delivered, then a moment for doubles.
    poll(lambda: _backlog(events.client) == 0, max(deadline, time.monotonic() + 1.0))
    time.sleep(SETTLE)
    cuts = [Interruption(interrupted[0].pid, interrupted[1])] if interrupted else []
    problems, excused = check_leader_runs(sent, runs(), events.all(), cuts)
    if excused:
        print(f"ran again after the fault caught it in flight: {excused}")
    assert not problems, "; ".join(problems) + (
        f"\n(broker backlog now {_backlog(events.client)}; leaderships "
        f"{sorted((term, who) for who, term in leaderships(events.all()))})")


def poll(predicate: Any, deadline: float) -> bool:
    """Like wait_until, but a timeout is not a failure here: what is still missing
    then is what the caller reports (a lost message, a fire time that never ran)."""
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def settled(faults: FaultCluster, task_id: str) -> bool:
    """The run of ``task_id`` is over: claimed done, and acknowledged to the broker."""
    claim = faults.events.client.get(f"celery-leader:{{{faults.cluster.election}}}:task:{task_id}")
    return claim == b"done" and _backlog(faults.events.client) == 0


def waits_on(queue: bytes) -> Any:
    """A blocking wait on ``queue``: kombu's BRPOP, or the reliable leader queue's
    doorbell (BLMOVE), whichever the code under test uses."""
    return lambda chunk: (b"BRPOP" in chunk or b"BLMOVE" in chunk) and queue in chunk


def wait_in_brpop(proxy: TcpProxy, queue: bytes, since: float, what: str) -> None:
    """Until the replica behind ``proxy`` waits on ``queue`` in a blocking command
    sent after ``since`` (no reply to it yet)."""
    wait_until(lambda: proxy.waiting_in(waits_on(queue), since=since) is not None, 10.0, what)


def brpop_on(queue: bytes) -> Any:
    return waits_on(queue)


# ---------------------------------------------------------------- 1. SIGKILL, then send


@pytest.mark.parametrize("delay_ms", [0, 5, 20])
@pytest.mark.parametrize("pool", POOLS)
def test_message_sent_right_after_the_leader_is_killed_runs_once(
        faults: FaultCluster, pool: str, delay_ms: int) -> None:
    """The leader is SIGKILLed while it waits in its BRPOP on the leader queue, and
    a message is sent ``delay_ms`` after ``os.kill`` returns: its dying connection
    is still registered in Redis, which pops the message into it."""
    faults.start(2, pool)
    leader, term = faults.leader()
    sender = faults.sender()
    before = sender.send("before")
    wait_until(lambda: settled(faults, before), BOOT, "the first message to run and be acked")
    ran = time.monotonic()
    wait_in_brpop(faults.proxy(leader), LEADER_QUEUE.encode(), ran,
                  f"{leader.name} to wait in its BRPOP on the leader queue again")
    os.kill(leader.pid, signal.SIGKILL)
    killed = time.monotonic()
    if delay_ms:
        time.sleep(max(0.0, killed + delay_ms / 1000 - time.monotonic()))
    sender.send("after-kill")
    late = sender.at["after-kill"] - killed
    assert late < delay_ms / 1000 + 0.1, f"sent {late * 1000:.1f} ms after the kill"
    assert leader.wait_exit(10) == -signal.SIGKILL
    faults.leader(after_term=term, timeout=FAILOVER_BOUND + 15)
    closed = [at for at, command in faults.proxy(leader).closed
              if waits_on(LEADER_QUEUE.encode())(command)] or [float("nan")]
    print(f"sent {late * 1000:.1f} ms after the kill; the dying leader's BRPOP connection "
          f"reached EOF at the proxy {(closed[0] - killed) * 1000:.1f} ms after it")
    check_runs(faults, sender.sent)


# ---------------------------------------------------------------- 2. leader partitioned


@pytest.mark.chaos
@pytest.mark.parametrize("end", ["reset", "heal"])
@pytest.mark.parametrize("pool", POOLS)
def test_stream_across_a_leader_partitioned_past_its_lease_runs_once(
        faults: FaultCluster, pool: str, end: str) -> None:
    """One message every 50 ms while the leader is cut off for 15 s, right after it
    sent its BRPOP on the leader queue (the next message is popped into the cut);
    another replica takes over; then the cut ends with an RST of every connection
    that lived through it (``reset``), or with the held bytes delivered (``heal``)."""
    workers = faults.start(3, pool)
    leader, term = faults.leader()
    proxy = faults.proxy(leader)
    with Stream(faults.sender(), "s") as stream:
        faults.events.wait_kind("task_start", BOOT, count=5,
                                where=lambda e: e["term"] == term, what="the stream flowing")
        proxy.partition_after(brpop_on(LEADER_QUEUE.encode()))
        wait_until(lambda: proxy.partitioned, 10.0, f"{leader.name} cut inside its BRPOP")
        cut = proxy.partitioned_at
        assert cut is not None
        others = [w for w in workers if w is not leader]
        faults.leader(after_term=term, among=others, timeout=FAILOVER_BOUND + 15)
        time.sleep(max(0.0, cut + PARTITION - time.monotonic()))  # let the partition last
        if end == "reset":
            proxy.reset()
        else:
            proxy.heal()
        time.sleep(1.0)  # the stream runs on across the end of the cut
        sent = stream.stop()
    check_runs(faults, sent, interrupted=(leader, cut))


# ---------------------------------------------------------------- 3. frozen, then killed


@pytest.mark.parametrize("pool", POOLS)
def test_leader_frozen_past_its_lease_then_killed_loses_nothing_sent_meanwhile(
        faults: FaultCluster, pool: str) -> None:
    """The leader is SIGSTOPped while it waits in its BRPOP on the leader queue,
    past its lease; messages flow every 50 ms from the moment it stopped; once
    another replica leads, the frozen one is SIGKILLed without ever running again."""
    workers = faults.start(2, pool)
    leader, term = faults.leader()
    sender = faults.sender()
    before = sender.send("before")
    wait_until(lambda: settled(faults, before), BOOT, "the first message to run and be acked")
    wait_in_brpop(faults.proxy(leader), LEADER_QUEUE.encode(), time.monotonic(),
                  f"{leader.name} to wait in its BRPOP on the leader queue again")
    os.kill(leader.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    with Stream(sender, "f") as stream:
        other = [w for w in workers if w is not leader]
        faults.leader(after_term=term, among=other, timeout=FAILOVER_BOUND + 15)
        os.kill(leader.pid, signal.SIGKILL)  # never resumed
        assert leader.wait_exit(10) == -signal.SIGKILL
        time.sleep(0.5)  # the stream runs on across the kill
        sent = stream.stop()
    check_runs(faults, sent, interrupted=(leader, stopped))


@pytest.mark.parametrize("pool", POOLS)
def test_leader_killed_as_its_take_reaches_redis_loses_nothing_it_took(
        faults: FaultCluster, pool: str) -> None:
    """The worst moment for the reliable leader queue: the leader's fenced TAKE
    has moved messages out of the list (into the in-flight hash under its term)
    and its reply is held in the cut; the leader is SIGKILLed and never sees
    them.  The next term must put them back and run each once."""
    faults.start(2, pool)
    leader, term = faults.leader()
    sender = faults.sender()
    before = sender.send("before")
    wait_until(lambda: settled(faults, before), BOOT, "the first message to run and be acked")
    proxy = faults.proxy(leader)
    proxy.partition_after(lambda chunk: b"EVALSHA" in chunk
                          and b"leader-queue:sequence" in chunk)  # only TAKE names it
    taken = [sender.send(f"taken-{index}") for index in range(3)]
    wait_until(lambda: proxy.partitioned, 10.0, f"{leader.name} cut as its TAKE went out")
    cut = proxy.partitioned_at
    assert cut is not None
    os.kill(leader.pid, signal.SIGKILL)
    proxy.reset()
    assert leader.wait_exit(10) == -signal.SIGKILL
    assert taken
    faults.leader(after_term=term, timeout=FAILOVER_BOUND + 15)
    check_runs(faults, sender.sent, interrupted=(leader, cut))


# ---------------------------------------------------------------- 4. a follower's ticks


def _fire_second(event: dict[str, Any]) -> int:
    return int(datetime.fromisoformat(event["fire_time"]).timestamp())


def _hms(second: int) -> str:
    return datetime.fromtimestamp(second, timezone.utc).strftime("%H:%M:%S")


@pytest.mark.parametrize("pool", POOLS)
def test_every_tick_runs_once_although_a_partitioned_follower_popped_one(
        faults: FaultCluster, pool: str) -> None:
    """Every-second ticks (worker-embedded beat, catch_up="all") on the default
    queue, which every replica consumes.  The leader's pool is kept busy by
    leader-only work (so it does not wait in a BRPOP), the follower is cut off
    right after it sent its BRPOP, so the next tick is popped into the cut; then
    its connections are reset.  Every fire time must still run exactly once."""
    workers = faults.start(2, pool, beat=True)
    leader, _ = faults.leader()
    [follower] = [w for w in workers if w is not leader]
    events = faults.events
    flowing = events.wait_kind("tick_run", BOOT, count=2, what="ticks running")
    first = min(_fire_second(e) for e in flowing)

    # Keep the leader's pool full of leader-only work: once kombu's prefetch of the
    # tick queue is full too (at most a couple of ticks), the leader stops
    # waiting in its BRPOP and the next tick can only go to the follower.  (The
    # leader-only work no longer passes through kombu, so its BRPOP on the tick
    # queue may go on until then.)
    sender = faults.sender()
    busy = [sender.send(f"busy{i}", seconds=10.0) for i in range(CONCURRENCY[pool])]
    events.wait_kind("task_start", BOOT, count=len(busy),
                     where=lambda e: e["task_id"] in busy, what="the leader busy")
    proxy = faults.proxy(follower)
    proxy.partition_after(brpop_on(TICK_QUEUE.encode()))
    wait_until(lambda: proxy.partitioned, 5.0, f"{follower.name} cut inside its BRPOP")
    cut = proxy.partitioned_at
    assert cut is not None
    # A tick that found nobody waiting (the follower's BRPOP was spent on the one
    # before it, the leader's prefetch is full) shows that the follower's BRPOP is over.
    wait_until(lambda: events.client.llen(TICK_QUEUE) >= 1, 8.0,
               "a tick waiting in the queue", faults.describe)
    dropped = proxy.reset()
    reset_at = time.time()
    last = int(reset_at) + 2
    print(f"bytes Redis sent into the cut and the reset dropped: {dropped}")

    def fired() -> set[int] | None:
        seconds = {_fire_second(e) for e in events.of("tick_run")}
        return seconds if seconds >= set(range(first, last + 1)) else None

    poll(fired, time.monotonic() + ALL_RUN)
    time.sleep(SETTLE)
    check_runs(faults, sender.sent)
    runs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for run in events.of("tick_run"):
        runs[_fire_second(run)].append(run)
    missing = [s for s in range(first, last + 1) if not runs[s]]
    twice = {}
    for second in range(first, last + 1):
        same = sorted(runs[second], key=lambda run: run["at"])
        # A tick the follower was running when it was cut off may run again (its
        # ack was cut): Celery's at-least-once, not a tick popped into the cut.
        in_flight = (len(same) == 2 and identity_pid(same[0]["identity"]) == follower.pid
                     and cut - IN_FLIGHT <= same[0]["at"] <= cut)
        if len(same) > 1 and not in_flight:
            twice[_hms(second)] = len(same)
    assert not missing and not twice, (
        f"fire times {_hms(first)}..{_hms(last)}: never ran {[_hms(s) for s in missing]}, "
        f"ran more than once {twice} "
        f"(the reset dropped {sum(len(b) for b in dropped.values())} bytes Redis had sent "
        f"the cut-off follower: {[b[:60] for b in dropped.values()]})")
