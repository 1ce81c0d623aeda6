"""Which guarantees column a worker's broker puts it in (celery_leader/brokers.py),
and the late ack forced on leader-only tasks where the leader queue goes through
kombu.  Real Celery apps and a real Redis; nothing is started (the AMQP and
in-memory transports are only named, never connected to)."""

from __future__ import annotations

import itertools
from typing import Any

import redis
from celery import Celery

from celery_leader import leader_only
from celery_leader.brokers import (
    OTHER_KOMBU,
    RABBITMQ,
    REDIS_ELSEWHERE,
    REDIS_ON_LEASE,
    broker_guarantees,
)
from celery_leader.settings import read_settings

_apps = itertools.count()


def _app(broker: str, lease: str) -> tuple[Celery, redis.Redis]:
    """An app whose task names are its own (leader-only tasks are known by name)."""
    main = f"brokers-test-{next(_apps)}"
    app = Celery(main, broker=broker, set_as_current=False)
    app.conf.update(leader_redis_url=lease, broker_connection_retry_on_startup=False)

    @leader_only
    @app.task(name=f"{main}.early", shared=False)
    def early() -> None:
        """Celery's default: early ack."""

    @app.task(name=f"{main}.plain", shared=False)
    def plain() -> None:
        """Not leader-only: never changed."""

    return app, redis.Redis.from_url(lease)


def _task(app: Celery, short: str) -> Any:
    return app.tasks[f"{app.main}.{short}"]


def _guarantees(broker: str, lease: str, use_eventloop: bool = True) -> tuple[str, list[str],
                                                                                 Celery]:
    app, client = _app(broker, lease)
    try:
        column, lines = broker_guarantees(app, read_settings(app), client, use_eventloop)
    finally:
        client.close()
    return column, lines, app


def test_the_lease_s_own_redis_keeps_the_task_s_ack_setting(redis_url: str) -> None:
    column, lines, app = _guarantees(redis_url, redis_url)
    assert column == REDIS_ON_LEASE
    assert not _task(app, "early").acks_late
    assert "in-flight records in Redis" in lines[0], lines
    assert "ticks are pushed by the script that clears their claim" in lines[1], lines


def test_without_an_event_loop_the_lease_s_redis_counts_as_elsewhere(redis_url: str) -> None:
    column, _, app = _guarantees(redis_url, redis_url, use_eventloop=False)
    assert column == REDIS_ELSEWHERE
    assert _task(app, "early").acks_late


def test_another_redis_database_forces_late_ack_on_leader_only_tasks_only(
        redis_url: str, other_redis_url: str) -> None:
    column, lines, app = _guarantees(other_redis_url, redis_url)
    assert column == REDIS_ELSEWHERE
    early, plain = _task(app, "early"), _task(app, "plain")
    assert early.acks_late and early.reject_on_worker_lost
    assert not plain.acks_late and not plain.reject_on_worker_lost
    assert f"made so here: {app.main}.early)" in lines[0], lines
    assert "visibility_timeout" in lines[0] and "celery/kombu#305" in lines[0], lines


def test_rabbitmq_and_other_transports_force_late_ack(redis_url: str) -> None:
    column, lines, app = _guarantees("amqp://guest:guest@127.0.0.1:1//", redis_url)
    assert column == RABBITMQ
    assert _task(app, "early").acks_late
    assert "consumer_timeout" in lines[0], lines
    column, lines, app = _guarantees("memory://", redis_url)
    assert column == OTHER_KOMBU
    assert _task(app, "early").acks_late
    assert "transport 'memory'" in lines[0], lines


def test_a_redis_broker_that_cannot_be_reached_counts_as_elsewhere(redis_url: str) -> None:
    column, lines, app = _guarantees("redis://127.0.0.1:1/0", redis_url)
    assert column == REDIS_ELSEWHERE
    assert _task(app, "early").acks_late
    assert lines[0].startswith("celery-leader: cannot inspect the Redis broker at start"), lines
