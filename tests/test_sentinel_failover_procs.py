"""A Redis fail-over under real workers: no fire second doubled or lost.

A real Sentinel topology (primary, replica, three sentinels, down after 1 s);
the replica replicates through a TCP proxy, so the test can hold its
replication stream; three real ``celery worker`` processes whose broker and
lease both go through Sentinel, a 1 s schedule with ``catch_up = "all"`` and
``leader_wait_replicas = 1``.  The primary is killed (SIGKILL) at the worst
moment: as soon as the tick of a fire instant has run (its body reached the
recorder), or 50 ms after the instant if it has not.  With the replica lagging,
it lacks everything written in the last 700 ms, that tick's claim and start
among them; the next leader sends the tick again, and only a start claim that
waited for the replica keeps the copy from running.

The old primary, restarted once Sentinel promoted the replica, becomes its
replica (empty: the test servers keep no data): with one replica and
``leader_wait_replicas = 1`` nobody can take a new term until a replica is
back (RedisLock refuses a term no replica acknowledged).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.sched_procs import Replicas, analyse, fire_second
from tests.tcpproxy import TcpProxy
from tests.topologies import HOST, RedisProcess, SentinelTopology
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

LAG = 0.7  # how long the replication stream is held before the kill (at most)
KILL_BY = 0.05  # the kill comes this long after the fire instant at the latest
RESUME_WITHIN = 10.0


class ReplicationProxy(TcpProxy):
    """A TcpProxy that can also cut right after forwarding to its client (the
    replica) a chunk of the replication stream that matches."""

    cut_after_sent: Callable[[bytes], bool] | None = None

    def _write(self, pipe: Any, sock: Any) -> None:
        to_replica = sock is pipe.client
        before = bytes(pipe.to_client) if to_replica else b""
        super()._write(pipe, sock)
        match = self.cut_after_sent
        if to_replica and match is not None and match(before[:len(before) - len(pipe.to_client)]):
            self.cut_after_sent = None
            self._cut_locked()  # the forwarding thread holds the lock here


@pytest.fixture
def lagging_topology(tmp_path: Path) -> Iterator[tuple[SentinelTopology, ReplicationProxy]]:
    topology = SentinelTopology(tmp_path / "redis")
    proxy = ReplicationProxy(HOST, topology.primary.port)
    # The replica replicates through the proxy (Sentinel still reaches it directly).
    topology.replica = RedisProcess("replica", tmp_path / "redis",
                                    ["--replicaof", HOST, str(proxy.port)])
    topology.processes = [topology.primary, topology.replica, *topology.sentinels]
    try:
        topology.start()
        yield topology, proxy
    except BaseException:
        print(topology.logs())
        raise
    finally:
        proxy.close()
        topology.stop()


@pytest.mark.parametrize("lagging", ["in-sync", "held-after-publish", "700ms-behind"])
def test_primary_killed_after_a_fire_instant_doubles_and_loses_nothing(
        lagging_topology: tuple[SentinelTopology, ReplicationProxy], tmp_path: Path,
        redis_url: str, lagging: str) -> None:
    topology, proxy = lagging_topology
    name = f"sentinel-{uuid.uuid4().hex[:8]}"
    replicas = Replicas(tmp_path, redis_url, name, app="tests.apps.sentinel_app",
                        env={"SENTINEL_URL": topology.url(), "LEADER_WAIT_REPLICAS": "1",
                             "LEADER_WAIT_TIMEOUT": "0.5"})
    restarted: RedisProcess | None = None
    try:
        for _ in range(3):
            replicas.worker()
        replicas.wait_workers_ready()
        replicas.wait_ticks(4, timeout=30.0)
        # The fault: the replica stops at X + KILL_BY - LAG; the primary dies as
        # soon as the tick of fire instant X has run (its claim and start are
        # then on the primary only), or at X + KILL_BY if it has not run by then.
        # The sleeps place the fault; they wait for no outcome.
        wait_until(lambda: 0.1 <= time.time() % 1 <= 0.2, 5.0, "early in a second")
        fire = int(time.time()) + 1
        if lagging == "700ms-behind":
            time.sleep(max(0.0, fire + KILL_BY - LAG - time.time()))
            proxy.partition()
        elif lagging == "held-after-publish":
            # The replica gets the tick's publish (and its claim before it), then
            # nothing: neither the pop nor the start claim of the worker.
            stamp = _fire_stamp(replicas.ticks()[-1]["fire_time"], fire).encode()
            proxy.cut_after_sent = lambda chunk: stamp in chunk and b"lpush" in chunk.lower()
        while time.time() < fire + KILL_BY and fire not in replicas.seconds():
            time.sleep(0.001)
        topology.primary.kill()
        killed_at, killed_mono = time.time(), time.monotonic()
        cut = (f"replica cut {killed_mono - proxy.partitioned_at:.3f}s before the kill"
               if proxy.partitioned_at is not None else "replica not cut")
        ran_before_kill = fire in replicas.seconds()
        if lagging != "in-sync":
            proxy.reset()  # what was held dies with the primary
        new_port = topology.replica.port
        topology.wait_sentinels_agree(new_port, timeout=15.0, replicas=0)
        promoted_after = time.time() - killed_at
        # Empty (the test servers keep no data), so never a candidate for a
        # second promotion: a second fail-over (sentinels missing the new
        # primary's PINGs for down-after on a loaded machine) would lose every
        # claim, a fault this test is not about.
        restarted = RedisProcess("restarted", tmp_path / "redis",
                                 ["--replicaof", HOST, str(new_port), "--replica-priority", "0"],
                                 port=topology.primary.port)
        restarted.start()
        # Ticks resume, and every second up to kill + RESUME_WITHIN + 3 is recorded.
        until = fire + int(RESUME_WITHIN) + 3
        wait_until(lambda: max(replicas.seconds(), default=0) >= until, 40.0,
                   f"ticks through {until}", replicas.logs)
        ticks = replicas.ticks()
        after = sorted(t["at"] for t in ticks if t["at"] > killed_at)
        resumed_after = after[0] - killed_at if after else None
        report = analyse(ticks, until)
        runs = sorted((fire_second(t) - fire, round(t["at"] - fire_second(t), 3), t["term"])
                      for t in ticks)
        alive = [p.describe() for p in replicas.procs if not p.alive()]
        print(f"lagging={lagging}: killed {killed_at - fire:.3f}s after the fire instant "
              f"({cut}; its tick ran before: {ran_before_kill}); "
              f"promoted {promoted_after:.2f}s after the kill; first tick run "
              f"{resumed_after}s after it; {report.summary()}; (second - kill second, "
              f"ran after its fire instant, term): {runs}")
        assert not alive, f"workers exited: {alive}\n{replicas.logs()}"
        detail = f"{report.summary()}\n{replicas.logs()}\n{topology.logs()}" + (
            f"\n--- restarted\n{restarted.log_tail()}" if restarted is not None else "")
        assert not report.duplicates, detail
        assert not report.missing, detail
        assert resumed_after is not None and resumed_after <= RESUME_WITHIN, report.summary()
        # The kill second's tick ran once, wherever it ran.
        assert replicas.seconds().count(fire) == 1
    finally:
        replicas.stop()
        if restarted is not None:
            restarted.stop()


def _fire_stamp(example: str, second: int) -> str:
    """Fire instant ``second`` written as the messages write ``example``."""
    stamp = datetime.fromtimestamp(second, timezone.utc).isoformat()
    same_form = datetime.fromtimestamp(fire_second({"fire_time": example}), timezone.utc)
    assert same_form.isoformat() == example, f"fire times look like {example!r}"
    return stamp
