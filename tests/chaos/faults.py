"""The faults of the chaos suite, each injected into a running ChaosCluster.

A fault waits for what it needs (a leader, a running task) on bounded
conditions, injects itself, lets itself last where that is the point (a
SIGSTOP past the lease, a Redis outage, a CLIENT PAUSE), then waits until the
cluster has recovered: a leader with a newer term where the fault must cause
one, three replicas up, and ticks dispatched again.  What each fault saw is
kept in a :class:`FaultRecord`, and the checks that belong to one fault alone
(the wedged replica stopped dispatching on time, the orphan's claims were
fenced, Redis kept every acknowledged write) are made by the fault itself.
"""

from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from tests.chaos.harness import (
    CLAIMER_STOP_KEY,
    CLAIMER_TASK,
    LEADER_QUEUE,
    LEASE,
    RENEW,
    RETRY,
    ChaosCluster,
    Claim,
    pid_alive,
    send,
    wait_until,
)
from tests.leader_runs import Interruption

FAULTS = ("sigkill", "sigstop", "sigterm", "redis_restart", "redis_outage", "client_pause",
          "wedge", "orphan", "partition", "frozen_kill")
# A crash fails over within the lease plus two jittered retry periods; bounded
# waits use this plus generous slack for a loaded 2-core machine.
FAILOVER = LEASE + 2 * (1 + 1.2) * RETRY
WAIT = FAILOVER + 15.0
BOOT = 45.0


def waits_on_leader_queue(chunk: bytes) -> bool:
    """A blocking wait on the leader queue: kombu's BRPOP, or the reliable leader
    queue's doorbell (BLMOVE), whichever the code under test uses."""
    return (b"BRPOP" in chunk or b"BLMOVE" in chunk) and LEADER_QUEUE.encode() in chunk
# How long after SIGKILL an acknowledged renew sent just before it may still land.
IN_FLIGHT = 0.25


@dataclass
class FaultRecord:
    index: int
    kind: str
    began: float
    ended: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        facts = ", ".join(f"{key}={_fmt(value)}" for key, value in self.facts.items())
        return f"#{self.index} {self.kind} [{self.ended - self.began:.1f}s] {facts}"


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


