"""A Celery app whose broker and election both reach Redis over TLS (tests/test_tls.py).

REDIS_URL is a ``rediss://`` URL carrying the TLS options as query parameters
(``ssl_cert_reqs``, ``ssl_ca_certs`` and, for mutual TLS, ``ssl_certfile`` and
``ssl_keyfile``): the events recorder reads it as it is.  TLS_FORM says how the
app hands them to Celery and the election, the two ways docs/deployment.md shows:

- ``options``: the plain ``rediss://`` URL with ``broker_use_ssl`` for the broker
  and ``leader_redis_url`` + ``leader_redis_options`` for the election;
  LEASE_SSL_* env vars (e.g. LEASE_SSL_CA_CERTS) override one option of the
  election's only.
- ``url``: ``broker_url`` is the URL with its query, and the election falls back
  to it (no leader_redis_* setting at all).

The leading worker runs ``beat_schedule`` (a tick every second) and the tick
task records the term that sent it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis
from celery import Celery

import celery_leader
from celery_leader import signals

REDIS_URL = os.environ["REDIS_URL"]
FORM = os.environ.get("TLS_FORM", "options")

app = Celery("tls_app")
app.conf.update(
    leader_name=os.environ.get("LEADER_NAME", "tls_app"),
    leader_lease_duration=float(os.environ.get("LEADER_LEASE", "2.0")),
    leader_renew_deadline=float(os.environ.get("LEADER_RENEW", "1.4")),
    leader_retry_period=float(os.environ.get("LEADER_RETRY", "0.3")),
    leader_beat=True,
    beat_schedule={"tick": {"task": "tests.apps.tls_app.tick", "schedule": 1.0}},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if FORM == "options":
    parts = urlsplit(REDIS_URL)
    tls = dict(parse_qsl(parts.query))
    plain_url = urlunsplit(parts._replace(query=""))
    app.conf.update(
        broker_url=plain_url,
        broker_use_ssl=tls,
        leader_redis_url=plain_url,
        leader_redis_options={**tls, **{key.removeprefix("LEASE_").lower(): value
                                        for key, value in os.environ.items()
                                        if key.startswith("LEASE_SSL_")}},
    )
elif FORM == "url":
    app.conf.broker_url = REDIS_URL
else:
    raise RuntimeError(f"TLS_FORM must be options or url, got {FORM!r}")
celery_leader.install(app)

_client = redis.Redis.from_url(REDIS_URL)


def record(kind: str, **fields: Any) -> None:
    fields.update(kind=kind, pid=os.getpid(), at=time.monotonic())
    _client.rpush("test:events", json.dumps(fields))


@signals.started_leading.connect
def _started(sender: Any = None, identity: str = "", term: int = 0, **kw: Any) -> None:
    record("started_leading", identity=identity, term=term)


@app.task(bind=True)
def tick(self: Any) -> None:
    record("tick", term=self.request.leader_term, fire_time=self.request.leader_fire_time)
