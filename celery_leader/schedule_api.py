"""The schedule of a Celery app, reached from its ``leader_*`` settings: the
runtime-entry API (``ScheduleStore.for_app(app)``) and what ``celery leader
schedule`` shows.

Celery glue over :mod:`celery_leader.schedule.store`: the store itself takes a
lock and a name; only here are they read from the app's settings.

It is also the module's old name, ``celery_leader.scheduler``: the names that
module had (the runner's and the store's) are importable from here.
"""

from __future__ import annotations

from typing import Any

from .schedule import store
from .schedule.runner import (
    ADOPT_PENDING_LUA,
    MIGRATE_LEGACY_LUA,
    NOT_DISPATCHER,
    OWN_SCHEDULE_LUA,
    OWNED_LUA,
    PUBLISH_TICK_LUA,
    TAKE_SCHEDULE_LUA,
    TASK_ID_NAMESPACE,
    ScheduleRunner,
    ScheduleTakenOver,
    beat_election_name,
)
from .schedule.store import FIRST_SEEN_LUA, REMOVE_RUNTIME_ENTRY_LUA, next_fire_time
from .settings import beat_lock, read_settings
from .sources import DJANGO_SOURCE, external_entries

__all__ = [
    "ADOPT_PENDING_LUA",
    "API_IDENTITY",
    "FIRST_SEEN_LUA",
    "MIGRATE_LEGACY_LUA",
    "NOT_DISPATCHER",
    "OWNED_LUA",
    "OWN_SCHEDULE_LUA",
    "PUBLISH_TICK_LUA",
    "REMOVE_RUNTIME_ENTRY_LUA",
    "TAKE_SCHEDULE_LUA",
    "TASK_ID_NAMESPACE",
    "ScheduleRunner",
    "ScheduleStore",
    "ScheduleTakenOver",
    "beat_election_name",
    "beat_lock",
    "next_fire_time",
    "schedule_owner",
    "schedule_report",
]

API_IDENTITY = "celery-leader-api"
"""The identity of the lock the API builds (it never elects: keys and client only)."""


class ScheduleStore(store.ScheduleStore):
    """:class:`celery_leader.schedule.store.ScheduleStore`, plus the constructor
    from a Celery app's settings."""

    @classmethod
    def for_app(cls, app: Any) -> ScheduleStore:
        settings = read_settings(app)
        return cls(app, settings.lock(API_IDENTITY), entries_name=settings.name)

    def managed_elsewhere(self, name: str) -> str | None:
        """A django-celery-beat row is listed with the schedule, but lives in the
        database: it is enabled, disabled, changed and deleted there."""
        try:
            entry = external_entries(self.app, read_settings(self.app)).get(name)
        except Exception:  # no Django, no database: the plain "no entry" answer
            return None
        if entry is None:
            return None
        if entry.source == DJANGO_SOURCE:
            return ("a django-celery-beat task (a PeriodicTask row): enable, disable, change "
                    "or delete it in the Django admin (or through the model), not here")
        return f"a {entry.source} entry: manage it where {entry.source} keeps it, not here"


def schedule_report(app: Any) -> list[dict[str, Any]]:
    """:meth:`ScheduleStore.report` of ``app``'s schedule, with the entries of the
    sources its settings turn on (django-celery-beat's tasks)."""
    return ScheduleStore.for_app(app).report(external_entries(app, read_settings(app)))


def schedule_owner(app: Any) -> dict[str, Any] | None:
    """:meth:`ScheduleStore.owner` of ``app``'s schedule."""
    return ScheduleStore.for_app(app).owner()
