"""The schedule of a Celery app, reached from its ``leader_*`` settings: the
runtime-entry API (``ScheduleStore.for_app(app)``) and what ``celery leader
schedule`` shows.

Celery glue over :mod:`celery_leader.schedule.store`: the store itself takes a
lock and a name; only here are they read from the app's settings.
"""

from __future__ import annotations

from typing import Any

from .schedule import store
from .settings import read_settings

API_IDENTITY = "celery-leader-api"
"""The identity of the lock the API builds (it never elects: keys and client only)."""


class ScheduleStore(store.ScheduleStore):
    """:class:`celery_leader.schedule.store.ScheduleStore`, plus the constructor
    from a Celery app's settings."""

    @classmethod
    def for_app(cls, app: Any) -> ScheduleStore:
        settings = read_settings(app)
        return cls(app, settings.lock(API_IDENTITY), entries_name=settings.name)


def schedule_report(app: Any) -> list[dict[str, Any]]:
    """:meth:`ScheduleStore.report` of ``app``'s schedule."""
    return ScheduleStore.for_app(app).report()


def schedule_owner(app: Any) -> dict[str, Any] | None:
    """:meth:`ScheduleStore.owner` of ``app``'s schedule."""
    return ScheduleStore.for_app(app).owner()
