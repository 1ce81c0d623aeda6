"""Cron schedules that stay correct across daylight-saving changes.

``cron("*/5 * * * *", tz="Europe/Berlin")`` is a Celery schedule (a
:class:`celery.schedules.BaseSchedule`), so stock ``celery beat`` runs it, and it
has a pure :meth:`cron.next_fire_after` for the project's own scheduler.

Expressions have 5 fields (minute hour day-of-month month day-of-week), or 6
with the **seconds first**; the aliases ``@hourly @daily @midnight @weekly
@monthly @yearly @annually`` are accepted too.

How local wall times become instants
------------------------------------
croniter is only asked for *wall-clock* matches: it iterates naive local times
(carried as UTC datetimes so it never applies DST rules of its own).  Each
matching wall time ``w`` is then turned into one instant:

* ``w`` exists once: that instant;
* ``w`` occurs twice (clocks fall back): its **first** occurrence only, so an
  entry for 02:30 fires once on the fall-back day, and nothing fires again
  during the repeated hour for wall times that already fired;
* ``w`` does not exist (clocks spring forward): the first instant after the gap
  (03:00 local for 02:30 in Europe/Berlin).  Several skipped wall times map to
  that same instant and fire there once.

This mapping never decreases as ``w`` increases, so "the next fire time after
``t``" is simply the first candidate whose instant is later than ``t``.
croniter itself (given aware datetimes) fires an ambiguous wall time in both
passes; that is the behaviour corrected here.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Hashable
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click
from celery.schedules import BaseSchedule, schedstate
from croniter import CroniterBadDateError, croniter

from ..election.config import ConfigurationError

__all__ = ["CronError", "cron"]

UTC = timezone.utc

ALIASES: dict[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# croniter's random ("R") and hashed ("H") fields: random ones would be redrawn
# every time an iterator is built, hashed ones need a hash id.
_RANDOM_OR_HASHED = re.compile(r"^[hr](\(|/|$)")

_ONE_MICROSECOND = timedelta(microseconds=1)
_PROBE_START = datetime(2000, 1, 1)  # naive wall time
# Candidates examined per lookup before giving up; only a time zone without
# PEP 495 fold support could ever need more than a couple.
_MAX_CANDIDATES = 100_000

# The canonical (seconds-first) fields, named and bounded as a user writes them.
_FIELDS = (("second", "0-59"), ("minute", "0-59"), ("hour", "0-23"),
           ("day-of-month", "1-31"), ("month", "1-12 or jan-dec"),
           ("day-of-week", "0-7 or sun-sat"))
# Each field's numbers, as _FIELDS names them: checked here, as croniter before 7.0
# takes a day-of-month 0 in its six-field form and calls a step 0 a range error.
_BOUNDS = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_NUMBER = re.compile(r"\d+")
# What croniter raises for an expression it cannot take: its own errors are
# ValueErrors (croniter 2.0 does not export their base class), the rest slip out.
_CRONITER_ERRORS = (ValueError, TypeError, KeyError, IndexError)


class CronError(ConfigurationError, click.ClickException):
    """An invalid cron expression or time zone (a ``ValueError``).

    Also a ``click.ClickException``: a config module that builds an invalid
    ``cron(...)`` is imported while ``celery worker`` / ``celery beat`` parses
    its options, and click then stops the command with the same one line (and
    exit status 2) as any other bad celery-leader setting, not a traceback.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        click.ClickException.__init__(self, message)  # sets args and message

    def show(self, file: Any = None) -> None:
        print(f"celery-leader: configuration error: {self.message}",
              file=file or sys.stderr, flush=True)


