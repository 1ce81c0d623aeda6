"""Shared fixtures: one real redis-server per test session (or REDIS_URL), and
TLS-only ones (tests/tlsredis.py), started only for the tests that ask for them.

Each test gets its own database number (flushed first) and a unique election
name, so tests never see each other's keys.  The server is stopped by PID.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_leader.embedded import EmbeddedRedis
from tests.django_db import postgres_db, postgres_server, sqlite_db  # noqa: F401 - fixtures
from tests.rabbitmq import rabbitmq_server, rabbitmq_url  # noqa: F401 - fixtures
from tests.sched_procs import Replicas
from tests.tlsredis import Certificates, TLSRedis, new_certificates, remove_certificates

DATABASES = 256
_db_numbers = itertools.cycle(range(1, DATABASES))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """Base URL (without db) of the Redis the tests use."""
    explicit = os.environ.get("REDIS_URL")
    if explicit:
        yield explicit.rsplit("/", 1)[0] if explicit.count("/") > 2 else explicit
        return
    server = EmbeddedRedis(extra_args=["--databases", str(DATABASES)])
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}"
    finally:
        server.cleanup()


def _fresh_database(redis_server: str) -> str:
    url = f"{redis_server}/{next(_db_numbers)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """A flushed database of its own for this test."""
    return _fresh_database(redis_server)


@pytest.fixture
def other_redis_url(redis_server: str, redis_url: str) -> str:
    """A second flushed database on the same server (e.g. a broker apart from the lease)."""
    return _fresh_database(redis_server)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def election_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------- TLS

@pytest.fixture(scope="session")
def tls_certificates() -> Iterator[Certificates]:
    """A throw-away CA, server and client certificates (tests/tlsredis.py)."""
    certs = new_certificates()
    try:
        yield certs
    finally:
        remove_certificates(certs)


@pytest.fixture(scope="session")
def tls_server(tls_certificates: Certificates) -> Iterator[TLSRedis]:
    """A TLS-only redis-server that verifies no client certificate."""
    server = TLSRedis(tls_certificates, auth_clients="no")
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def mtls_server(tls_certificates: Certificates) -> Iterator[TLSRedis]:
    """A TLS-only redis-server that requires a client certificate (mutual TLS)."""
    server = TLSRedis(tls_certificates, auth_clients="yes")
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str, election_name: str) -> Iterator[Replicas]:
    """Real worker and beat processes of tests.apps.beat_app (tests/sched_procs.py),
    each stopped by PID at the end; their logs shown when the test failed."""
    procs = Replicas(tmp_path, redis_url, election_name)
    try:
        yield procs
    finally:
        procs.stop()
        print(procs.logs())  # shown by pytest only when the test failed
