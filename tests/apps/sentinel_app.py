"""A Celery app whose broker and lease go through Sentinel, with a per-second
schedule whose task records each tick in another Redis (one that never fails).

Env: SENTINEL_URL (sentinel://h:p;sentinel://h:p/db, master ``mymaster``),
REDIS_URL (where ticks are recorded), LEADER_NAME, LEADER_WAIT_REPLICAS,
LEADER_WAIT_TIMEOUT.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

import celery_leader
from celery_leader import cron

app = Celery("sentinel_app", broker=os.environ["SENTINEL_URL"])
app.conf.update(
    broker_transport_options={"master_name": "mymaster"},
    leader_name=os.environ.get("LEADER_NAME", "sentinel_app"),
    leader_lease_duration=2.0,
    leader_renew_deadline=1.4,
    leader_retry_period=0.3,
    leader_catch_up="all",
    leader_wait_replicas=int(os.environ.get("LEADER_WAIT_REPLICAS", "0")),
    leader_wait_timeout=float(os.environ.get("LEADER_WAIT_TIMEOUT", "0.5")),
    beat_schedule={
        "every-second": {"task": "tests.apps.sentinel_app.tick",
                         "schedule": cron("* * * * * *"), "args": ("every-second",)},
    },
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
celery_leader.install(app)

_recorder = redis.Redis.from_url(os.environ["REDIS_URL"])


@app.task(bind=True)
def tick(self: Any, label: str) -> None:
    _recorder.rpush("test:ticks", json.dumps({
        "label": label, "fire_time": self.request.leader_fire_time,
        "term": self.request.leader_term, "task_id": self.request.id,
        "pid": os.getpid(), "at": time.time()}))
