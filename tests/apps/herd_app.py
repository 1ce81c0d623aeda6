"""A Celery app whose schedule herds: HERD_N entries all due every 6 seconds.

No task runs them (no worker consumes): the test reads the messages from the
broker list.  Env: REDIS_URL, LEADER_NAME, LEADER_CATCH_UP (latest|all|none),
HERD_N.
"""

from __future__ import annotations

import os

from celery import Celery

import celery_leader
from celery_leader import cron

REDIS_URL = os.environ["REDIS_URL"]
HERD_N = int(os.environ.get("HERD_N", "2000"))
app = Celery("herd_app", broker=REDIS_URL)
app.conf.update(
    leader_name=os.environ.get("LEADER_NAME", "herd_app"),
    leader_lease_duration=2.0,
    leader_renew_deadline=1.4,
    leader_retry_period=0.3,
    leader_beat=False,
    leader_catch_up=os.environ.get("LEADER_CATCH_UP", "all"),
    beat_schedule={
        f"h{i:05d}": {"task": "herd_app.report", "schedule": cron("*/6 * * * * *"),
                      "args": (i,)}
        for i in range(HERD_N)
    },
    broker_connection_retry_on_startup=True,
)
celery_leader.install(app)
