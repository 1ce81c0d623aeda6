"""An app configured only through ``config_from_object(obj, namespace="CELERY")``.

The object holds CELERY_BROKER_URL = $REDIS_URL plus every key of the JSON
object in $CONFIG_JSON (e.g. ``{"CELERY_LEADER_LEASE_DURATION": "abc"}``), so
tests can hand a real worker any setting, of any JSON type, the Django way.
"""

from __future__ import annotations

import json
import os

from celery import Celery

import celery_leader


class Config:
    CELERY_BROKER_URL = os.environ["REDIS_URL"]
    CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True


for _key, _value in json.loads(os.environ.get("CONFIG_JSON", "{}")).items():
    setattr(Config, _key, _value)

app = Celery("config_app")
app.config_from_object(Config, namespace="CELERY")
celery_leader.install(app)
