"""A Django project's Celery app (``namespace="CELERY"``) whose schedule lives in
django-celery-beat's tables (``CELERY_LEADER_DJANGO_CELERY_BEAT = True``); its
task records each tick in Redis like tests.apps.beat_app's.  Env: see
tests/django_proj/settings.py."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import django
import redis
from celery import Celery

import celery_leader

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_proj.settings")
django.setup()

app = Celery("django_app")
app.config_from_object("django.conf:settings", namespace="CELERY")
celery_leader.install(app)

_client = redis.Redis.from_url(os.environ["REDIS_URL"])


@app.task(bind=True)
def tick(self: Any, label: str) -> None:
    _client.rpush("test:ticks", json.dumps({
        "label": label, "fire_time": self.request.leader_fire_time,
        "term": self.request.leader_term, "task_id": self.request.id,
        "pid": os.getpid(), "at": time.time()}))
