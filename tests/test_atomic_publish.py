"""The fenced publish: with the broker on the lease's Redis, a tick's message is
pushed to the broker list in the same script that clears its pending copy.

Against a real Redis used as both lease store and broker; the messages are read
back from the broker lists exactly as a worker would find them.  That real
workers consume them is shown by test_scheduler_failover.py and the chaos suite.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import redis
from celery import Celery

from celery_leader.entries import entry_from_config
from celery_leader.publish import Unsupported, capture_redis_publish, same_redis
from celery_leader.redislock import RedisLock
from celery_leader.schedule import runner as scheduler
from celery_leader.scheduler import ScheduleRunner
from celery_leader.settings import LeaderSettings
from tests.test_docs import documented_acl_rule
from tests.test_scheduler_unit import lead

UTC = timezone.utc
# The optional grant of docs/deployment.md's ACL table.
OPTIONAL_BROKER_GRANT = ["~celery*", "~unacked", "+lpush", "+rpush", "+rpop", "+lpos",
                         "+blmove"]
FIRE = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)


class Rig:
    def __init__(self, lease_url: str, name: str) -> None:
        self.lease_url = lease_url
        self.name = name
        self.client = redis.Redis.from_url(lease_url)
        self.apps: list[Celery] = []

    def lead(self, identity: str) -> tuple[RedisLock, int]:
        return lead(self.client, self.name, identity)

    def runner(self, lock: RedisLock, broker: str | None = None, tick_run_once: bool = True,
               **conf: Any) -> ScheduleRunner:
        app = Celery("atomic", broker=broker or self.lease_url, set_as_current=False)
        app.conf.update(leader_name=self.name, beat_schedule={}, **conf)
        self.apps.append(app)
        settings = LeaderSettings(redis_url=self.lease_url, name=self.name, retry_period=0.1,
                                  tick_run_once=tick_run_once)
        return ScheduleRunner(app, lock, settings)

    def fire(self, runner: ScheduleRunner, term: int, **spec: Any) -> str:
        """Claim and publish FIRE for an entry; the tick's name."""
        entry = entry_from_config("job", {"task": "proj.job", "schedule": 60.0,
                                          "args": ["a"], **spec}, runner.app)
        assert runner._claim_and_publish(entry, FIRE, term, publish=True)
        return f"job@{round(FIRE.timestamp() * 1000)}"

    def pending(self, lock: RedisLock) -> dict[bytes, bytes]:
        return dict(self.client.hgetall(lock.key("schedule:pending")))

    def close(self) -> None:
        for app in self.apps:
            app.close()
        self.client.close()


@pytest.fixture
def rig(redis_url: str, election_name: str) -> Iterator[Rig]:
    made = Rig(redis_url, election_name)
    yield made
    made.close()


def messages(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(key, 0, -1)]


def body(message: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(message["body"]))


