"""What the schedule layer is told: a small options object, and the app's own config.

The runner reads the few values it needs through :class:`ScheduleOptions`
(the Celery glue's ``LeaderSettings`` is one), never the ``leader_*`` settings
themselves, so the schedule works without the glue.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, Protocol

CATCH_UP_POLICIES = ("latest", "all", "none")
_UNSET = object()


class ScheduleOptions(Protocol):
    """The options a :class:`~celery_leader.schedule.runner.ScheduleRunner` runs with."""

    @property
    def name(self) -> str:
        """The schedule's name: its keys live in the slot ``{name}``; the
        workers' election has this name, the standalone beats' ``<name>-beat``."""

    @property
    def lease_duration(self) -> float: ...

    @property
    def retry_period(self) -> float:
        """Seconds between the runner's checks (state version, unsent ticks)."""

    @property
    def catch_up(self) -> str:
        """One of CATCH_UP_POLICIES: what a new leader sends of the ticks it missed."""

    @property
    def misfire_grace(self) -> float | None: ...

    @property
    def tick_run_once(self) -> bool:
        """Track sent ticks until their task starts (tickstart.py)."""


def app_setting(app: Any, name: str, default: Any = _UNSET) -> Any:
    """``app.conf[name]``, also found as ``CELERY_<NAME>`` (the Django namespace)."""
    conf = app.conf
    for key in (name, f"CELERY_{name.upper()}"):
        value = conf.get(key, _UNSET)
        if value is not _UNSET:
            return value
    return default


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name ``name`` was most likely meant to be, if any is close."""
    matches = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
    return matches[0] if matches else None