class cron(BaseSchedule):  # type: ignore[misc]
    """A cron schedule for Celery beat, DST-correct in an IANA time zone.

    Arguments:
        expr: 5 fields, 6 fields with seconds first, or an ``@`` alias.
        tz: IANA zone name (or a ``tzinfo``); ``None`` means the Celery app's
            timezone (``app.timezone``, UTC unless configured).
        nowfun: optional clock for :meth:`now` (tests); not pickled.
        app: optional Celery app; beat sets it on its own.

    Raises:
        CronError (a ValueError): invalid expression, or unknown time zone.
    """

    def __init__(
        self,
        expr: str,
        tz: str | tzinfo | None = None,
        *,
        nowfun: Callable[[], datetime] | None = None,
        app: Any = None,
    ) -> None:
        super().__init__(nowfun=nowfun, app=app)
        self.expression, self._canonical, self._croniter_expr = _parse(expr)
        self._croniter_lock = threading.Lock()
        self._zone: tzinfo | None = _load_zone(tz)
        self._tz_arg: str | tzinfo | None = _zone_arg(self._zone)
        try:
            # Catches expressions that parse but never match (``0 0 30 2 *``).
            self._wall_after(_PROBE_START)
        except CroniterBadDateError:
            raise CronError(f"invalid cron expression {expr!r}: it matches no date") from None
        except _CRONITER_ERRORS as exc:
            raise CronError(f"invalid cron expression {expr!r}: {_plain(exc)}") from exc

    # -- attributes -------------------------------------------------------------

    @property
    def tz(self) -> tzinfo:
        """The zone wall times are read in: the explicit one, else the app's."""
        if self._zone is not None:
            return self._zone
        zone: tzinfo = self.app.timezone
        return zone

    # -- pure computation -------------------------------------------------------

    def next_fire_after(self, dt: datetime) -> datetime:
        """The first fire instant strictly after ``dt``, as an aware UTC datetime.

        A naive ``dt`` is taken to be UTC (as Celery does).
        """
        t = _as_utc(dt)
        zone = self.tz
        local = t.astimezone(zone)
        start = local.replace(tzinfo=None, fold=0)
        if _is_second_occurrence(local):
            # Every wall time left in the repeated period already fired in the
            # first pass (before t): continue from the end of that period.
            start = _end_of_repeat(start, zone) - _ONE_MICROSECOND
        for _ in range(_MAX_CANDIDATES):
            start = self._wall_after(start)
            instant = _resolve(start, zone)
            if instant > t:
                return instant
        raise RuntimeError(  # pragma: no cover - needs a tzinfo without fold support
            f"{self!r}: no fire time found after {dt.isoformat()} in {zone}"
        )

    def _wall_after(self, wall: datetime) -> datetime:
        """The first matching naive wall time strictly after naive ``wall``."""
        floor = wall.replace(microsecond=0).replace(tzinfo=UTC)  # croniter: whole seconds
        # One croniter per expression, moved to each start (its constructor
        # parses and expands the expression: most of a call's cost otherwise).
        with self._croniter_lock:
            it = self.__dict__.get("_croniter")
            if it is None:
                it = self.__dict__["_croniter"] = croniter(self._croniter_expr, floor,
                                                           ret_type=datetime)
            else:
                it.set_current(floor, force=True)
            found: datetime = it.get_next(datetime)
        return found.replace(tzinfo=None)

    # -- Celery schedule protocol -----------------------------------------------

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        """Time from now until the next fire after ``last_run_at`` (negative if overdue)."""
        return self.next_fire_after(last_run_at) - _as_utc(self.now())

    def is_due(self, last_run_at: datetime) -> tuple[bool, float]:
        """Celery's ``schedstate(is_due, next)``, with ``next`` in (fractional) seconds.

        Due when the next fire time after ``last_run_at`` is not in the future;
        ``next`` is then the time until the fire after now, else until that one.
        """
        now = _as_utc(self.now())
        upcoming = self.next_fire_after(last_run_at)
        due = upcoming <= now
        if due:
            upcoming = self.next_fire_after(now)
        state: tuple[bool, float] = schedstate(due, (upcoming - now).total_seconds())
        return state

    # -- value semantics ----------------------------------------------------------

    def _key(self) -> tuple[str, Hashable]:
        zone = self._zone
        if isinstance(zone, ZoneInfo) and zone.key is not None:
            return self._canonical, zone.key
        return self._canonical, zone

    def __eq__(self, other: object) -> bool:
        if isinstance(other, cron):
            return self._key() == other._key() and self.nowfun == other.nowfun
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        if self._tz_arg is None:
            return f"cron({self.expression!r})"
        return f"cron({self.expression!r}, tz={self._tz_arg!r})"

    def __reduce__(self) -> tuple[type[cron], tuple[str, str | tzinfo | None]]:
        return self.__class__, (self.expression, self._tz_arg)


# -- helpers ----------------------------------------------------------------------


def _parse(expr: str) -> tuple[str, str, str]:
    """(expression as shown, canonical seconds-first form, croniter's form)."""
    if not isinstance(expr, str):
        raise TypeError(f"cron expression must be a string, not {type(expr).__name__}")
    fields = expr.split()
    shown = " ".join(fields)
    if len(fields) == 1 and fields[0].startswith("@"):
        alias = fields[0].lower()
        if alias not in ALIASES:
            raise CronError(
                f"invalid cron expression {expr!r}: unknown alias "
                f"(known: {', '.join(sorted(ALIASES))})"
            )
        shown = alias
        fields = ALIASES[alias].split()
    if len(fields) not in (5, 6):
        raise CronError(
            f"invalid cron expression {expr!r}: expected 5 fields, or 6 with seconds "
            f"first, got {len(fields)}"
        )
    fields = [field.lower() for field in fields]
    for field in fields:
        if _RANDOM_OR_HASHED.match(field):
            raise CronError(
                f"invalid cron expression {expr!r}: random/hashed fields (R, H) are not supported"
            )
    if len(fields) == 5:
        fields = ["0", *fields]
    canonical = " ".join(fields)
    bounds = _bounds_error(fields)
    if bounds is not None:
        raise CronError(f"invalid cron expression {expr!r}: {bounds}")
    croniter_form = _croniter_order(fields)
    try:
        croniter.expand(croniter_form)
    except _CRONITER_ERRORS as exc:
        raise CronError(f"invalid cron expression {expr!r}: {_field_error(fields, exc)}") \
            from exc
    return shown, canonical, croniter_form


