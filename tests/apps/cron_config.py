"""A config module, loaded by Celery the usual way (``config_from_object("...")``),
that builds ``cron($CRON_EXPR)`` at import: an invalid one fails right there."""

from __future__ import annotations

import os

from celery_leader import cron

broker_url = os.environ["REDIS_URL"]
broker_connection_retry_on_startup = True
leader_name = os.environ.get("LEADER_NAME", "cron_config_app")
beat_schedule = {
    "nightly": {"task": "tests.apps.cron_config_app.nightly",
                "schedule": cron(os.environ.get("CRON_EXPR", "0 3 * * *"))},
}