class Chaos:
    """Injects faults into ``cluster``, drawing every choice from ``rng``."""

    def __init__(self, cluster: ChaosCluster, rng: random.Random, first_outlive: bool) -> None:
        self.cluster = cluster
        self.rng = rng
        self.records: list[FaultRecord] = []
        self.orphans = 0
        # (wall clock once redis-server had exited, wall clock and monotonic just
        # before it was started again)
        self.outages: list[tuple[float, float, float]] = []
        self.first_outlive = first_outlive
        # Every moment a fault cut a replica (or, with pid None, all of them) off
        # from Redis or froze it: a leader-only run in flight then may run again.
        self.interruptions: list[Interruption] = []
        self.sender = Celery("chaos-sender", broker=cluster.server.url, set_as_current=False)
        self.sender.conf.broker_connection_retry_on_startup = True

    # ------------------------------------------------------------ the sequence

    def run(self, min_seconds: float) -> None:
        """Every fault once, in a seeded order, then seeded random faults until
        ``min_seconds`` have passed."""
        order = list(FAULTS)
        self.rng.shuffle(order)
        began = time.monotonic()
        index = 0
        while index < len(order) or time.monotonic() - began < min_seconds:
            kind = order[index] if index < len(order) else self.rng.choice(FAULTS)
            self.steady()
            record = FaultRecord(index + 1, kind, time.monotonic())
            self.records.append(record)
            try:
                getattr(self, kind)(record)
            finally:
                record.ended = time.monotonic()
            index += 1
        self.steady()

    def close(self) -> None:
        self.sender.close()

    def steady(self) -> None:
        """Ticks flow again under the current leader; then a random phase, so the
        next fault lands anywhere within a second."""
        since = self.records[-1].ended if self.records else 0.0
        self.wait_dispatching(since)
        time.sleep(self.rng.uniform(0.0, 1.0))

    def wait_dispatching(self, since: float, timeout: float = WAIT) -> None:
        cluster = self.cluster

        def flowing() -> bool:
            current = cluster.leader()
            if current is None:
                return False
            newest = cluster.dispatches(latest=1)
            return bool(newest) and newest[0].at > since and newest[0].term == current[1]

        wait_until(flowing, timeout, "ticks dispatched by the current leader",
                   cluster.describe_state)

    def replace(self, record: FaultRecord, count: int = 1) -> None:
        """Start replicas for the ones that died, so three stay up."""
        started = [self.cluster.start_replica() for _ in range(count)]
        self.cluster.wait_ready(started, BOOT)
        record.facts["replaced_by"] = ",".join(r.name for r in started)

    # ------------------------------------------------------------ process faults

    def sigkill(self, record: FaultRecord) -> None:
        leader, term, _ = self.cluster.wait_leader(WAIT)
        killed = leader.signal(signal.SIGKILL)
        self.interruptions.append(Interruption(leader.pid, killed))
        leader.popen.wait(10)
        _, new_term, seen = self.cluster.wait_leader(WAIT, after_term=term)
        record.facts.update(target=leader.name, term=term, new_term=new_term,
                            failover=seen - killed)
        self.replace(record)

    def sigstop(self, record: FaultRecord) -> None:
        """SIGSTOP the leader past its lease, let another take over, SIGCONT it:
        it must not dispatch under its old term after waking."""
        cluster = self.cluster
        leader, term, _ = cluster.wait_leader(WAIT)
        pause = FAILOVER + self.rng.uniform(0.3, 1.5)
        stopped = leader.signal(signal.SIGSTOP)
        self.interruptions.append(Interruption(leader.pid, stopped))
        _, new_term, seen = cluster.wait_leader(WAIT, after_term=term, not_pid=leader.pid)
        time.sleep(max(0.0, stopped + pause - time.monotonic()))  # let the pause last
        resumed = leader.signal(signal.SIGCONT)
        record.facts.update(target=leader.name, term=term, new_term=new_term,
                            failover=seen - stopped, stopped_for=resumed - stopped)

        def follows() -> bool:
            view = leader.view()
            return (leader.healthz() == 200 and view is not None and not view["is_leader"]
                    and (view["leader_term"] or 0) >= new_term)

        wait_until(follows, WAIT, f"{leader.name} to follow term {new_term} after SIGCONT",
                   cluster.describe_state)
        late = [d for d in cluster.dispatches() if d.pid == leader.pid and d.term == term
                and d.at > stopped]
        assert not late, f"{leader.name} dispatched under term {term} after SIGCONT: {late}"

    def sigterm(self, record: FaultRecord) -> None:
        cluster = self.cluster
        leader, term, _ = cluster.wait_leader(WAIT)
        sent = leader.signal(signal.SIGTERM)
        _, new_term, seen = cluster.wait_leader(WAIT, after_term=term, not_pid=leader.pid)
        code = leader.popen.wait(30)
        record.facts.update(target=leader.name, term=term, new_term=new_term,
                            handover=seen - sent, exit=code)
        assert code == 0, f"{leader.describe()} exited with {code} after SIGTERM"
        self.replace(record)

    def partition(self, record: FaultRecord) -> None:
        """The leader's network is cut (no FIN, no RST: its proxy stops forwarding)
        right after it sent its BRPOP on the leader queue, so the next leader-only
        message is popped into the cut; another replica takes over; then the cut
        ends with an RST of every connection that lived through it, or with the
        held bytes delivered.  The replica follows the new leader afterwards."""
        cluster = self.cluster
        leader, term, _ = cluster.wait_leader(WAIT)
        proxy = leader.proxy
        proxy.partition_after(waits_on_leader_queue)
        wait_until(lambda: proxy.partitioned, WAIT, f"{leader.name} cut inside its BRPOP")
        cut = proxy.partitioned_at
        assert cut is not None
        self.interruptions.append(Interruption(leader.pid, cut))
        _, new_term, seen = cluster.wait_leader(WAIT, after_term=term, not_pid=leader.pid)
        time.sleep(max(0.0, cut + LEASE + self.rng.uniform(0.5, 3.0) - time.monotonic()))
        how = self.rng.choice(["reset", "heal"])
        dropped = proxy.reset() if how == "reset" else proxy.heal() or {}
        ended = time.monotonic()
        record.facts.update(target=leader.name, term=term, new_term=new_term,
                            failover=seen - cut, cut_for=ended - cut, end=how,
                            dropped_bytes=sum(len(held) for held in dropped.values()))

        def follows() -> bool:
            view = leader.view()
            return (leader.healthz() == 200 and view is not None and not view["is_leader"]
                    and (view["leader_term"] or 0) >= new_term)

        wait_until(follows, WAIT, f"{leader.name} to follow term {new_term} after the cut",
                   cluster.describe_state)

    def frozen_kill(self, record: FaultRecord) -> None:
        """SIGSTOP the leader while it waits in its BRPOP on the leader queue (the
        next leader-only message is popped into its socket), past its lease; once
        another replica leads, SIGKILL it without ever resuming it."""
        cluster = self.cluster
        leader, term, _ = cluster.wait_leader(WAIT)
        wait_until(lambda: leader.proxy.waiting_in(waits_on_leader_queue) is not None, WAIT,
                   f"{leader.name} waiting in its BRPOP on the leader queue")
        stopped = leader.signal(signal.SIGSTOP)
        self.interruptions.append(Interruption(leader.pid, stopped))
        _, new_term, seen = cluster.wait_leader(WAIT, after_term=term, not_pid=leader.pid)
        killed = leader.signal(signal.SIGKILL)
        leader.popen.wait(10)
        record.facts.update(target=leader.name, term=term, new_term=new_term,
                            failover=seen - stopped, stopped_for=killed - stopped)
        self.replace(record)

    # ------------------------------------------------------------ Redis faults

    def _durable_state(self) -> tuple[int, int, int]:
        client = self.cluster.client
        version = int(client.hget(self.cluster.key("counter"), "version") or 0)
        states = client.hgetall(self.cluster.key("schedule:state"))
        last = max((int(json.loads(v)["last"]) for v in states.values()),
                   default=0)
        return version, last, int(client.llen("chaos-ticks"))

    def redis_restart(self, record: FaultRecord) -> None:
        """Crash (SIGKILL) or shut down Redis and start it again at once on the
        same port and AOF: every write acknowledged before must be there after."""
        server = self.cluster.server
        how = self.rng.choice(["SIGKILL", "SIGTERM"])
        before = self._durable_state()
        stopped = time.monotonic()
        self.interruptions.append(Interruption(None, stopped))
        server.stop(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
        server.start()
        after = self._durable_state()
        record.facts.update(signal=how, down=time.monotonic() - stopped,
                            version=f"{before[0]}->{after[0]}", queue=f"{before[2]}->{after[2]}")
        assert all(a >= b for a, b in zip(after, before, strict=True)), (
            f"Redis lost acknowledged writes over a {how} restart: (lease version, last "
            f"fire time, dispatched messages) were {before}, are {after}")
        self.wait_dispatching(time.monotonic())

    def redis_outage(self, record: FaultRecord) -> None:
        """Redis unreachable for longer than the renew deadline: every leadership
        ends (the next one has a newer term), and the schedule resumes once it is back."""
        server = self.cluster.server
        current = self.cluster.leader()
        term = current[1] if current else 0
        down_for = RENEW + self.rng.uniform(0.5, 2.0)
        self.interruptions.append(Interruption(None, time.monotonic()))
        server.stop(signal.SIGTERM)  # returns once redis-server has exited
        down, down_wall = time.monotonic(), time.time()
        time.sleep(max(0.0, down + down_for - time.monotonic()))  # let the outage last
        # Nobody can reach Redis before its process is started again.
        self.outages.append((down_wall, time.time(), time.monotonic()))
        server.start()
        back = time.monotonic()
        _, new_term, seen = self.cluster.wait_leader(WAIT, after_term=term)
        record.facts.update(down=back - down, term=term, new_term=new_term,
                            leader_after=seen - back)
        self.wait_dispatching(back)

    def client_pause(self, record: FaultRecord) -> None:
        """Every client's commands stall (``CLIENT PAUSE <ms> ALL``), sometimes for
        less and sometimes for more than the renew deadline."""
        if self.rng.random() < 0.5:
            millis = self.rng.randint(300, int(RENEW * 1000) - 200)
        else:
            millis = self.rng.randint(int(RENEW * 1000) + 300, int(LEASE * 1000) + 1500)
        current = self.cluster.leader()
        client = self.cluster.server.client()
        try:
            paused = time.monotonic()
            self.interruptions.append(Interruption(None, paused + millis / 1000))
            client.execute_command("CLIENT", "PAUSE", millis, "ALL")
        finally:
            client.close()
        time.sleep(max(0.0, paused + millis / 1000 - time.monotonic()))  # let it last
        record.facts.update(millis=millis, term=current[1] if current else None)
        self.wait_dispatching(paused + millis / 1000)
        record.facts["term_after"] = self.cluster.wait_leader(WAIT)[1]

    # ------------------------------------------------------------ a wedged elector

    def wedge(self, record: FaultRecord) -> None:
        """The leader's elector thread blocks in the lock while the process lives:
        it must stop dispatching once its lease ends, lose the lease to another
        replica, and fail /healthz; unwedged, it follows again and is healthy."""
        cluster = self.cluster
        leader, term, _ = cluster.wait_leader(WAIT)
        leader.wedge_file.touch()
        wedged = time.monotonic()
        _, new_term, seen = cluster.wait_leader(WAIT, after_term=term, not_pid=leader.pid)
        unhealthy = wait_until(lambda: leader.healthz() == 500 and time.monotonic(),
                               WAIT, f"/healthz of wedged {leader.name} to fail",
                               cluster.describe_state)
        holder = cluster.leader()
        assert holder is None or holder[0] is not leader, "the wedged replica leads again"
        leader.wedge_file.unlink()
        unwedged = time.monotonic()

        def follows() -> bool:
            view = leader.view()
            return (leader.healthz() == 200 and view is not None
                    and (view["leader_term"] or 0) >= new_term)

        wait_until(follows, WAIT, f"unwedged {leader.name} to be healthy and follow",
                   cluster.describe_state)
        record.facts.update(target=leader.name, term=term, new_term=new_term,
                            failover=seen - wedged, healthz_500_after=unhealthy - wedged,
                            healthy_after_unwedge=time.monotonic() - unwedged)
        # Its last renew started before the wedge, so its lease ended by wedged + RENEW.
        late = [d for d in cluster.dispatches() if d.pid == leader.pid
                and d.at >= wedged + RENEW]
        late = [d for d in late if d.at < unwedged or d.term == term]
        assert not late, (f"wedged {leader.name} dispatched after its lease ended "
                          f"(wedged at {wedged:.3f}): {late}")

    # ------------------------------------------------------------ an orphaned dispatcher

    def orphan(self, record: FaultRecord) -> None:
        """SIGKILL a leader's main process while its pool child runs the claiming
        leader-only task.  Celery gives pool children a parent-death SIGKILL; with
        ``outlive`` the task clears it, so the child outlives its main process and
        keeps claiming with its old term: every claim after the lease ended, and
        every claim after a newer term was seen, must be fenced."""
        cluster = self.cluster
        outlive = self.first_outlive if self.orphans % 2 == 0 else not self.first_outlive
        self.orphans += 1
        run_id = f"orphan{record.index}-{self.rng.randrange(10**6)}"
        cluster.wait_leader(WAIT)
        self.sender.send_task(CLAIMER_TASK, args=[run_id, outlive, 4 * LEASE + 10],
                              queue=LEADER_QUEUE)

        def running() -> dict[str, Any] | None:
            starts = [e for e in cluster.events("claimer_start") if e["run_id"] == run_id]
            ok = [c for c in cluster.claims(run_id) if c.result == "CLAIMED"]
            return starts[0] if starts and len(ok) >= 2 else None

        start = wait_until(running, WAIT + 15, f"claimer {run_id} to run and claim",
                           lambda: cluster.describe_state() + "\n" + cluster.logs(2000))
        child, main_pid, term = start["pid"], start["ppid"], start["term"]
        cluster.extra_pids.add(child)
        main = cluster.by_pid(main_pid)
        assert main is not None, f"claimer ran in {child} whose parent {main_pid} is no replica"
        killed = main.signal(signal.SIGKILL)
        self.interruptions.append(Interruption(main.pid, killed))
        main.popen.wait(10)
        if outlive:
            survived = pid_alive(child)
        else:
            wait_until(lambda: not pid_alive(child), 5,
                       f"pool child {child} to die with its main process (pdeathsig)")
            survived = False
        _, new_term, seen = cluster.wait_leader(WAIT, after_term=term)
        if survived:
            # The orphan carries on: wait until it has tried again after the new term.
            wait_until(lambda: any(c.begin > seen and c.pid == child
                                   for c in cluster.claims(run_id)), WAIT,
                       f"orphan {child} to claim after term {new_term} began")
        cluster.client.set(f"{CLAIMER_STOP_KEY}:{run_id}", 1)
        send(child, signal.SIGKILL)
        wait_until(lambda: not pid_alive(child), 10, f"orphan {child} to end")
        # The claimer was in flight when its leader died: the next term runs it
        # again (at least once for in-flight work); only the orphan's own claims
        # are the subject here, and the re-run's must come from a later term.
        claims = [c for c in cluster.claims(run_id) if c.pid == child]
        rerun = [c for c in cluster.claims(run_id) if c.pid != child]
        assert all(c.term > term for c in rerun), rerun
        record.facts.update(target=main.name, term=term, new_term=new_term, outlive=outlive,
                            pdeathsig=start["pdeathsig"], child_survived=survived,
                            failover=seen - killed, rerun_claims=len(rerun),
                            **claim_summary(claims, killed, seen))
        check_orphan_claims(claims, killed, seen, term, survived)
        self.replace(record)


def claim_summary(claims: list[Claim], killed: float, new_term_seen: float) -> dict[str, Any]:
    after_kill = [c for c in claims if c.begin > killed]
    return {
        "claims": len(claims),
        "claimed_after_kill": sum(c.result == "CLAIMED" for c in after_kill),
        "fenced_after_kill": sum(c.result == "FENCED" for c in after_kill),
        "after_new_term": len([c for c in claims if c.begin > new_term_seen]),
    }


def check_orphan_claims(claims: list[Claim], killed: float, new_term_seen: float, term: int,
                        survived: bool) -> None:
    """A claim can only succeed inside the term: before the lease the killed main
    last renewed has expired in Redis (at most a lease after the kill, plus a renew
    in flight), and before a newer term was written (the test saw it at
    ``new_term_seen``, so it was written before)."""
    assert all(c.term == term for c in claims), claims
    lease_end = killed + LEASE + IN_FLIGHT
    bad = [c for c in claims if c.result == "CLAIMED"
           and (c.begin >= lease_end or c.begin >= new_term_seen)]
    assert not bad, (f"claims under term {term} succeeded after the lease ended "
                     f"(killed at {killed:.3f}, newer term seen at {new_term_seen:.3f}): {bad}")
    # The shared page also told the orphan it no longer leads, once its lease ran out.
    stale = [c for c in claims if c.begin >= killed + RENEW and c.page_term != 0]
    assert not stale, f"the orphan still saw a term on its page after its lease: {stale}"
    if survived:
        late = [c for c in claims if c.begin > new_term_seen]
        assert late and all(c.result == "FENCED" for c in late), (
            f"expected the orphan's claims after the new term to be fenced: {late}")