def _bounds_error(fields: list[str]) -> str | None:
    """The first field with a number out of its range or a step of 0, in the user's
    words; None when every number is in range (croniter judges the rest)."""
    for index, value in enumerate(fields):
        name, allowed = _FIELDS[index]
        low, high = _BOUNDS[index]
        for part in value.split(","):
            span, _, step = part.partition("/")
            if step.isdigit() and int(step) == 0:
                return f"{name} field {value!r} has an invalid step ({allowed})"
            span = span.partition("#")[0]  # day-of-week "5#2": the 2 counts weeks
            if any(not low <= int(number) <= high for number in _NUMBER.findall(span)):
                return f"{name} field {value!r} is out of range ({allowed})"
    return None


def _croniter_order(fields: list[str]) -> str:
    """croniter's form of seconds-first fields: it wants the seconds last."""
    return " ".join([*fields[1:], fields[0]])


def _field_error(fields: list[str], exc: Exception) -> str:
    """Which field is wrong, in the user's order and words: croniter's own
    message quotes its internal, reordered form (``[61 * * * * 0] ...``)."""
    for index, value in enumerate(fields):
        probe = ["*"] * len(fields)
        probe[index] = value
        try:
            croniter.expand(_croniter_order(probe))
        except _CRONITER_ERRORS as field_exc:
            name, allowed = _FIELDS[index]
            reason = _plain(field_exc)
            if "out of range" in reason or "out of bands" in reason:
                return f"{name} field {value!r} is out of range ({allowed})"
            if "step" in reason:
                return f"{name} field {value!r} has an invalid step ({allowed})"
            return f"{name} field {value!r} is not valid ({allowed})"
    return _plain(exc)


def _plain(exc: Exception) -> str:
    """croniter's message without its internal bracketed form of the expression."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc)).strip()
    return text or "not a valid cron expression"


def _load_zone(tz: str | tzinfo | None) -> tzinfo | None:
    if tz is None or isinstance(tz, tzinfo):
        return tz
    if not isinstance(tz, str):
        raise TypeError(f"tz must be an IANA zone name or a tzinfo, not {type(tz).__name__}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise CronError(f"unknown time zone {tz!r}") from exc


def _zone_arg(zone: tzinfo | None) -> str | tzinfo | None:
    """What to pickle and show: the zone's IANA key when it has one."""
    if isinstance(zone, ZoneInfo) and zone.key is not None:
        return zone.key
    return zone


def _as_utc(dt: datetime) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def _wall(instant: datetime, zone: tzinfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None, fold=0)


def _is_second_occurrence(local: datetime) -> bool:
    """Whether aware ``local`` is the repeat of a wall time (after falling back)."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _is_ambiguous(wall: datetime, zone: tzinfo) -> bool:
    first = wall.replace(tzinfo=zone, fold=0)
    second = wall.replace(tzinfo=zone, fold=1)
    return first.utcoffset() != second.utcoffset() and _wall(first, zone) == wall


def _end_of_repeat(wall: datetime, zone: tzinfo) -> datetime:
    """The first naive wall time after ``wall`` that is no longer repeated.

    ``wall`` lies in a repeated period, which is as long as the offset change,
    so the answer is within that distance; find it by bisection.
    """
    first = wall.replace(tzinfo=zone, fold=0).utcoffset()
    second = wall.replace(tzinfo=zone, fold=1).utcoffset()
    assert first is not None and second is not None
    lo, hi = wall, wall + abs(first - second)
    while hi - lo > _ONE_MICROSECOND:
        mid = lo + (hi - lo) // 2
        if _is_ambiguous(mid, zone):
            lo = mid
        else:
            hi = mid
    return hi


def _resolve(wall: datetime, zone: tzinfo) -> datetime:
    """The instant (aware UTC) at which naive local ``wall`` fires.

    Unique: that instant.  Repeated: the first occurrence.  Nonexistent: the
    first instant after the gap.
    """
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first == second:
        return first
    lo, hi = min(first, second), max(first, second)
    if _wall(lo, zone) == wall:  # the wall time exists twice
        return lo
    # In a gap: wall(lo) < wall < wall(hi).  Find the transition instant.
    while hi - lo > _ONE_MICROSECOND:
        mid = lo + (hi - lo) // 2
        if _wall(mid, zone) > wall:
            hi = mid
        else:
            lo = mid
    return hi
