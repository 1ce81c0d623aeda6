"""HealthzAdaptor and the /healthz server, on 127.0.0.1 with a free port."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from celery import Celery

from celery_leader import (
    FakeClock,
    HealthCheckError,
    HealthzAdaptor,
    HealthzServer,
    LeaderCallbacks,
    LeaderElectionConfig,
    LeaderElector,
    RedisLock,
    serve_healthz,
)
from celery_leader.config import JITTER_FACTOR
from celery_leader.elector import MAX_BACKOFF_FACTOR
from celery_leader.resourcelock import ResourceLock
from celery_leader.settings import read_settings
from celery_leader.worker import LeaderController
from tests.fakes import FakeStore, lead_without_threads, wait_until

LEASE = 1.0
RENEW = 0.75
RETRY = 0.25
T0 = 1000.0


def get(server: HealthzServer, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


@contextmanager
def serving(adaptor: HealthzAdaptor, routes: dict[str, Any] | None = None
            ) -> Iterator[HealthzServer]:
    server = serve_healthz(adaptor, 0, host="127.0.0.1", routes=routes)
    try:
        yield server
    finally:
        server.close()


def elector_on(lock: ResourceLock, adaptor: HealthzAdaptor, clock: FakeClock | None = None
               ) -> LeaderElector:
    config = LeaderElectionConfig(
        lock=lock,
        callbacks=LeaderCallbacks(lambda stop: stop.wait(), lambda: None),
        lease_duration=LEASE, renew_deadline=RENEW, retry_period=RETRY,
        watchdog=adaptor, name="healthz-test",
    )
    return LeaderElector(config, clock=clock)


def test_healthy_before_an_elector_is_attached() -> None:
    adaptor = HealthzAdaptor()
    adaptor.check()
    with serving(adaptor) as server:
        assert server.port > 0
        assert get(server, "/healthz") == (200, "text/plain", "ok\n")
        assert get(server, "/healthz?verbose=1")[0] == 200


def test_leader_that_stops_renewing_turns_unhealthy_after_lease_plus_timeout() -> None:
    # The adaptor reaches the elector only through config.watchdog.
    clock = FakeClock(T0)
    adaptor = HealthzAdaptor(timeout=0.5)
    elector = elector_on(FakeStore().lock("a"), adaptor, clock)
    lead_without_threads(elector)
    with serving(adaptor) as server:
        assert get(server, "/healthz")[0] == 200
        clock.now = T0 + LEASE + 0.5  # exactly lease + timeout: still tolerated
        assert get(server, "/healthz")[0] == 200
        clock.now = T0 + LEASE + 0.5 + 0.001
        status, content_type, body = get(server, "/healthz")
        assert (status, content_type) == (500, "text/plain")
        assert body.startswith("[-]leaderElection failed: failed election to renew leadership")
        with pytest.raises(HealthCheckError):
            adaptor.check()

        # A renew makes it healthy again.
        assert elector.try_acquire_or_renew()
        assert get(server, "/healthz")[0] == 200


def test_for_lease_fails_after_two_leases_without_renewal() -> None:
    """What README and docs/deployment.md promise: 500 once a leader has not
    renewed for two lease durations (the lease plus one lease of tolerance)."""
    clock = FakeClock(T0)
    adaptor = HealthzAdaptor.for_lease(LEASE)
    elector = elector_on(FakeStore().lock("a"), adaptor, clock)
    lead_without_threads(elector)
    with serving(adaptor) as server:
        clock.now = T0 + LEASE + 0.001  # the lease expired: still tolerated
        assert get(server, "/healthz")[0] == 200
        clock.now = T0 + 2 * LEASE
        assert get(server, "/healthz")[0] == 200
        clock.now = T0 + 2 * LEASE + 0.001
        status, _, body = get(server, "/healthz")
        assert status == 500 and "failed election to renew leadership" in body


def test_the_worker_healthz_tolerates_one_lease_past_the_lease(redis_url: str) -> None:
    """The worker builds its adaptor with for_lease(leader_lease_duration)."""
    app = Celery("healthz_app", broker=redis_url, set_as_current=False)
    app.conf.update(leader_lease_duration=LEASE, leader_renew_deadline=RENEW,
                    leader_retry_period=RETRY, leader_beat=False)
    controller = LeaderController(app, read_settings(app), hostname="w1@host")
    assert controller.elector.config.watchdog is controller.healthz
    # Re-attach the worker's adaptor to an elector on a fake clock with the same lease.
    clock = FakeClock(T0)
    elector = elector_on(FakeStore().lock("a"), controller.healthz, clock)
    lead_without_threads(elector)
    clock.now = T0 + 2 * LEASE
    controller.healthz.check()
    clock.now = T0 + 2 * LEASE + 0.001
    with pytest.raises(HealthCheckError, match="failed election to renew leadership"):
        controller.healthz.check()


def test_follower_is_healthy_however_old_the_leaders_lease() -> None:
    clock = FakeClock(T0)
    store = FakeStore()
    adaptor = HealthzAdaptor(timeout=0.0)
    leader = elector_on(store.lock("a"), HealthzAdaptor(), clock)
    follower = elector_on(store.lock("b"), adaptor, clock)
    lead_without_threads(leader)
    assert not follower.try_acquire_or_renew()
    clock.now = T0 + 100.0
    with serving(adaptor) as server:
        assert get(server, "/healthz")[0] == 200


def test_wedged_election_loop_is_unhealthy() -> None:
    """The loop hangs inside a lock call that never returns (a dead connection
    without timeouts): the probe must fail once the loop bound has passed."""
    clock = FakeClock(T0)
    store = FakeStore()
    other = elector_on(store.lock("other"), HealthzAdaptor(), clock)
    assert other.try_acquire_or_renew()  # someone else leads; ours follows

    lock = store.lock("a")
    entered = threading.Event()
    unblock = threading.Event()

    def hang(operation: str) -> None:
        entered.set()
        unblock.wait(10.0)

    adaptor = HealthzAdaptor(timeout=0.5)
    elector = elector_on(lock, adaptor, clock)
    stop = threading.Event()
    thread = threading.Thread(target=elector.run, args=(stop,), daemon=True)
    lock.before_call = hang
    thread.start()
    try:
        with serving(adaptor) as server:
            wait_until(entered.is_set, 5.0, message="election loop reached the lock")
            assert get(server, "/healthz")[0] == 200
            # loop bound: max(lease, 2.2 x retry x max back-off + renew deadline) + 0.5 timeout
            bound = max(LEASE, (1 + JITTER_FACTOR) * RETRY * MAX_BACKOFF_FACTOR + RENEW) + 0.5
            clock.now = T0 + bound - 0.05
            assert get(server, "/healthz")[0] == 200
            clock.now = T0 + bound + 0.05
            status, _, body = get(server, "/healthz")
            assert status == 500
            assert "stalled" in body
    finally:
        stop.set()
        elector.stop()
        unblock.set()
        thread.join(5.0)
    assert not thread.is_alive()


def test_the_worker_serves_on_loopback_unless_told_otherwise(redis_url: str) -> None:
    """/leader tells whoever connects who leads, as which host and pid, without
    authentication: by default only this host can connect (a pod binds its pod IP,
    docs/deployment.md)."""
    app = Celery("healthz_app", broker=redis_url, set_as_current=False)
    app.conf.update(leader_lease_duration=LEASE, leader_renew_deadline=RENEW,
                    leader_retry_period=RETRY, leader_beat=False, leader_healthz_port=0)
    settings = read_settings(app)
    assert settings.healthz_host == "127.0.0.1"
    controller = LeaderController(app, settings, hostname="w1@host")
    controller.start()
    try:
        assert controller.http is not None
        port = controller.http.port
        assert get(controller.http, "/healthz")[0] == 200
        # Bound to 127.0.0.1 alone, not to every address: another loopback
        # address can still take the same port.
        with socket.socket() as other:
            other.bind(("127.0.0.2", port))
    finally:
        controller.shutdown()


def test_extra_routes_serve_json_and_unknown_paths_404() -> None:
    calls: list[str] = []

    def leader_route() -> tuple[int, Any]:
        calls.append("leader")
        return 200, {"leader": "worker-1", "term": 7}

    def failing_route() -> tuple[int, Any]:
        return 503, {"ok": False}

    with serving(HealthzAdaptor(), routes={"/leader": leader_route,
                                           "/ready": failing_route}) as server:
        status, content_type, body = get(server, "/leader?x=1")
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body) == {"leader": "worker-1", "term": 7}
        assert calls == ["leader"]
        status, _, body = get(server, "/ready")
        assert status == 503 and json.loads(body) == {"ok": False}
        assert get(server, "/nope")[0] == 404
        assert get(server, "/healthz")[0] == 200  # extra routes do not shadow it


def test_close_stops_serving() -> None:
    server = serve_healthz(HealthzAdaptor(), 0, host="127.0.0.1")
    port = server.port
    assert get(server, "/healthz")[0] == 200
    server.close()
    with pytest.raises(OSError):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            conn.getresponse()
        finally:
            conn.close()


def test_healthz_of_a_real_elector_on_redis(redis_client: redis.Redis,
                                            election_name: str) -> None:
    adaptor = HealthzAdaptor(timeout=0.5)
    elector = elector_on(RedisLock(redis_client, name=election_name, identity="a"), adaptor)
    stop = threading.Event()
    thread = threading.Thread(target=elector.run, args=(stop,), daemon=True)
    thread.start()
    try:
        with serving(adaptor, routes={"/leader": lambda: (200, {
                "leader": elector.get_leader(), "is_leader": elector.is_leader()})}) as server:
            wait_until(elector.is_leader, 5.0, message="elector leads")
            assert get(server, "/healthz")[0] == 200
            status, _, body = get(server, "/leader")
            assert status == 200 and json.loads(body) == {"leader": "a", "is_leader": True}
    finally:
        elector.stop()
        thread.join(5.0)
    assert not thread.is_alive()
