"""Entry sources the settings turn on (``leader_django_celery_beat``): entries
from outside the app and Redis that the leader dispatches with the rest of the
schedule (celery_leader.schedule.source)."""

from __future__ import annotations

from typing import Any

from .election.redislock import RedisLock
from .schedule.entries import Entry
from .schedule.source import EntrySource
from .schedule.store import ScheduleStore
from .settings import LeaderSettings

DJANGO_SOURCE = "django"
"""The ``source`` of django-celery-beat's entries (contrib/django_beat.py's SOURCE)."""


def entry_source(app: Any, settings: LeaderSettings, lock: RedisLock) -> EntrySource | None:
    """The source the settings ask for (None: only beat_schedule and runtime entries).
    ``lock``: the runner's (its client and the schedule's key space)."""
    if not settings.django_celery_beat:
        return None
    # Django is an optional dependency (the "django" extra): imported only when asked for.
    from .contrib.django_beat import DjangoBeatSource

    return DjangoBeatSource(app, ScheduleStore(app, lock, entries_name=settings.name),
                            poll=settings.retry_period / 2)


def external_entries(app: Any, settings: LeaderSettings) -> dict[str, Entry]:
    """What the sources hold now, disabled ones too (``celery leader schedule``)."""
    if not settings.django_celery_beat:
        return {}
    from .contrib.django_beat import ensure_django, read_rows

    ensure_django()
    return read_rows(app, enabled_only=False)[0]
