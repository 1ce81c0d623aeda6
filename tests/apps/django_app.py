"""A Django project's Celery app (``namespace="CELERY"``) whose schedule lives in
django-celery-beat's tables (``CELERY_LEADER_DJANGO_CELERY_BEAT = True``); its
task records each tick in Redis like tests.apps.beat_app's.  Env: see
tests/django_proj/settings.py.

With ``LEADER_TEST_HOLDS=1`` a test can aim a fault at the worst moment for the
rows' run counts: it sets ``test:hold-after-claim``; the leader's next batch that
claims a django-celery-beat tick then stops right after its script call returned
(the ticks claimed and pushed, nothing after the call run yet), records
``{"pid", "term", "ticks"}`` in ``test:holds`` and sleeps until it is killed."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import django
import redis
from celery import Celery

import celery_leader
from celery_leader.schedule.herd import HERD_CLAIMED, HerdDispatcher

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


HOLD_KEY, HOLDS_KEY = "test:hold-after-claim", "test:holds"


def _hold_after_claim() -> None:
    applied = HerdDispatcher._applied

    def held(self: HerdDispatcher, batch: Any, prepared: Any, codes: str, term: int) -> None:
        sent = [claim for claim, code in zip(batch, codes, strict=True)
                if code == HERD_CLAIMED and claim.publish and claim.entry.source]
        if sent and _client.delete(HOLD_KEY):  # one hold per request
            _client.rpush(HOLDS_KEY, json.dumps({
                "pid": os.getpid(), "term": term,
                "ticks": [f"{c.entry.name}@{c.fire_ms}" for c in sent]}))
            time.sleep(120)  # the test kills this process now
        applied(self, batch, prepared, codes, term)

    HerdDispatcher._applied = held  # type: ignore[method-assign]


if os.environ.get("LEADER_TEST_HOLDS") == "1":
    _hold_after_claim()
