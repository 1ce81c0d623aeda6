"""The app of tests/test_leader_queue_faults.py: a no-op leader-only task, and (with
FAULTS_BEAT=1) a per-second tick on the default queue that every replica consumes.

Env: REDIS_URL, the replica's broker and lease (its own TCP proxy in front of the
real Redis, so a test can cut it off); BROKER_URL, another broker (e.g.
RabbitMQ; the lease stays on REDIS_URL through leader_redis_url); EVENTS_URL,
the real Redis the records go to directly (so what a replica records is never
held by its own partition);
LEADER_NAME, LEADER_LEASE / LEADER_RENEW / LEADER_RETRY.

Records in ``test:events`` (JSON, ``at`` is ``time.monotonic()``, comparable across
the processes of this host): the leadership signals with the replica's
``identity``, every run of ``leader_noop`` (``task_start``: its task id, the term
the guard claimed it under, ``current_term()``, ``is_leader()`` and the identity of
the replica it ran on) and every run of ``tick`` (``tick_run``: its
``leader_fire_time`` header and task id).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

import celery_leader
from celery_leader import cron, leader_only, signals
from celery_leader.worker import current_controller

REDIS_URL = os.environ["REDIS_URL"]
EVENTS_URL = os.environ.get("EVENTS_URL", REDIS_URL)
BROKER_URL = os.environ.get("BROKER_URL") or REDIS_URL
LEADER_TASK = "tests.apps.faults_app.leader_noop"
EARLY_TASK = "tests.apps.faults_app.leader_early"
TICK_TASK = "tests.apps.faults_app.tick"

app = Celery("faults_app", broker=BROKER_URL)
app.conf.update(
    leader_redis_url=REDIS_URL,
    leader_name=os.environ.get("LEADER_NAME", "faults_app"),
    leader_lease_duration=float(os.environ.get("LEADER_LEASE", "2.0")),
    leader_renew_deadline=float(os.environ.get("LEADER_RENEW", "1.4")),
    leader_retry_period=float(os.environ.get("LEADER_RETRY", "0.3")),
    leader_beat=os.environ.get("FAULTS_BEAT") == "1",
    leader_catch_up="all",
    beat_schedule={
        "every-second": {"task": TICK_TASK, "schedule": cron("* * * * * *")},
    },
    worker_prefetch_multiplier=1,
    # Messages a dead or cut-off worker had taken (kombu's ``unacked`` hash) come
    # back within seconds, so every test can wait for them on a short bound.
    broker_transport_options={"visibility_timeout": 6, "unacked_restore_interval": 1,
                              "unacked_restore_throttle": 1},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
celery_leader.install(app)

_events = redis.Redis.from_url(EVENTS_URL, socket_timeout=5.0)


def record(kind: str, **fields: Any) -> None:
    fields.update(kind=kind, pid=os.getpid(), at=time.monotonic())
    _events.rpush("test:events", json.dumps(fields))


def _identity() -> str:
    controller = current_controller()
    return controller.identity if controller is not None else ""


@signals.started_leading.connect
def _started(sender: Any = None, identity: str = "", term: int = 0, **kw: Any) -> None:
    record("started_leading", identity=identity, term=term)


@signals.stopped_leading.connect
def _stopped(sender: Any = None, identity: str = "", term: int = 0, reason: str = "",
             **kw: Any) -> None:
    record("stopped_leading", identity=identity, term=term, reason=reason)


@leader_only
@app.task(bind=True, acks_late=True, name=LEADER_TASK)
def leader_noop(self: Any, label: str, seconds: float = 0.0) -> str:
    """Records its start; sleeps ``seconds`` (to keep the leader's pool busy)."""
    record("task_start", label=label, task_id=self.request.id,
           term=getattr(self.request, "leader_term", 0),
           current_term=celery_leader.current_term(), leading=celery_leader.is_leader(),
           identity=_identity())
    time.sleep(seconds)
    return label


@leader_only
@app.task(bind=True, name=EARLY_TASK)
def leader_early(self: Any, label: str, seconds: float = 0.0) -> str:
    """Celery's default early ack; records its start and its end."""
    record("task_start", label=label, task_id=self.request.id,
           term=getattr(self.request, "leader_term", 0),
           current_term=celery_leader.current_term(), leading=celery_leader.is_leader(),
           identity=_identity())
    time.sleep(seconds)
    record("task_done", label=label, task_id=self.request.id,
           term=getattr(self.request, "leader_term", 0))
    return label


@app.task(bind=True, acks_late=True, name=TICK_TASK)
def tick(self: Any) -> None:
    record("tick_run", fire_time=getattr(self.request, "leader_fire_time", None),
           sent_term=getattr(self.request, "leader_term", None), task_id=self.request.id,
           identity=_identity())
