"""The example project's Celery app.

    celery -A example_project.app worker -l info

Every worker runs an elector; the one that leads dispatches ``beat_schedule``
and consumes the leader queue.  Run as many replicas as you like.
"""

import os

from celery import Celery

import celery_leader

app = Celery("example_project",
             include=["example_project.tasks", "example_project.receivers"])
if os.environ.get("EXAMPLE_SETTINGS") == "django":
    app.config_from_object("example_project.django_settings", namespace="CELERY")
elif os.environ.get("EXAMPLE_SETTINGS") == "django-beat":  # schedule in django-celery-beat
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.django_beat_settings")
    app.config_from_object("django.conf:settings", namespace="CELERY")
else:
    app.config_from_object("example_project.celeryconfig")
celery_leader.install(app)
