"""A schedule of one entry every 2 s whose ticks record themselves, a task that
keeps a worker busy, and a short visibility timeout (tests/test_held_tick.py).

Env: REDIS_URL, LEADER_NAME, VISIBILITY_TIMEOUT (seconds).  A standalone beat
dispatches (``leader_beat = False`` on the workers); each worker with
``-c 1`` and prefetch multiplier 1 takes one tick ahead while it is busy.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

import celery_leader

REDIS_URL = os.environ["REDIS_URL"]
app = Celery("held_tick_app", broker=REDIS_URL)
app.conf.update(
    leader_name=os.environ.get("LEADER_NAME", "held_tick_app"),
    leader_lease_duration=2.0, leader_renew_deadline=1.4, leader_retry_period=0.3,
    leader_beat=False,
    leader_catch_up="all",
    beat_schedule={"every-2s": {"task": "tests.apps.held_tick_app.tick", "schedule": 2.0,
                                "args": ("every-2s",)}},
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": int(os.environ["VISIBILITY_TIMEOUT"]),
                              "unacked_restore_interval": 1, "unacked_restore_throttle": 1},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
celery_leader.install(app)

_client = redis.Redis.from_url(REDIS_URL)


@app.task
def block(seconds: float) -> None:
    _client.rpush("test:blocked", os.getpid())
    time.sleep(seconds)


@app.task(bind=True)
def tick(self: Any, label: str) -> None:
    _client.rpush("test:ticks", json.dumps({
        "label": label, "fire_time": self.request.leader_fire_time,
        "term": self.request.leader_term, "task_id": self.request.id,
        "pid": os.getpid(), "at": time.time()}))
