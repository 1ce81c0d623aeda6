"""The fenced publish: with the broker on the lease's Redis, a tick's message is
pushed to the broker list in a fenced script, either the one that claims it
(the herd's, from the entry's message template) or, for a tick sent through
``send_task`` (something listens to ``before_task_publish``, or the entry has
no template), PUBLISH_TICK_LUA, in the same step that clears its pending copy.

Ticks are dispatched as the scheduler's loop does, through the herd
(tests/dispatch.py); tests parametrized over ``path`` run both ways.  Against a
real Redis used as both lease store and broker; the messages are read back from
the broker lists exactly as a worker would find them.  That real workers
consume them is shown by test_scheduler_failover.py and the chaos suite.
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
from celery.signals import before_task_publish

from celery_leader.entries import entry_from_config
from celery_leader.publish import Unsupported, capture_redis_publish, same_redis
from celery_leader.redislock import RedisLock
from celery_leader.schedule import runner as scheduler
from celery_leader.scheduler import ScheduleRunner
from celery_leader.settings import LeaderSettings
from tests.dispatch import fire
from tests.test_docs import documented_acl_rule
from tests.test_scheduler_unit import lead

UTC = timezone.utc
# The optional grant of docs/deployment.md's ACL table.
OPTIONAL_BROKER_GRANT = ["~celery*", "~unacked", "+lpush", "+rpush", "+rpop", "+lpos",
                         "+blmove"]
FIRE = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)
# How a tick reaches the broker: pushed by the herd's claim ("template") or sent
# through send_task and pushed by PUBLISH_TICK_LUA ("send_task").
PATHS = ["template", "send_task"]


def _listening(**kwargs: Any) -> None:
    """A before_task_publish receiver that does nothing (as a tracer's would)."""


class Rig:
    def __init__(self, lease_url: str, name: str) -> None:
        self.lease_url = lease_url
        self.name = name
        self.client = redis.Redis.from_url(lease_url)
        self.apps: list[Celery] = []
        self.listening = False

    def lead(self, identity: str) -> tuple[RedisLock, int]:
        return lead(self.client, self.name, identity)

    def runner(self, lock: RedisLock, broker: str | None = None, tick_run_once: bool = True,
               send_task: bool = False, **conf: Any) -> ScheduleRunner:
        """``send_task``: something listens to ``before_task_publish`` (until
        close()), so the herd sends every tick through ``send_task`` after its
        claim (PUBLISH_TICK_LUA), not from a template."""
        if send_task and not self.listening:
            before_task_publish.connect(_listening, weak=False)
            self.listening = True
        app = Celery("atomic", broker=broker or self.lease_url, set_as_current=False)
        app.conf.update(leader_name=self.name, beat_schedule={}, **conf)
        self.apps.append(app)
        settings = LeaderSettings(redis_url=self.lease_url, name=self.name, retry_period=0.1,
                                  tick_run_once=tick_run_once)
        return ScheduleRunner(app, lock, settings)

    def fire(self, runner: ScheduleRunner, term: int, at: datetime = FIRE,
             **spec: Any) -> str:
        """Claim and publish ``at`` for an entry, as the loop does; the tick's name."""
        entry = entry_from_config("job", {"task": "proj.job", "schedule": 60.0,
                                          "args": ["a"], **spec}, runner.app)
        assert fire(runner, entry, at, term)
        return f"job@{round(at.timestamp() * 1000)}"

    def pending(self, lock: RedisLock) -> dict[bytes, bytes]:
        return dict(self.client.hgetall(lock.key("schedule:pending")))

    def close(self) -> None:
        if self.listening:
            before_task_publish.disconnect(_listening)
            self.listening = False
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


def atomic_after(path: str, atomic: bool) -> bool | None:
    """``runner.atomic_publish`` after a publish: None while only the herd's
    claim pushed (PUBLISH_TICK_LUA was never needed)."""
    return None if path == "template" and atomic else atomic


@pytest.mark.parametrize("path", PATHS)
def test_a_tick_reaches_the_broker_list_with_its_claim_cleared(rig: Rig, path: str) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock, send_task=path == "send_task")
    tick = rig.fire(runner, term)
    [message] = messages(rig.client, "celery")
    assert runner.atomic_publish is atomic_after(path, True) and runner.dispatched == 1
    headers = message["headers"]
    assert headers["task"] == "proj.job"
    assert headers["leader_fire_time"] == FIRE.isoformat()
    assert headers["leader_term"] == term
    assert body(message)[0] == ["a"]
    assert message["properties"]["delivery_info"]["routing_key"] == "celery"
    assert rig.pending(lock) == {}
    state = json.loads(rig.client.hget(lock.key("schedule:state"), "job") or b"{}")
    assert state["task_id"] == headers["id"] and tick.startswith("job@")


