"""A small Celery project that uses every celery-leader feature the way an app would.

- ``example_project.app``: the Celery app (``celery -A example_project.app worker``);
- ``example_project.celeryconfig``: its settings, deployment values from the environment;
- ``example_project.django_settings``: the same settings under Django-style
  ``CELERY_*`` names (``EXAMPLE_SETTINGS=django``);
- ``example_project.django_beat_settings`` / ``example_project.manage``: a Django
  project whose schedule is django-celery-beat's tables (``EXAMPLE_SETTINGS=django-beat``);
- ``example_project.tasks``: periodic tasks and a ``@leader_only`` maintenance task;
- ``example_project.receivers``: leadership signal receivers that log transitions;
- ``example_project.audit``: what the tasks and receivers record in Redis;
- ``example_project.demo``: ``make demo``, three replicas, a crash and a hand-over, live.

Importing this package imports nothing else, so the demo can run without the app.
"""
