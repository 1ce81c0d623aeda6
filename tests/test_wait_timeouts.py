"""``leader_wait_timeout`` checked at start-up against the timeouts around it.

A WAIT for a missing replica blocks the lock's connection for the whole
``leader_wait_timeout``; the client's socket must outlast it, or every such
answer becomes a client timeout and a retried command.  The derived socket
timeout always does; an explicit one that does not is refused with one line
naming both settings.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from celery_leader import ConfigurationError, LeaderElectionRecord, ReplicationError
from celery_leader.election.config import WAIT_MARGIN
from celery_leader.integration import controller_for_worker
from celery_leader.settings import read_settings

BROKER = "redis://127.0.0.1:6390/2"


def make_app(**conf: Any) -> Celery:
    app = Celery("proj", set_as_current=False)
    app.conf.update(broker_url=BROKER, **conf)
    return app


WAITING = {"leader_wait_replicas": 1, "leader_wait_timeout": 0.5}

REFUSED = [
    ({**WAITING, "leader_redis_options": {"socket_timeout": 0.5}},
     "leader_redis_options['socket_timeout'] (0.5) must exceed leader_wait_timeout (0.5) by at "
     "least 0.5s: the client would time out before Redis answers that no replica "
     "acknowledged; raise leader_redis_options['socket_timeout'] or lower leader_wait_timeout"),
    ({**WAITING, "leader_redis_options": {"socket_timeout": 0.9}},
     "leader_redis_options['socket_timeout'] (0.9) must exceed leader_wait_timeout (0.5) by"),
    ({**WAITING, "leader_wait_timeout": 10},
     "leader_wait_timeout (10.0) must be below leader_renew_deadline (10.0)"),
    ({**WAITING, "leader_wait_timeout": 0.0004},
     "leader_wait_timeout must be at least 0.001s (Redis counts WAIT in milliseconds and "
     "WAIT 0 blocks forever), got 0.0004"),
]


@pytest.mark.parametrize(("conf", "message"), REFUSED,
                         ids=["socket-equal", "socket-within-margin", "renew", "zero-ms"])
def test_a_wait_that_could_outlast_its_socket_or_leadership_is_refused(
        conf: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        read_settings(make_app(**conf))
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_the_worker_stops_at_start_with_one_line_naming_both_settings(
        capsys: pytest.CaptureFixture[str]) -> None:
    app = make_app(**REFUSED[0][0])
    worker = SimpleNamespace(app=app, pool_cls="prefork", hostname="w1@host")
    with pytest.raises(SystemExit) as caught:
        controller_for_worker(worker, {})
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"celery-leader: configuration error: {REFUSED[0][1]}\n"


@pytest.mark.parametrize("conf", [
    {"leader_redis_options": {"socket_timeout": 0.1}, "leader_wait_timeout": 20},  # no WAIT
    {**WAITING, "leader_redis_options": {"socket_timeout": 1.0}},
    {**WAITING, "leader_redis_options": {"socket_timeout": None}},  # no timeout at all
], ids=["no-replicas-to-wait-for", "socket-just-long-enough", "no-socket-timeout"])
def test_combinations_that_fit_are_accepted(conf: dict[str, Any]) -> None:
    read_settings(make_app(**conf))


@pytest.mark.parametrize(("retry", "wait", "expected"), [
    (0.3, 0.5, 0.5 + WAIT_MARGIN),  # the reported case: was max(0.5 s, retry) = the WAIT
    (2.0, 0.5, 2.0),  # the retry period already outlasts it
    (2.0, 3.0, 3.0 + WAIT_MARGIN),
])
def test_the_derived_socket_timeout_outlasts_the_wait(retry: float, wait: float,
                                                      expected: float) -> None:
    settings = read_settings(make_app(leader_wait_replicas=1, leader_wait_timeout=wait,
                                      leader_retry_period=retry, leader_renew_deadline=5,
                                      leader_lease_duration=8))
    client = settings.redis_client()
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == expected
        assert kwargs["socket_connect_timeout"] == max(0.5, retry)  # unchanged
    finally:
        client.close()
    without_wait = read_settings(make_app(leader_wait_timeout=wait, leader_retry_period=retry,
                                          leader_renew_deadline=5, leader_lease_duration=8))
    client = without_wait.redis_client()
    try:
        assert client.connection_pool.connection_kwargs["socket_timeout"] == max(0.5, retry)
    finally:
        client.close()


def test_a_wait_nobody_acknowledges_is_answered_not_timed_out(
        redis_url: str, election_name: str) -> None:
    # A real Redis with no replica: WAIT returns 0 after leader_wait_timeout, and
    # the lock reports it as such, once, instead of the client timing out first.
    settings = read_settings(make_app(
        leader_redis_url=redis_url, leader_wait_replicas=1, leader_wait_timeout=0.5,
        leader_retry_period=0.3, leader_renew_deadline=1.4, leader_lease_duration=2.0))
    lock = settings.lock("a", name=election_name)
    try:
        started = time.monotonic()
        with pytest.raises(ReplicationError, match="fewer than 1 replica"):
            lock.create(LeaderElectionRecord("a", 2.0))
        took = time.monotonic() - started
        assert 0.5 <= took < 0.5 + WAIT_MARGIN, took
    finally:
        lock.client.close()
