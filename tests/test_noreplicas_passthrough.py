"""A write Redis refuses (NOREPLICAS on 7.x with ``min-replicas-to-write``) is
reported as Redis said it, never as a damaged term counter to delete."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest
import redis

from celery_leader import LeaderElectionRecord, RedisLock
from celery_leader.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration


def _redis_7() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         check=True).stdout
    major = int(out.split("v=", 1)[1].split(".", 1)[0])
    return binary if major >= 7 else None


@pytest.fixture
def refusing_primary() -> Iterator[redis.Redis]:
    """Redis 7.x with ``min-replicas-to-write 1`` and no replica: scripts are refused."""
    binary = _redis_7()
    if binary is None:
        pytest.skip("no redis-server 7.x on PATH (tests/tls/install-redis-server.sh installs one)")
    server = EmbeddedRedis(extra_args=["--min-replicas-to-write", "1",
                                       "--min-replicas-max-lag", "10"])
    server.binary = binary
    server.start()
    client = redis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        client.close()
        server.cleanup()


def test_noreplicas_is_passed_through_unchanged(refusing_primary: redis.Redis,
                                                election_name: str) -> None:
    lock = RedisLock(refusing_primary, election_name, "a")
    with pytest.raises(redis.ResponseError) as refused:
        lock.create(LeaderElectionRecord("a", 5.0))
    message = str(refused.value)
    assert message.startswith("NOREPLICAS"), message
    assert "unusable" not in message and "deleting" not in message, message
    assert not refusing_primary.exists(lock.lease_key, lock.counter_key)


def test_a_damaged_counter_is_still_named(refusing_primary: redis.Redis,
                                          election_name: str) -> None:
    # The same server once writes are allowed: the counter's own error keeps its advice.
    refusing_primary.config_set("min-replicas-to-write", "0")
    lock = RedisLock(refusing_primary, election_name, "a")
    refusing_primary.hset(lock.counter_key, "version", "twelve")
    with pytest.raises(redis.ResponseError, match=r"term counter .* is unusable"):
        lock.create(LeaderElectionRecord("a", 5.0))
