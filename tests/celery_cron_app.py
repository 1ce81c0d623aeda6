"""A Celery app for the stock-beat integration test of ``celery_leader.cron``.

Run as ``celery -A tests.celery_cron_app beat ...`` from the repository root;
the broker comes from CRON_TEST_BROKER_URL.  Beat only publishes, so no worker
is needed: the test reads the messages straight from the broker's Redis list.
"""

from __future__ import annotations

import os

from celery import Celery

from celery_leader.cron import cron

TASK_NAME = "celery_cron_app.tick"
QUEUE = "celery"  # the default queue, i.e. the Redis list beat's messages land in

app = Celery(
    "celery_cron_app",
    broker=os.environ.get("CRON_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    broker_connection_retry_on_startup=True,
    beat_schedule={
        "every-second": {"task": TASK_NAME, "schedule": cron("* * * * * *")},
    },
)


@app.task(name=TASK_NAME)
def tick() -> None:
    """Never executed here; only its messages are counted."""
