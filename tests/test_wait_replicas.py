"""Opt-in WAIT for replica acknowledgement, and the start-up server warnings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from celery_leader import ClaimResult, LeaderElectionRecord, RedisLock, ReplicationError
from celery_leader.embedded import EmbeddedRedis
from tests.fakes import wait_until


@pytest.fixture
def primary_with_replica() -> Iterator[tuple[redis.Redis, redis.Redis]]:
    primary = EmbeddedRedis().start()
    replica = EmbeddedRedis(extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
    try:
        replica.start()
        client = redis.Redis.from_url(primary.url)
        replica_client = redis.Redis.from_url(replica.url)
        wait_until(lambda: replica_client.info("replication").get("master_link_status") == "up",
                   10.0, message="replica linked")
        yield client, replica_client
        client.close()
        replica_client.close()
    finally:
        replica.cleanup()
        primary.cleanup()


def test_acquire_without_a_replica_is_refused(redis_client: redis.Redis,
                                              election_name: str) -> None:
    lock = RedisLock(redis_client, election_name, "a", wait_replicas=1, wait_timeout=0.05)
    with pytest.raises(ReplicationError, match="term"):
        lock.create(LeaderElectionRecord("a", 5.0))


def test_acquire_and_claim_wait_for_the_replica(
        primary_with_replica: tuple[redis.Redis, redis.Redis], election_name: str) -> None:
    client, replica_client = primary_with_replica
    lock = RedisLock(client, election_name, "a", wait_replicas=1, wait_timeout=2.0)
    written = lock.create(LeaderElectionRecord("a", 5.0))
    assert written.record is not None
    # WAIT returned, so the replica already has the lease and the counter.
    assert replica_client.get(lock.lease_key) == written.raw
    assert lock.claim("tick", written.record.term) is ClaimResult.CLAIMED
    assert replica_client.exists(lock.key("tick"))
    # A renew keeps the term and does not wait.
    renewed = lock.update(LeaderElectionRecord("a", 5.0, term=written.record.term), written.raw)
    assert renewed.record is not None and renewed.record.term == written.record.term


def test_server_warnings_name_the_risky_settings(redis_client: redis.Redis,
                                                 election_name: str) -> None:
    lock = RedisLock(redis_client, election_name, "a")
    redis_client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        warnings = lock.server_warnings()
    finally:
        redis_client.config_set("maxmemory-policy", "noeviction")
    assert any("allkeys-lru" in w and "noeviction" in w for w in warnings)
    # The test server runs without persistence: terms could repeat after a restart.
    assert any("persistence is off" in w for w in warnings)
    assert not any("maxmemory-policy" in w for w in lock.server_warnings())
