"""An app whose settings live in a config module (tests.apps.cron_config)."""

from __future__ import annotations

from celery import Celery

import celery_leader

app = Celery("cron_config_app")
app.config_from_object("tests.apps.cron_config")
celery_leader.install(app)


@app.task
def nightly() -> None:
    pass
