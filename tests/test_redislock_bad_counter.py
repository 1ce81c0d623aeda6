"""A term counter damaged by hand gives a clear error naming it, and the
elector keeps running (it logs, it does not crash, it does not lead)."""

from __future__ import annotations

import logging
import threading

import pytest
import redis

from celery_leader import (
    LeaderCallbacks,
    LeaderElectionConfig,
    LeaderElectionRecord,
    LeaderElector,
    RedisLock,
)
from tests.fakes import wait_until


@pytest.mark.parametrize("damage", ["string", "not-an-integer"])
def test_damaged_counter_is_named_in_the_error(redis_client: redis.Redis, election_name: str,
                                               damage: str) -> None:
    lock = RedisLock(redis_client, election_name, "a")
    if damage == "string":
        redis_client.set(lock.counter_key, "garbage")
    else:
        redis_client.hset(lock.counter_key, "version", "twelve")
    with pytest.raises(redis.ResponseError, match=r"term counter .*counter is unusable"):
        lock.create(LeaderElectionRecord("a", 5.0))
    assert redis_client.exists(lock.lease_key) == 0  # nothing half-written


def test_elector_survives_a_damaged_counter(redis_client: redis.Redis, election_name: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    lock = RedisLock(redis_client, election_name, "a")
    redis_client.set(lock.counter_key, "garbage")
    started = threading.Event()
    elector = LeaderElector(LeaderElectionConfig(
        lock=lock, lease_duration=1.0, renew_deadline=0.7, retry_period=0.1,
        callbacks=LeaderCallbacks(on_started_leading=lambda stop: started.set(),
                                  on_stopped_leading=lambda: None)))
    stop = threading.Event()
    thread = threading.Thread(target=elector.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.WARNING, logger="celery_leader.elector"):
        thread.start()
        try:
            wait_until(lambda: "is unusable" in caplog.text, 5.0, message="a clear warning")
            assert thread.is_alive() and not started.is_set()
            # Repaired by hand: it leads again without a restart.
            redis_client.delete(lock.counter_key)
            wait_until(started.is_set, 5.0, message="leads after the repair")
        finally:
            elector.stop()
            thread.join(5.0)
    assert caplog.text.count("is unusable") == 1  # one line, not one per retry
