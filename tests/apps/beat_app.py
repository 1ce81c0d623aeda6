"""A Celery app with a per-second schedule whose task records each tick in Redis.

Env: REDIS_URL, LEADER_NAME, LEADER_CATCH_UP (latest|all|none), LEADER_BEAT (1/0),
LEADER_LEASE / LEADER_RENEW / LEADER_RETRY, LEADER_HEALTHZ_PORT and
LEADER_HEALTHZ_TOKEN (the health port and its token, when set).
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

REDIS_URL = os.environ["REDIS_URL"]
app = Celery("beat_app", broker=REDIS_URL)
app.conf.update(
    leader_name=os.environ.get("LEADER_NAME", "beat_app"),
    leader_lease_duration=float(os.environ.get("LEADER_LEASE", "2.0")),
    leader_renew_deadline=float(os.environ.get("LEADER_RENEW", "1.4")),
    leader_retry_period=float(os.environ.get("LEADER_RETRY", "0.3")),
    leader_beat=os.environ.get("LEADER_BEAT", "1") == "1",
    leader_catch_up=os.environ.get("LEADER_CATCH_UP", "all"),
    beat_schedule={
        "every-second": {"task": "tests.apps.beat_app.tick", "schedule": cron("* * * * * *"),
                         "args": ("every-second",)},
    },
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if os.environ.get("LEADER_HEALTHZ_PORT"):
    app.conf.leader_healthz_port = int(os.environ["LEADER_HEALTHZ_PORT"])
if os.environ.get("LEADER_HEALTHZ_TOKEN"):
    app.conf.leader_healthz_token = os.environ["LEADER_HEALTHZ_TOKEN"]
celery_leader.install(app)

_client = redis.Redis.from_url(REDIS_URL)


@app.task(bind=True)
def tick(self: Any, label: str) -> None:
    _client.rpush("test:ticks", json.dumps({
        "label": label, "fire_time": self.request.leader_fire_time,
        "term": self.request.leader_term, "task_id": self.request.id,
        "pid": os.getpid(), "at": time.time()}))
