"""A Django project's settings whose periodic tasks live in django-celery-beat's
tables (edited in the admin or through the ORM) and are dispatched by the
leader: ``EXAMPLE_SETTINGS=django-beat``.

The Celery and celery-leader settings are the Django-style ones of
``example_project.django_settings``; this module adds what makes it a Django
project (``INSTALLED_APPS`` with ``django_celery_beat``, a database) and turns
the table source on with ``CELERY_LEADER_DJANGO_CELERY_BEAT = True``.  The
database is SQLite by default (``EXAMPLE_DATABASE``: its path); create the
tables with ``python -m example_project.manage migrate``.
"""

import os
from pathlib import Path

from example_project.django_settings import *  # noqa: F403 - the CELERY_* settings

SECRET_KEY = os.environ.get("EXAMPLE_SECRET_KEY", "example-project-not-secret")
INSTALLED_APPS = ["django_celery_beat"]  # a real project lists its own apps and the admin too
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DATABASE",
                               str(Path(__file__).resolve().parent / "db.sqlite3")),
        "OPTIONS": {"timeout": 30},
    },
}

# The leader dispatches every enabled PeriodicTask; the schedule lives in the
# tables, so no CELERY_BEAT_SCHEDULE here (a row named like an entry would be ignored).
CELERY_LEADER_DJANGO_CELERY_BEAT = True
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {}
