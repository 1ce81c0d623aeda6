"""Moved: the runner to :mod:`celery_leader.schedule.runner`, the store to
:mod:`celery_leader.schedule.store` (``ScheduleStore.for_app`` and the reports
to :mod:`celery_leader.schedule_api`); this name stays for existing imports."""

from .schedule.runner import (
    ADOPT_PENDING_LUA,
    CLAIM_TICK_LUA,
    MIGRATE_LEGACY_LUA,
    NOT_DISPATCHER,
    OWN_SCHEDULE_LUA,
    OWNED_LUA,
    PUBLISH_TICK_LUA,
    TAKE_SCHEDULE_LUA,
    TASK_ID_NAMESPACE,
    TICK_ALREADY_CLAIMED,
    TICK_CLAIMED,
    TICK_ENTRY_REMOVED,
    ScheduleRunner,
    ScheduleTakenOver,
    beat_election_name,
)
from .schedule.store import FIRST_SEEN_LUA, REMOVE_RUNTIME_ENTRY_LUA, next_fire_time
from .schedule_api import ScheduleStore, schedule_owner, schedule_report
from .settings import beat_lock

__all__ = [
    "ADOPT_PENDING_LUA",
    "CLAIM_TICK_LUA",
    "FIRST_SEEN_LUA",
    "MIGRATE_LEGACY_LUA",
    "NOT_DISPATCHER",
    "OWNED_LUA",
    "OWN_SCHEDULE_LUA",
    "PUBLISH_TICK_LUA",
    "REMOVE_RUNTIME_ENTRY_LUA",
    "TAKE_SCHEDULE_LUA",
    "TASK_ID_NAMESPACE",
    "TICK_ALREADY_CLAIMED",
    "TICK_CLAIMED",
    "TICK_ENTRY_REMOVED",
    "ScheduleRunner",
    "ScheduleStore",
    "ScheduleTakenOver",
    "beat_election_name",
    "beat_lock",
    "next_fire_time",
    "schedule_owner",
    "schedule_report",
]
