"""The TCP proxy of the fault tests (tests/tcpproxy.py), against the real Redis."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.tcpproxy import TcpProxy
from tests.waiting import wait_until

PING = b"*1\r\n$4\r\nPING\r\n"


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    with TcpProxy.to_url(redis_url) as running:
        yield running


def through(proxy: TcpProxy, redis_url: str, timeout: float = 0.5) -> redis.Redis:
    return redis.Redis.from_url(proxy.url(redis_url), socket_timeout=timeout,
                                socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))


def raw(proxy: TcpProxy, redis_url: str) -> socket.socket:
    """A bare RESP connection through the proxy, on the test's database."""
    db = redis_url.rsplit("/", 1)[1].encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2.0)
    sock.sendall(b"*2\r\n$6\r\nSELECT\r\n$%d\r\n%s\r\n" % (len(db), db) + PING)
    received = b""
    while len(received) < len(b"+OK\r\n+PONG\r\n"):
        received += sock.recv(100)
    assert received == b"+OK\r\n+PONG\r\n"
    return sock


def test_forwards_until_partitioned_then_holds_both_directions(
        proxy: TcpProxy, redis_url: str, redis_client: redis.Redis) -> None:
    client = through(proxy, redis_url)
    assert client.ping() is True
    proxy.partition()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    # A new connection made during the partition is accepted but goes nowhere.
    with pytest.raises(redis.TimeoutError):
        through(proxy, redis_url).ping()
    client.close()


def test_heal_delivers_the_command_and_the_reply_held_during_the_cut(
        proxy: TcpProxy, redis_url: str, redis_client: redis.Redis) -> None:
    sock = raw(proxy, redis_url)
    proxy.partition()
    sock.sendall(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n")
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(100)
    assert redis_client.get("n") is None  # the command waits in the cut
    proxy.heal()
    sock.settimeout(2.0)
    assert sock.recv(100) == b":1\r\n"
    assert redis_client.get("n") == b"1"
    sock.close()


def test_a_blocked_pop_takes_a_message_into_the_cut_and_reset_loses_it(
        proxy: TcpProxy, redis_url: str, redis_client: redis.Redis) -> None:
    """What kombu's consumer suffers (celery/kombu#305): Redis pops the message
    into a connection whose other end never reads it."""
    sock = raw(proxy, redis_url)
    proxy.partition_after(lambda chunk: b"BRPOP" in chunk)
    sock.sendall(b"*3\r\n$5\r\nBRPOP\r\n$1\r\nq\r\n$1\r\n5\r\n")
    wait_until(lambda: proxy.partitioned, 2.0, "the cut right after the BRPOP")
    wait_until(lambda: proxy.blocked_in(b"BRPOP"), 2.0, "the BRPOP to be pending")
    wait_until(lambda: redis_client.client_list(_type="normal")
               and any(c["cmd"] == "brpop" for c in redis_client.client_list()),
               2.0, "Redis to hold the BRPOP")
    redis_client.lpush("q", "message")
    wait_until(lambda: redis_client.llen("q") == 0, 2.0, "Redis to pop it into the cut")
    dropped = proxy.reset()
    assert list(dropped.values()) == [b"*2\r\n$1\r\nq\r\n$7\r\nmessage\r\n"]
    sock.settimeout(2.0)
    with pytest.raises(ConnectionResetError):
        sock.recv(100)
    assert redis_client.llen("q") == 0  # gone


def test_reset_rsts_the_connections_of_the_cut_and_serves_new_ones(
        proxy: TcpProxy, redis_url: str) -> None:
    client = through(proxy, redis_url, timeout=5.0)
    errors: list[BaseException] = []

    def wait_in_redis() -> None:
        try:
            client.blpop(["nothing"], timeout=4)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_in_redis)
    waiter.start()
    wait_until(lambda: proxy.blocked_in(b"BLPOP"), 2.0, "the BLPOP to be pending")
    before = raw(proxy, redis_url)
    proxy.partition()
    during = socket.create_connection(("127.0.0.1", proxy.port), timeout=2.0)
    wait_until(lambda: proxy.connections() == 3, 2.0, "the connection made during the cut")
    proxy.reset()
    waiter.join(5.0)
    assert len(errors) == 1 and isinstance(errors[0], redis.ConnectionError), errors
    for sock in (before, during):
        sock.settimeout(2.0)
        with pytest.raises(ConnectionResetError):
            sock.sendall(PING)
            sock.recv(100)
    assert client.ping() is True  # a new connection is forwarded
    assert not proxy.partitioned


def test_close_stops_the_thread_and_every_connection(redis_url: str) -> None:
    proxy = TcpProxy.to_url(redis_url)
    sock = raw(proxy, redis_url)
    threads = {t.name for t in threading.enumerate()}
    assert f"tcpproxy-{proxy.port}" in threads
    proxy.close()
    assert f"tcpproxy-{proxy.port}" not in {t.name for t in threading.enumerate()}
    sock.settimeout(2.0)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        sock.sendall(PING)
        if not sock.recv(100):
            raise ConnectionResetError("closed")
