"""Django settings of the tests' project (django-celery-beat's tables).

Env: LEADER_TEST_DB (``sqlite:<path>`` or ``postgresql://<user>@<host>:<port>/<db>``),
REDIS_URL, LEADER_NAME, LEADER_CATCH_UP, LEADER_LEASE / LEADER_RENEW / LEADER_RETRY.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

SECRET_KEY = "tests-only"
INSTALLED_APPS = ["django_celery_beat"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

_db = os.environ.get("LEADER_TEST_DB", "sqlite::memory:")
if _db.startswith("sqlite:"):
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                             "NAME": _db.removeprefix("sqlite:") or ":memory:",
                             "OPTIONS": {"timeout": 30}}}
else:
    _url = urlsplit(_db)
    DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql",
                             "NAME": _url.path.lstrip("/"), "USER": _url.username or "",
                             "HOST": _url.hostname or "", "PORT": str(_url.port or ""),
                             "OPTIONS": {"connect_timeout": 2}}}

CELERY_BROKER_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_LEADER_NAME = os.environ.get("LEADER_NAME", "django_app")
CELERY_LEADER_DJANGO_CELERY_BEAT = True
CELERY_LEADER_CATCH_UP = os.environ.get("LEADER_CATCH_UP", "all")
CELERY_LEADER_LEASE_DURATION = float(os.environ.get("LEADER_LEASE", "2.0"))
CELERY_LEADER_RENEW_DEADLINE = float(os.environ.get("LEADER_RENEW", "1.4"))
CELERY_LEADER_RETRY_PERIOD = float(os.environ.get("LEADER_RETRY", "0.3"))
