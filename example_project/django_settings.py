"""The same settings the Django way: upper case with the ``CELERY_`` prefix.

In a Django project these lines go into ``settings.py`` and the app loads them
with ``app.config_from_object("django.conf:settings", namespace="CELERY")``;
celery-leader reads ``CELERY_LEADER_*`` like any other Celery setting.  The
example app loads this module instead of ``celeryconfig`` when
``EXAMPLE_SETTINGS=django``.
"""

import os
from datetime import timedelta

from celery.schedules import crontab

from celery_leader import cron

REDIS_URL = os.environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/0")

CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": float(os.environ.get("EXAMPLE_VISIBILITY_TIMEOUT", "3600")),
}
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("EXAMPLE_TASK_QUEUE", "celery")
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"

CELERY_LEADER_REDIS_URL = os.environ.get("EXAMPLE_LEADER_REDIS_URL", REDIS_URL)
CELERY_LEADER_NAME = os.environ.get("EXAMPLE_LEADER_NAME", "example-project")
CELERY_LEADER_LEASE_DURATION = float(os.environ.get("EXAMPLE_LEASE_DURATION", "15"))
CELERY_LEADER_RENEW_DEADLINE = float(os.environ.get("EXAMPLE_RENEW_DEADLINE", "10"))
CELERY_LEADER_RETRY_PERIOD = float(os.environ.get("EXAMPLE_RETRY_PERIOD", "2"))
CELERY_LEADER_RELEASE_ON_CANCEL = True
CELERY_LEADER_BEAT = True
CELERY_LEADER_CATCH_UP = "all"
CELERY_LEADER_QUEUE = os.environ.get("EXAMPLE_LEADER_QUEUE", "celery_leader")
CELERY_LEADER_HEALTHZ_PORT = int(os.environ["EXAMPLE_HEALTHZ_PORT"]) \
    if os.environ.get("EXAMPLE_HEALTHZ_PORT") else None

CELERY_BEAT_SCHEDULE = {
    "audit-heartbeat": {
        "task": "example_project.tasks.heartbeat",
        "schedule": cron("* * * * * *"),
    },
    "daily-report": {
        "task": "example_project.tasks.send_daily_report",
        "schedule": cron("30 7 * * mon-fri", tz="Europe/Berlin"),
        "catch_up": "latest",
    },
    "weekly-digest": {
        "task": "example_project.tasks.send_weekly_digest",
        "schedule": crontab(minute=0, hour=9, day_of_week="mon"),
        "catch_up": "none",
    },
    "refresh-exchange-rates": {
        "task": "example_project.tasks.refresh_exchange_rates",
        "schedule": timedelta(seconds=10),
        "args": ("EUR", "USD"),
    },
    "purge-expired-sessions": {
        "task": "example_project.tasks.purge_expired_sessions",
        "schedule": 5.0,
    },
}
