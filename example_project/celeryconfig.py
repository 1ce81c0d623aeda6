"""Settings of the example project, loaded with ``app.config_from_object``.

Whatever differs between deployments comes from the environment, so the same
module runs in production (the defaults below) and in the demo, which starts
replicas with ``EXAMPLE_LEASE_DURATION=2`` and friends.
"""

import os
from datetime import timedelta

from celery.schedules import crontab

from celery_leader import cron

REDIS_URL = os.environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/0")

broker_url = REDIS_URL
broker_connection_retry_on_startup = True
# Redis redelivers a message a worker took but never acknowledged (it was
# killed) after this many seconds.
broker_transport_options = {
    "visibility_timeout": float(os.environ.get("EXAMPLE_VISIBILITY_TIMEOUT", "3600")),
}
task_default_queue = os.environ.get("EXAMPLE_TASK_QUEUE", "celery")
task_ignore_result = True
worker_prefetch_multiplier = 1
timezone = "UTC"

# --- celery-leader ------------------------------------------------------------
# The election may live elsewhere (its own Redis, or a user limited by an ACL).
leader_redis_url = os.environ.get("EXAMPLE_LEADER_REDIS_URL", REDIS_URL)
leader_name = os.environ.get("EXAMPLE_LEADER_NAME", "example-project")
leader_lease_duration = float(os.environ.get("EXAMPLE_LEASE_DURATION", "15"))
leader_renew_deadline = float(os.environ.get("EXAMPLE_RENEW_DEADLINE", "10"))
leader_retry_period = float(os.environ.get("EXAMPLE_RETRY_PERIOD", "2"))
leader_release_on_cancel = True  # hand over at once on a warm shutdown
leader_beat = True  # the leading worker runs beat_schedule: no separate beat process
leader_catch_up = "all"  # a new leader sends every tick its predecessor missed
leader_queue = os.environ.get("EXAMPLE_LEADER_QUEUE", "celery_leader")
leader_healthz_port = int(os.environ["EXAMPLE_HEALTHZ_PORT"]) \
    if os.environ.get("EXAMPLE_HEALTHZ_PORT") else None

beat_schedule = {
    # Every second.  With catch-up "all" every second is sent exactly once,
    # across crashes and hand-overs: the demo checks that on this entry.
    "audit-heartbeat": {
        "task": "example_project.tasks.heartbeat",
        "schedule": cron("* * * * * *"),
    },
    # 07:30 on weekdays in Berlin, also on the days clocks change.
    "daily-report": {
        "task": "example_project.tasks.send_daily_report",
        "schedule": cron("30 7 * * mon-fri", tz="Europe/Berlin"),
        "catch_up": "latest",  # after an outage, one report, not one per missed day
    },
    # Celery's own crontab works too (in the app's timezone).
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
    # A @leader_only task: routed to leader_queue, which only the leader consumes.
    "purge-expired-sessions": {
        "task": "example_project.tasks.purge_expired_sessions",
        "schedule": 5.0,
    },
}