def test_a_tick_reaches_the_broker_list_with_its_claim_cleared(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    tick = rig.fire(runner, term)
    [message] = messages(rig.client, "celery")
    assert runner.atomic_publish is True and runner.dispatched == 1
    headers = message["headers"]
    assert headers["task"] == "proj.job"
    assert headers["leader_fire_time"] == FIRE.isoformat()
    assert headers["leader_term"] == term
    assert body(message)[0] == ["a"]
    assert message["properties"]["delivery_info"]["routing_key"] == "celery"
    assert rig.pending(lock) == {}
    state = json.loads(rig.client.hget(lock.key("schedule:state"), "job") or b"{}")
    assert state["task_id"] == headers["id"] and tick.startswith("job@")


def test_queue_priority_and_key_prefix_are_kombus_own(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock, broker_transport_options={"global_keyprefix": "pfx:"})
    rig.fire(runner, term, options={"queue": "ticks", "priority": 3})
    assert runner.atomic_publish is True
    # kombu's Redis transport: priority 3 goes to "<queue>\x06\x163", under the prefix.
    [message] = messages(rig.client, "pfx:ticks\x06\x163")
    assert message["properties"]["priority"] == 3
    assert rig.client.llen("ticks") == 0 and rig.client.llen("celery") == 0


def test_a_deposed_leader_pushes_nothing_and_leaves_the_tick_pending(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Its leadership check passed (still_leading is always True here); only the
    fenced script can refuse, and it does, before pushing anything."""
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    entry = entry_from_config("job", {"task": "proj.job", "schedule": 60.0}, runner.app)
    publish = runner._publish

    def deposed_then_publish(tick: str, message: str, term: int) -> None:
        rig.lead("b")  # between the claim and the publish, another replica takes over
        publish(tick, message, term)

    runner._publish = deposed_then_publish  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="celery_leader.scheduler"):
        assert runner._claim_and_publish(entry, FIRE, term, publish=True)
    assert rig.client.llen("celery") == 0
    assert len(rig.pending(lock)) == 1
    assert f"term {term} ended before" in caplog.text


def test_a_publish_retried_after_a_lost_reply_is_not_sent_twice(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    entry = entry_from_config("job", {"task": "proj.job", "schedule": 60.0}, runner.app)
    publish = runner._publish
    published: list[tuple[str, str]] = []

    def remember(tick: str, message: str, term: int) -> None:
        published.append((tick, message))
        publish(tick, message, term)

    runner._publish = remember  # type: ignore[method-assign]
    assert runner._claim_and_publish(entry, FIRE, term, publish=True)
    [(tick, message)] = published
    publish(tick, message, term)  # as when the script ran but its reply was lost
    assert rig.client.llen("celery") == 1 and runner.dispatched == 1


def test_a_broker_in_another_database_falls_back_to_publish_then_clear(
        rig: Rig, other_redis_url: str) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock, broker=other_redis_url)
    rig.fire(runner, term)
    assert runner.atomic_publish is False and runner.dispatched == 1
    broker = redis.Redis.from_url(other_redis_url)
    try:
        [message] = messages(broker, "celery")
    finally:
        broker.close()
    assert message["headers"]["leader_term"] == term
    assert rig.client.llen("celery") == 0 and rig.pending(lock) == {}


def test_a_fanout_publish_cannot_be_captured_and_nothing_is_sent(rig: Rig) -> None:
    from kombu import Exchange

    app = Celery("atomic", broker=rig.lease_url, set_as_current=False)
    rig.apps.append(app)
    pubsub = rig.client.pubsub()
    pubsub.psubscribe("*everyone*")
    pubsub.get_message(timeout=1.0)  # the subscription's confirmation

    def send(producer: Any) -> None:
        exchange = Exchange("everyone", type="fanout")
        exchange(producer.channel).declare()
        producer.publish({"x": 1}, exchange=exchange, routing_key="x")

    with pytest.raises(Unsupported, match="fanout exchange"):
        capture_redis_publish(app, rig.client, send)
    assert pubsub.get_message(timeout=0.2) is None
    pubsub.close()


def test_an_entry_that_cannot_be_captured_is_sent_the_ordinary_way_with_a_warning(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def unsupported(*args: Any, **kwargs: Any) -> None:
        raise Unsupported("fanout exchange")

    monkeypatch.setattr(scheduler, "capture_redis_publish", unsupported)
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    with caplog.at_level(logging.WARNING, logger="celery_leader.scheduler"):
        rig.fire(runner, term)
    assert "entry 'job' is published after its claim, not with it (fanout exchange)" \
        in caplog.text
    assert runner.dispatched == 1 and rig.pending(lock) == {}
    assert rig.client.llen("celery") == 1


@pytest.mark.parametrize(("lease", "broker", "same"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", True),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1", False),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6380/0", False),
    ("redis://leader@127.0.0.1:6379/0", "redis://broker@127.0.0.1:6379/0", True),
    ("unix:///tmp/r.sock?db=2", "unix:///tmp/r.sock?db=2", True),
])
def test_same_redis_means_same_server_and_database(lease: str, broker: str,
                                                        same: bool) -> None:
    assert same_redis(redis.Redis.from_url(lease), redis.Redis.from_url(broker)) is same


def test_a_client_without_one_known_server_is_never_the_same() -> None:
    sentinel_like = type("SentinelClient", (), {})()
    assert not same_redis(sentinel_like, redis.Redis.from_url("redis://127.0.0.1:6379/0"))


@pytest.mark.parametrize("may_push", [False, True], ids=["election-keys-only", "may-push"])
def test_an_acl_user_that_may_not_push_to_the_queue_falls_back_once_with_a_warning(
        redis_url: str, election_name: str, may_push: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """The lease on an ACL user limited by the rule of docs/deployment.md (and,
    in the second case, its optional +lpush), the broker on the default user of
    the same database."""
    admin = redis.Redis.from_url(redis_url)
    user = f"u-{election_name}"
    admin.acl_setuser(user, reset=True)
    rule = documented_acl_rule().replace(">CHANGE-ME", ">pw").split()
    admin.execute_command("ACL", "SETUSER", user, *rule,
                          *(OPTIONAL_BROKER_GRANT if may_push else []))
    host_db = redis_url.split("://", 1)[1]
    made = Rig(f"redis://{user}:pw@{host_db}", election_name)
    try:
        lock, term = made.lead("a")
        runner = made.runner(lock, broker=redis_url)
        with caplog.at_level(logging.WARNING, logger="celery_leader.scheduler"):
            made.fire(runner, term)
            runner._claim_and_publish(
                entry_from_config("job", {"task": "proj.job", "schedule": 60.0}, runner.app),
                FIRE.replace(minute=7), term, publish=True)
        assert runner.atomic_publish is may_push
        assert admin.llen("celery") == 2 and runner.dispatched == 2
        assert made.pending(lock) == {}
        warnings = caplog.text.count("may not push to the broker's queue")
        assert warnings == (0 if may_push else 1)
    finally:
        made.close()
        admin.acl_deluser(user)
        admin.close()
