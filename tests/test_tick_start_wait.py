"""A tick's start claim waits for leader_wait_replicas before its body runs.

A real primary and a real replica whose replication stream passes through a
TCP proxy: while the proxy holds the stream, the replica lags, and a start
claim (or a fenced claim) must not return before the replica has it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_leader import ClaimResult, LeaderElectionRecord, RedisLock, ReplicationError
from celery_leader.embedded import EmbeddedRedis
from celery_leader.leaderqueue import FinishRun, task_claim_key
from celery_leader.schedule.tickstart import TickStartClaim
from tests.tcpproxy import TcpProxy
from tests.topologies import ClusterTopology
from tests.waiting import wait_until


@pytest.fixture
def lagging_replica() -> Iterator[tuple[redis.Redis, redis.Redis, TcpProxy]]:
    """(primary client, replica client, the proxy the replica's link goes through)."""
    primary = EmbeddedRedis().start()
    proxy = TcpProxy("127.0.0.1", primary.port)
    replica = EmbeddedRedis(extra_args=["--replicaof", "127.0.0.1", str(proxy.port)])
    try:
        replica.start()
        client = redis.Redis.from_url(primary.url, socket_timeout=10)
        replica_client = redis.Redis.from_url(replica.url)
        wait_until(lambda: replica_client.info("replication").get("master_link_status") == "up",
                   10.0, "replica linked")
        yield client, replica_client, proxy
        client.close()
        replica_client.close()
    finally:
        proxy.close()
        replica.cleanup()
        primary.cleanup()


def _tick_keys(client: redis.Redis, tick: str) -> list[str]:
    base = f"t-{uuid.uuid4().hex[:8]}"
    keys = [f"{base}:started", f"{base}:sent", f"{base}:sent-at"]
    client.hset(keys[1], tick, "record")
    client.zadd(keys[2], {tick: 1})
    return keys


def _in_thread(call: object) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        out["result"] = call()  # type: ignore[operator]
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_start_claim_returns_only_once_the_replica_has_the_consumption(
        lagging_replica: tuple[redis.Redis, redis.Redis, TcpProxy]) -> None:
    client, replica_client, proxy = lagging_replica
    keys = _tick_keys(client, "tick-1")
    wait_until(lambda: replica_client.hexists(keys[1], "tick-1"), 5.0, "record replicated")
    claim = TickStartClaim(lambda: client, wait_replicas=1, wait_timeout=5.0)
    proxy.partition()  # the replica lags from here
    thread, out = _in_thread(lambda: claim.claim("tick-1", keys))
    held = 0.7
    time.sleep(held)  # how long the stream is held (the fault), not a wait for an outcome
    assert "result" not in out, "the claim returned while the replica lacked it"
    assert replica_client.hexists(keys[1], "tick-1")  # the replica is really behind
    healed = time.monotonic()
    proxy.heal()
    thread.join(10.0)
    assert out.get("result") is True
    assert float(out["at"]) >= healed  # type: ignore[arg-type]
    # WAIT returned: the replica has the consumption (a fail-over now finds no token).
    assert not replica_client.hexists(keys[1], "tick-1")
    # A second copy is told it already started.
    assert claim.claim("tick-1", keys) is False


def test_fenced_claim_returns_only_once_the_replica_has_it(
        lagging_replica: tuple[redis.Redis, redis.Redis, TcpProxy]) -> None:
    client, replica_client, proxy = lagging_replica
    name = f"test-{uuid.uuid4().hex[:8]}"
    lock = RedisLock(client, name, "a", wait_replicas=1, wait_timeout=5.0)
    written = lock.create(LeaderElectionRecord("a", 30.0))
    assert written.record is not None
    proxy.partition()
    thread, out = _in_thread(lambda: lock.claim("fire", written.record.term))  # type: ignore[union-attr]
    time.sleep(0.5)  # the fault's length
    assert "result" not in out, "the claim returned while the replica lacked it"
    proxy.heal()
    thread.join(10.0)
    assert out.get("result") is ClaimResult.CLAIMED
    assert replica_client.exists(lock.key("fire"))


def test_without_a_replica_the_body_still_runs_after_the_timeout_with_a_warning(
        redis_client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    keys = _tick_keys(redis_client, "tick-2")
    claim = TickStartClaim(lambda: redis_client, wait_replicas=1, wait_timeout=0.3)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="celery_leader.tickstart"):
        assert claim.claim("tick-2", keys) is True
    assert time.monotonic() - started >= 0.3
    assert any("tick-2" in r.getMessage() and "not acknowledged" in r.getMessage()
               for r in caplog.records)
    assert not redis_client.hexists(keys[1], "tick-2")  # consumed: no copy runs
    assert claim.claim("tick-2", keys) is False


def test_on_a_cluster_the_write_and_its_wait_go_to_the_key_s_node(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No replicas in this cluster: every WAIT answers 0 after its timeout, from
    the node that holds the key (a keyless WAIT would go to every primary)."""
    with ClusterTopology(tmp_path) as cluster:
        client = cluster.client()
        try:
            name = f"test-{uuid.uuid4().hex[:8]}"
            lock = RedisLock(client, name, "a", wait_replicas=1, wait_timeout=0.1)
            with pytest.raises(ReplicationError, match="term"):
                lock.create(LeaderElectionRecord("a", 5.0))
            written = lock.get().record  # written all the same, just not led on
            assert written is not None
            with caplog.at_level(logging.WARNING, logger="celery_leader.redislock"):
                assert lock.claim("fire", written.term) is ClaimResult.CLAIMED
            assert "not acknowledged" in caplog.text
            keys = [lock.key("started"), lock.key("sent"), lock.key("sent-at")]
            client.hset(keys[1], "tick-3", "record")
            claim = TickStartClaim(lambda: client, wait_replicas=1, wait_timeout=0.1)
            assert claim.claim("tick-3", keys) is True
            assert not client.hexists(keys[1], "tick-3")
        finally:
            client.close()


def test_the_end_of_a_leader_only_run_returns_only_once_the_replica_has_it(
        lagging_replica: tuple[redis.Redis, redis.Redis, TcpProxy]) -> None:
    """A fail-over must keep the 'done' that refuses a copy of a finished run."""
    client, replica_client, proxy = lagging_replica
    lock = RedisLock(client, f"test-{uuid.uuid4().hex[:8]}", "a", wait_replicas=1,
                     wait_timeout=5.0)
    finish = FinishRun(lock)
    proxy.partition()
    thread, out = _in_thread(lambda: finish("task-1", True, 60_000, None))
    time.sleep(0.5)  # the fault's length
    assert "at" not in out, "the end returned while the replica lacked it"
    healed = time.monotonic()
    proxy.heal()
    thread.join(10.0)
    assert float(out["at"]) >= healed  # type: ignore[arg-type]
    assert replica_client.get(task_claim_key(lock, "task-1")) == b"done"
