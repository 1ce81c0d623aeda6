"""Real ``celery beat -S leader`` replicas while their Redis is down: no retry storm.

Each replica reaches Redis through its own TCP proxy (tests/tcpproxy.py), which
counts the connections that replica opens; the Redis is SIGKILLed (connections
refused at once, the fastest a retry can fail) and started again on its port.
The elector-level count is in tests/test_elector_multiprocess.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_leader.elector import MAX_BACKOFF_FACTOR
from celery_leader.embedded import EmbeddedRedis
from tests.fakes import observe
from tests.sched_procs import RETRY, Replicas
from tests.tcpproxy import TcpProxy
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

OUTAGE = 3.0


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.cleanup()


def test_standalone_beats_do_not_storm_a_killed_redis_and_one_leads_again(
        tmp_path: Path, server: EmbeddedRedis, election_name: str) -> None:
    proxies = [TcpProxy("127.0.0.1", server.port) for _ in range(2)]
    groups: list[Replicas] = []
    revived: EmbeddedRedis | None = None
    try:
        for index, proxy in enumerate(proxies):
            directory = tmp_path / f"beat{index}"
            directory.mkdir()
            groups.append(Replicas(directory, proxy.url(server.url), election_name))
            groups[-1].beat()

        def logs() -> str:
            return "\n".join(group.logs() for group in groups)

        election = f"{election_name}-beat"
        pids = {group.procs[0].pid for group in groups}

        def a_beat_leads() -> bool:
            lease = groups[0].lease(election)  # groups[0] reads through its proxy
            holder = str((lease or {}).get("holderIdentity", ""))
            return holder.rsplit(":", 1)[-1].isdigit() and int(holder.rsplit(":", 1)[1]) in pids

        wait_until(a_beat_leads, 60, "a beat leads", logs)
        for group in groups:
            wait_until(lambda g=group: "beat: Starting" in g.procs[0].log(), 30,
                       "every beat started", logs)

        connections = [proxy.accepted() for proxy in proxies]
        down_at = time.monotonic()
        server.stop(signal.SIGKILL)
        observe(OUTAGE, lambda: all(g.procs[0].alive() for g in groups) or pytest.fail(logs()))
        during = [proxy.accepted() - before
                  for proxy, before in zip(proxies, connections, strict=True)]
        # Per beat: its elector (redis-py tries each command up to 4 times), two
        # pub/sub listeners with their own back-off, and the leader's renewals
        # and scheduler retries (one per retry period until its renew deadline).
        # Before the elector's back-off fix: 859 and 930 in 5 s.
        assert all(n <= 4 * (1 + OUTAGE / RETRY) for n in during), \
            (f"connections per beat over {time.monotonic() - down_at:.1f}s: {during}", logs())

        up_at = time.monotonic()
        revived = EmbeddedRedis(port=server.port).start()
        # No persistence: the lease is gone with the old server; the first beat to
        # contend after the restart leads, within the warned back-off bound.
        wait_until(a_beat_leads, RETRY * MAX_BACKOFF_FACTOR + 10.0, "a beat leads again", logs)
        assert time.monotonic() - up_at <= RETRY * MAX_BACKOFF_FACTOR + 2.0, logs()
        for group in groups:
            wait_until(lambda g=group: "reachable again" in g.procs[0].log(), 10.0,
                       "every beat reached Redis again", logs)
    finally:
        for group in groups:
            group.stop()
        for proxy in proxies:
            proxy.close()
        if revived is not None:
            revived.stop()