@pytest.mark.parametrize("path", PATHS)
def test_queue_priority_and_key_prefix_are_kombus_own(rig: Rig, path: str) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock, send_task=path == "send_task",
                        broker_transport_options={"global_keyprefix": "pfx:"})
    rig.fire(runner, term, options={"queue": "ticks", "priority": 3})
    assert runner.atomic_publish is atomic_after(path, True) and runner.dispatched == 1
    # kombu's Redis transport: priority 3 goes to "<queue>\x06\x163", under the prefix.
    [message] = messages(rig.client, "pfx:ticks\x06\x163")
    assert message["properties"]["priority"] == 3
    assert rig.client.llen("ticks") == 0 and rig.client.llen("celery") == 0


def test_a_deposed_leader_pushes_nothing_and_leaves_the_tick_pending(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Its leadership check passed; only the fenced script can refuse, and it
    does, before pushing anything.  (Sent through send_task: a tick pushed from
    its template is pushed by its claim, with no such window.)"""
    lock, term = rig.lead("a")
    runner = rig.runner(lock, send_task=True)
    deposed: list[int] = []

    def leading_then_deposed() -> bool:
        if not deposed:  # between the check and the publish, another replica takes over
            deposed.append(rig.lead("b")[1])
        return True

    runner.still_leading = leading_then_deposed
    with caplog.at_level(logging.WARNING, logger="celery_leader.scheduler"):
        rig.fire(runner, term)
    assert deposed and rig.client.llen("celery") == 0 and runner.dispatched == 0
    assert len(rig.pending(lock)) == 1
    assert f"term {term} ended before" in caplog.text


def test_a_publish_retried_after_a_lost_reply_is_not_sent_twice(rig: Rig) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock, send_task=True)
    publish = runner._publish
    published: list[tuple[str, str]] = []

    def remember(tick: str, message: str, term: int) -> None:
        published.append((tick, message))
        publish(tick, message, term)

    runner._publish = remember  # type: ignore[method-assign]
    rig.fire(runner, term)
    [(tick, message)] = published
    publish(tick, message, term)  # as when the script ran but its reply was lost
    assert rig.client.llen("celery") == 1 and runner.dispatched == 1


@pytest.mark.parametrize("path", PATHS)
def test_a_broker_in_another_database_falls_back_to_publish_then_clear(
        rig: Rig, other_redis_url: str, path: str) -> None:
    lock, term = rig.lead("a")
    runner = rig.runner(lock, broker=other_redis_url, send_task=path == "send_task")
    rig.fire(runner, term)
    # The herd never tries to push to another server: only send_task finds out.
    assert runner.atomic_publish is (None if path == "template" else False)
    assert runner.dispatched == 1
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
    runner = rig.runner(lock, send_task=True)
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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("may_push", [False, True], ids=["election-keys-only", "may-push"])
def test_an_acl_user_that_may_not_push_to_the_queue_falls_back_once_with_a_warning(
        redis_url: str, election_name: str, may_push: bool, path: str,
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
        runner = made.runner(lock, broker=redis_url, send_task=path == "send_task")
        with caplog.at_level(logging.WARNING, logger="celery_leader.scheduler"):
            made.fire(runner, term)
            made.fire(runner, term, at=FIRE.replace(minute=7))
        assert runner.atomic_publish is atomic_after(path, may_push)
        assert admin.llen("celery") == 2 and runner.dispatched == 2
        assert made.pending(lock) == {}
        warnings = caplog.text.count("may not push to the broker's queue")
        assert warnings == (0 if may_push else 1)
    finally:
        made.close()
        admin.acl_deluser(user)
        admin.close()
