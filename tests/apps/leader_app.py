"""A Celery app for integration tests; everything it does is recorded in Redis.

Configured from the environment: REDIS_URL (broker and election), LEADER_* timings.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

import celery_leader
from celery_leader import leader_only, signals

REDIS_URL = os.environ["REDIS_URL"]
app = Celery("leader_app", broker=REDIS_URL)
app.conf.update(
    leader_name=os.environ.get("LEADER_NAME", "leader_app"),
    leader_lease_duration=float(os.environ.get("LEADER_LEASE", "2.0")),
    leader_renew_deadline=float(os.environ.get("LEADER_RENEW", "1.4")),
    leader_retry_period=float(os.environ.get("LEADER_RETRY", "0.3")),
    leader_beat=False,
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": 6, "unacked_restore_interval": 1,
                              "unacked_restore_throttle": 1},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if os.environ.get("LEADER_HEALTHZ_PORT"):
    app.conf.leader_healthz_port = int(os.environ["LEADER_HEALTHZ_PORT"])
celery_leader.install(app)

_client = redis.Redis.from_url(REDIS_URL)


def record(kind: str, **fields: Any) -> None:
    fields.update(kind=kind, pid=os.getpid(), at=time.monotonic())
    _client.rpush("test:events", json.dumps(fields))


@signals.started_leading.connect
def _started(sender: Any = None, identity: str = "", term: int = 0, **kw: Any) -> None:
    record("started_leading", identity=identity, term=term)


@signals.stopped_leading.connect
def _stopped(sender: Any = None, identity: str = "", term: int = 0, reason: str = "",
             **kw: Any) -> None:
    record("stopped_leading", identity=identity, term=term, reason=reason)


@signals.new_leader.connect
def _new(sender: Any = None, identity: str = "", term: int = 0, **kw: Any) -> None:
    record("new_leader", identity=identity, term=term)


@leader_only
@app.task(bind=True, acks_late=True)
def leader_work(self: Any, label: str, seconds: float = 0.0) -> str:
    record("task_start", label=label, term=self.request.leader_term,
           leading=celery_leader.is_leader(), task_id=self.request.id)
    time.sleep(seconds)
    record("task_done", label=label, term=self.request.leader_term, task_id=self.request.id)
    return label


@app.task(bind=True)
def plain_work(self: Any, label: str) -> str:
    """An ordinary task (any replica runs it), e.g. a tick's."""
    record("plain_start", label=label, task_id=self.request.id,
           tick=getattr(self.request, "leader_tick", None))
    return label
