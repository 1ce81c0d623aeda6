"""django-celery-beat's tables as a source of the leader's schedule
(``leader_django_celery_beat = True``; the ``django`` extra brings django-celery-beat).

Every enabled ``django_celery_beat.models.PeriodicTask`` becomes an
:class:`~celery_leader.schedule.entries.Entry` (``source="django"``) that the
leader dispatches like a ``beat_schedule`` entry: its ticks are claimed in Redis
under the leader's term, so the exactly-once guarantee, the catch-up policies and
the ``leader_fire_time`` / ``leader_term`` headers are the same.  The tables are
only *read* for the definitions:

- one thread (:class:`DjangoBeatSource`, started by the first leadership) polls
  ``PeriodicTasks.last_update`` every half retry period and re-reads the
  enabled rows only when it moved (django-celery-beat bumps it on every admin or
  ORM save and delete; a bulk ``QuerySet.update()`` must call
  ``PeriodicTasks.update_changed()``, as for django-celery-beat itself);
- the runner never waits on the database: it dispatches the entries last read
  (a database outage is logged once; changes are picked up when it returns);
- progress flows back, never blocking dispatch: each sent tick is counted in
  Redis (``schedule:django-runs``) by the very script call that claims it
  (:meth:`DjangoBeatSource.run_record`, herd.py), so a leader killed at any
  moment neither loses a run nor counts one twice, and the thread writes
  ``last_run_at`` (the fire time) and ``total_run_count`` to the rows in
  batches; a one-off or clocked task is disabled once its single tick is
  claimed in Redis, whichever leader claimed it.

Imported only when the setting is on (Django is an optional dependency).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import django
from celery.schedules import BaseSchedule, schedule, solar
from django.apps import apps as django_apps
from django.conf import settings as django_settings
from django.db import connection, transaction
from django.utils import timezone as django_timezone

from ..election.config import ConfigurationError
from ..election.redact import secret_safe_logger
from ..election.redislock import as_text, key_of
from ..schedule.cronexpr import cron
from ..schedule.entries import (
    NEVER,
    Entry,
    EntryError,
    describe_schedule,
    entry_from_config,
    first_fire_after,
    next_fire_after,
)
from ..schedule.source import RunRecord
from ..schedule.store import ScheduleStore, from_ms, to_ms

log = secret_safe_logger("celery_leader.django_beat")
UTC = timezone.utc
SOURCE = "django"


# ------------------------------------------------------------------ schedules

class Once(BaseSchedule):  # type: ignore[misc]
    """Fires once, at ``at``: a clocked task, or a one-off task's single tick.  If
    no leader saw it before ``at`` (saved with a time already past), it fires
    when it is first seen, as django-celery-beat runs it at once."""

    def __init__(self, at: datetime) -> None:
        super().__init__()
        self.at = at.astimezone(UTC)

    def next_fire_after(self, after: datetime) -> datetime:
        return self.at if after < self.at else NEVER

    def first_fire_after(self, anchor: datetime) -> datetime:
        return self.at if anchor < self.at else anchor

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Once) and other.at == self.at

    def __hash__(self) -> int:
        return hash(("once", self.at))

    def __repr__(self) -> str:
        return f"once at {self.at.isoformat()}"


class Starting(BaseSchedule):  # type: ignore[misc]
    """``start_time``: nothing fires before ``start``.  An interval fires at
    ``start`` itself and every interval after (django-celery-beat's behaviour);
    other schedules at their first tick at or after ``start``."""

    def __init__(self, inner: Any, start: datetime) -> None:
        super().__init__()
        self.inner = inner
        self.start = start.astimezone(UTC)

    def next_fire_after(self, after: datetime) -> datetime:
        if after >= self.start:
            return next_fire_after(self.inner, after)
        if isinstance(self.inner, schedule):
            return self.start
        return next_fire_after(self.inner, self.start - timedelta(milliseconds=1))

    def first_fire_after(self, anchor: datetime) -> datetime:
        if anchor >= self.start:
            return first_fire_after(self.inner, anchor)
        return self.next_fire_after(anchor)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Starting) and (other.inner, other.start) == (
            self.inner, self.start)

    def __hash__(self) -> int:
        return hash(("starting", self.start))

    def __repr__(self) -> str:
        return f"{describe_schedule(self.inner)} from {self.start.isoformat()}"


class Until(BaseSchedule):  # type: ignore[misc]
    """``expires`` (a datetime): no tick at or after ``end``."""

    def __init__(self, inner: Any, end: datetime) -> None:
        super().__init__()
        self.inner = inner
        self.end = end.astimezone(UTC)

    def next_fire_after(self, after: datetime) -> datetime:
        return self._before_end(next_fire_after(self.inner, after))

    def first_fire_after(self, anchor: datetime) -> datetime:
        return self._before_end(first_fire_after(self.inner, anchor))

    def _before_end(self, fire: datetime) -> datetime:
        return fire if fire < self.end else NEVER

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Until) and (other.inner, other.end) == (self.inner, self.end)

    def __hash__(self) -> int:
        return hash(("until", self.end))

    def __repr__(self) -> str:
        return f"{describe_schedule(self.inner)} until {self.end.isoformat()}"


# ------------------------------------------------------------------ rows

@dataclass(frozen=True)
class Row:
    """What the write-back needs of a row, as last read."""

    pk: int
    total_run_count: int
    once_at_ms: int | None  # a one-off or clocked task: its single tick


def aware(value: datetime) -> datetime:
    """A datetime from the database, aware (naive ones are in Django's TIME_ZONE
    when USE_TZ is False)."""
    if django_timezone.is_naive(value):
        value = django_timezone.make_aware(value, django_timezone.get_default_timezone())
    return value.astimezone(UTC)


def _json(what: str, field: str, raw: Any, kind: type, default: Any) -> Any:
    if raw in (None, ""):
        return default
    try:
        value = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise EntryError(f"{what}: {field} is not valid JSON ({exc}): {raw!r}") from None
    if not isinstance(value, kind):
        raise EntryError(f"{what}: {field} must be a JSON {kind.__name__}, got {raw!r}")
    return value


def row_schedule(task: Any, app: Any) -> tuple[Any, datetime | None]:
    """The row's schedule (exact fire times) and, for a one-off or clocked task,
    the instant of its single tick."""
    what = f"django-celery-beat task {task.name!r}"
    if task.interval is not None:
        interval = task.interval
        if interval.every is None or interval.every <= 0:
            raise EntryError(f"{what}: interval must be positive, got {interval.every!r}")
        sched: Any = schedule(timedelta(**{str(interval.period): interval.every}), app=app)
    elif task.crontab is not None:
        tab = task.crontab
        fields = [str(f or "*").replace(" ", "") for f in (
            tab.minute, tab.hour, tab.day_of_month, tab.month_of_year, tab.day_of_week)]
        try:
            sched = cron(" ".join(fields), tz=str(tab.timezone or "UTC"))
        except ConfigurationError as exc:
            raise EntryError(f"{what}: crontab {' '.join(fields)!r}: {exc}") from None
    elif task.solar is not None:
        sched = solar(task.solar.event, float(task.solar.latitude),
                      float(task.solar.longitude), app=app)
    elif task.clocked is not None:
        sched = Once(aware(task.clocked.clocked_time))
    else:
        raise EntryError(f"{what} has no schedule (interval, crontab, solar or clocked)")
    if task.start_time is not None:
        start = aware(task.start_time)
        sched = Once(max(sched.at, start)) if isinstance(sched, Once) else Starting(sched, start)
    once_at = sched.at if isinstance(sched, Once) else None
    if task.one_off and once_at is None:
        # Its single tick: the schedule's first after the row was last saved
        # (the same on every leader).
        changed = aware(task.date_changed) if task.date_changed else datetime.now(UTC)
        once_at = next_fire_after(sched, changed)
        sched = Once(once_at)
    if task.expires is not None:
        sched = Until(sched, aware(task.expires))
    return sched, once_at


def entry_from_row(task: Any, app: Any) -> tuple[Entry, Row]:
    """A PeriodicTask as an entry; EntryError naming the task if it cannot be one."""
    what = f"django-celery-beat task {task.name!r}"
    sched, once_at = row_schedule(task, app)
    options: dict[str, Any] = {}
    for name in ("queue", "exchange", "routing_key", "priority"):
        value = getattr(task, name)
        if value not in (None, ""):
            options[name] = value
    headers = _json(what, "headers", task.headers, dict, {})
    if headers:
        options["headers"] = headers
    if task.expires is not None:
        options["expires"] = aware(task.expires)
    elif task.expire_seconds is not None:
        options["expires"] = float(task.expire_seconds)
    spec = {"task": task.task, "schedule": sched,
            "args": _json(what, "args", task.args, list, []),
            "kwargs": _json(what, "kwargs", task.kwargs, dict, {}),
            "options": options, "enabled": bool(task.enabled)}
    entry = entry_from_config(task.name, spec, app, what="django-celery-beat task")
    return replace(entry, source=SOURCE), Row(
        pk=int(task.pk), total_run_count=int(task.total_run_count or 0),
        once_at_ms=to_ms(once_at) if once_at is not None else None)


def skip_reason(task: Any, exc: Exception) -> str:
    """Why a row is skipped, naming it once: the errors made here already start
    with "django-celery-beat task '<name>'"."""
    what = f"django-celery-beat task {str(task.name)!r}"
    text = str(exc)
    return text if text.startswith(what) else f"{what}: {text}"


def ensure_django() -> None:
    """Django set up, with django_celery_beat installed; ConfigurationError otherwise."""
    if not django_apps.ready:
        if not django_settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
            raise ConfigurationError(
                "leader_django_celery_beat is True but Django is not configured: set "
                "DJANGO_SETTINGS_MODULE (as for `celery beat -S django`)")
        django.setup()
    if not django_apps.is_installed("django_celery_beat"):
        raise ConfigurationError(
            "leader_django_celery_beat is True but 'django_celery_beat' is not in "
            "INSTALLED_APPS")


_TASK_FIELDS = ("pk", "name", "task", "args", "kwargs", "queue", "exchange", "routing_key",
                "priority", "headers", "expires", "expire_seconds", "one_off", "start_time",
                "enabled", "total_run_count", "date_changed")
_SCHEDULE_FIELDS = {
    "interval": ("every", "period"), "crontab": ("minute", "hour", "day_of_month",
                                                 "month_of_year", "day_of_week", "timezone"),
    "solar": ("event", "latitude", "longitude"), "clocked": ("clocked_time",)}


def row_key(task: Any) -> tuple[Any, ...]:
    """Every value the conversion reads: a row whose key is unchanged converts to
    the same entry (so a re-read converts only what changed)."""
    key: list[Any] = [getattr(task, name) for name in _TASK_FIELDS]
    for relation, names in _SCHEDULE_FIELDS.items():
        related = getattr(task, relation)
        key.append(None if related is None else tuple(str(getattr(related, n))
                                                      for n in names))
    return tuple(key)


def read_rows(app: Any, enabled_only: bool = True,
              skipped: Callable[[Any, Exception], None] | None = None,
              cache: dict[tuple[Any, ...], tuple[Entry, Row]] | None = None,
              ) -> tuple[dict[str, Entry], dict[str, Row]]:
    """Every (enabled) PeriodicTask as an entry; a row that cannot be one is
    passed to ``skipped`` (never stops the others).  Database errors propagate.
    ``cache`` (row key -> converted), kept by the caller between reads, is
    updated to hold exactly the rows read."""
    periodic_task = django_apps.get_model("django_celery_beat", "PeriodicTask")
    query = periodic_task.objects.select_related("interval", "crontab", "solar", "clocked")
    if enabled_only:
        query = query.filter(enabled=True)
    entries: dict[str, Entry] = {}
    rows: dict[str, Row] = {}
    seen: dict[tuple[Any, ...], tuple[Entry, Row]] = {}
    for task in query.iterator(chunk_size=2000):
        key = row_key(task) if cache is not None else ()
        try:
            converted = cache.get(key) if cache is not None else None
            if converted is None:
                converted = entry_from_row(task, app)
            entries[task.name], rows[task.name] = seen[key] = converted
        except Exception as exc:
            if skipped is not None:
                skipped(task, exc)
    if cache is not None:
        cache.clear()
        cache.update(seen)
    return entries, rows


def last_update() -> Any:
    """``PeriodicTasks.last_update`` (None before anything was saved)."""
    periodic_tasks = django_apps.get_model("django_celery_beat", "PeriodicTasks")
    return periodic_tasks.objects.filter(ident=1).values_list("last_update", flat=True).first()


class DjangoBeatSource:
    """The enabled PeriodicTasks, as a :class:`~celery_leader.schedule.source.EntrySource`."""

    def __init__(self, app: Any, store: ScheduleStore, poll: float,
                 load_timeout: float = 10.0) -> None:
        ensure_django()
        self.app = app
        self.store = store
        self.poll = poll
        self.load_timeout = load_timeout
        self.runs_key = key_of(store.lock.key_prefix, store.name, store.name,
                               "schedule:django-runs")
        self._entries: dict[str, Entry] = {}
        self._rows: dict[str, Row] = {}
        # The rows of the entries last handed to the runner (``entries()``): it
        # may still claim a tick of one the thread has since dropped (disabled or
        # deleted), and that run must count.  Only these two reads are kept.
        self._rows_served: dict[str, Row] = {}
        self._version = 0
        self._wakers: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_update: Any = object()  # nothing read yet
        self._written: dict[str, tuple[int, int]] = {}  # name -> (count, last ms) in the row
        self._disabled: set[tuple[int, int]] = set()  # (pk, tick ms) disabled by us
        self._skipped: set[tuple[str, Any]] = set()
        self._converted: dict[tuple[Any, ...], tuple[Entry, Row]] = {}
        self._down: dict[str, bool] = {"database": False, "redis": False}

    # -- EntrySource ----------------------------------------------------------

    def watch(self, wake: Callable[[], None]) -> None:
        self._wakers.append(wake)

    def version(self) -> Hashable:
        self._start()
        return self._version

    def entries(self) -> dict[str, Entry]:
        self._start()
        # The first read, so a new leader dispatches the table from its first tick.
        self._loaded.wait(self.load_timeout)
        with self._lock:
            self._rows_served = self._rows  # replaced whole by _reload, never changed
            return dict(self._entries)

    def run_record(self, entry: Entry) -> RunRecord | None:
        """Where the claim of a sent tick of ``entry`` counts it (source.RecordsRuns):
        in Redis, so whichever leader writes the rows back counts what every term
        sent.  The row as last read, or as read with the entries the runner holds."""
        row = self._rows.get(entry.name) or self._rows_served.get(entry.name)
        if row is None:
            return None
        return RunRecord(self.runs_key, str(row.pk), row.total_run_count)

    def claimed(self, entry: Entry, fire: datetime, published: bool) -> None:
        # The run is counted already (run_record, in the claim): write it back soon,
        # and disable a one-off or clocked row.
        self._kick.set()

    # -- the thread -----------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="celery-leader-django-beat")
            self._thread.start()

    def _loop(self) -> None:
        while True:
            self.cycle()
            self._kick.wait(self.poll)
            self._kick.clear()

    def cycle(self) -> None:
        """Re-read the rows if ``last_update`` moved, then write progress back."""
        try:
            changed = last_update()
            if changed != self._last_update:
                self._last_update = changed  # read first: a save meanwhile reloads again
                self._reload()
            self._write_back()
            self._recovered("database")
        except Exception as exc:
            self._failed("database", exc, "dispatching the django-celery-beat tasks last "
                         "read; changes are picked up when it is back")
            connection.close()  # the next cycle connects afresh
        finally:
            self._loaded.set()

    def _reload(self) -> None:
        entries, rows = read_rows(self.app, skipped=self._skip, cache=self._converted)
        with self._lock:
            self._rows = rows
            if entries == self._entries:
                return
            self._entries = entries
            self._version += 1
        log.info("celery-leader: read %d enabled django-celery-beat tasks", len(entries))
        for wake in self._wakers:
            wake()

    def _skip(self, task: Any, exc: Exception) -> None:
        key = (str(task.name), task.date_changed)
        if key not in self._skipped:
            self._skipped.add(key)
            log.error("celery-leader: skipping %s", skip_reason(task, exc))

    def _write_back(self) -> None:
        try:
            runs = self.store.client.hgetall(self.runs_key) or {}
            once = {name: row for name, row in self._rows.items()
                    if row.once_at_ms is not None and (row.pk, row.once_at_ms)
                    not in self._disabled}
            names = sorted(once)
            states = self.store.client.hmget(self.store.state_key, names) if names else []
            self._recovered("redis")
        except Exception as exc:
            self._failed("redis", exc, "the rows' last_run_at and total_run_count are "
                         "written when it is back")
            return
        updates = list(self._changed_runs(runs))
        claimed = [once[name] for name, raw in zip(names, states, strict=True)
                   if _claimed_at(raw, once[name].once_at_ms)]
        if not updates and not claimed:
            return
        periodic_task = django_apps.get_model("django_celery_beat", "PeriodicTask")
        with transaction.atomic():
            for _name, pk, count, last_ms in updates:
                periodic_task.objects.filter(pk=pk).update(
                    last_run_at=_db_time(from_ms(last_ms)), total_run_count=count)
            for row in claimed:
                # Its single tick is claimed (by whichever leader): as
                # django-celery-beat does, without bumping last_update.
                periodic_task.objects.filter(pk=row.pk, enabled=True).update(enabled=False)
        for name, _, count, last_ms in updates:
            self._written[name] = (count, last_ms)
        for row in claimed:
            self._disabled.add((row.pk, row.once_at_ms or 0))
        if claimed:
            log.info("celery-leader: disabled %d one-off/clocked django-celery-beat tasks "
                     "whose tick was claimed", len(claimed))

    def _changed_runs(self, runs: dict[Any, Any]) -> Iterable[tuple[str, int, int, int]]:
        """(name, pk, total_run_count, last fire ms) of each row to write."""
        for raw_name, raw in runs.items():
            name = as_text(raw_name)
            try:
                record = json.loads(raw)
                pk, count = int(record["pk"]), int(record["base"]) + int(record["count"])
                last_ms = int(record["last"])
            except (ValueError, KeyError, TypeError):
                continue
            if self._written.get(name) != (count, last_ms):
                yield name, pk, count, last_ms

    def _failed(self, what: str, exc: Exception, consequence: str) -> None:
        if not self._down[what]:
            self._down[what] = True
            log.error("celery-leader: %s unavailable (%s: %s); %s", what,
                      type(exc).__name__, exc, consequence)

    def _recovered(self, what: str) -> None:
        if self._down[what]:
            self._down[what] = False
            log.warning("celery-leader: %s reachable again", what)


def _claimed_at(raw: Any, tick_ms: int | None) -> bool:
    if raw is None or tick_ms is None:
        return False
    try:
        return int(json.loads(raw)["last"]) >= tick_ms
    except (ValueError, KeyError, TypeError):
        return False


def _db_time(moment: datetime) -> datetime:
    """An aware UTC instant as the database field takes it (naive local time
    when USE_TZ is False)."""
    if getattr(django_settings, "USE_TZ", True):
        return moment
    naive: datetime = django_timezone.make_naive(moment,
                                                 django_timezone.get_default_timezone())
    return naive
