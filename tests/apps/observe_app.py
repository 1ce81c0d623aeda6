"""leader_app with the schedule on (an entry every half second) and the status
settings from the environment: LEADER_HEALTHZ_TOKEN, LEADER_METRICS_PER_ENTRY,
LEADER_METRICS_PER_TASK (tests/test_observe.py)."""

from __future__ import annotations

import os

from tests.apps.leader_app import app, leader_work, plain_work

__all__ = ["app", "leader_work", "plain_work"]

app.conf.update(
    leader_beat=True,
    beat_schedule={"half-second": {"task": "tests.apps.leader_app.plain_work",
                                   "schedule": 0.5, "args": ("tick",)}},
    leader_metrics_per_entry=os.environ.get("LEADER_METRICS_PER_ENTRY") == "1",
    leader_metrics_per_task=os.environ.get("LEADER_METRICS_PER_TASK") == "1",
)
if os.environ.get("LEADER_HEALTHZ_TOKEN"):
    app.conf.leader_healthz_token = os.environ["LEADER_HEALTHZ_TOKEN"]
