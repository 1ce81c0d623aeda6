"""Schedule entries: validated at start-up or at the API call, and exact fire times.

The scheduler needs "the next fire time strictly after t" as an exact instant
so that every leader computes the same ticks from the same state; Celery's
schedules only answer "how long from now", so each kind is mapped here.
Runtime entries travel through Redis as JSON, never pickle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import math
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from celery.schedules import BaseSchedule, crontab, maybe_schedule, schedule

from ..election.config import ConfigurationError
from .cronexpr import cron
from .options import CATCH_UP_POLICIES, app_setting, closest

UTC = timezone.utc
# What an entry's options may say: every option Celery's ``Task.apply_async``
# documents and the kombu ``Producer.publish`` keywords it passes on (checked
# against Celery's own list: tests/test_entry_options.py).  Each tick's
# ``send_task`` gets them as given; ``retry``, ``retry_policy``, ``timeout`` and
# ``confirm_timeout`` govern kombu's own publish, which a fenced publish
# (publish.py) replaces by a Redis script call: a tick not sent stays pending
# and the leader sends it again, whatever they say.
OPTION_KEYS = frozenset({
    "queue", "exchange", "routing_key", "priority", "expires", "headers", "serializer",
    "compression", "time_limit", "soft_time_limit", "countdown", "eta", "link", "link_error",
    "immediate", "mandatory", "delivery_mode", "ignore_result", "shadow", "add_to_parent",
    "retry", "retry_policy", "content_type", "content_encoding", "expiration", "timeout",
    "confirm_timeout",
})
# Options Celery documents that a schedule cannot carry, each with the reason
# the start-up error gives.
REFUSED_OPTIONS = {
    "task_id": "every tick has its own task id (derived from the tick it sends)",
    "producer": "a kombu object of one process: the leader publishes on its own",
    "publisher": "a kombu object of one process: the leader publishes on its own",
    "connection": "a kombu object of one process: the leader publishes on its own",
    "declare": "kombu entities cannot be kept in Redis with the tick; declare the "
               "queues in task_queues",
    "args": "give them as the entry's own 'args'",
    "kwargs": "give them as the entry's own 'kwargs'",
}
# The fields that define an entry (its spec), in one place: the API's add and
# update, the runtime JSON and the beat_schedule keys all follow this list.
SPEC_FIELDS = ("task", "schedule", "args", "kwargs", "options", "catch_up", "misfire_grace",
               "enabled")
# What one entry may say: Celery's beat_schedule keys plus celery-leader's own.
ENTRY_KEYS = frozenset({*SPEC_FIELDS, "relative"})
NEVER = datetime(9999, 12, 31, tzinfo=UTC)
"""The "next fire time" of a schedule that will not fire again (a one-shot that fired)."""


class EntryError(ConfigurationError):
    """An entry is invalid; the message names the entry."""


class EntryExistsError(EntryError):
    """A runtime entry of that name exists and the caller did not ask to replace it."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One schedule entry.  Slotted and sharing what entries alike share (the
    schedule object, empty kwargs/options: :class:`Interned`): a schedule of
    100,000 entries is held in a few hundred bytes per entry."""


    name: str
    task: str
    # A Celery schedule object bound to the app, or an interval as it was given
    # (seconds or a timedelta, see interval_of): 100,000 intervals then cost
    # nothing over beat_schedule itself, not a schedule object each.
    schedule: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    catch_up: str | None = None  # None: the global leader_catch_up
    misfire_grace: float | None = None
    enabled: bool = True
    runtime: bool = False  # added through the API, stored in Redis
    source: str = ""  # an EntrySource's name (source.py) for its entries; "" otherwise

    def next_fire_after(self, after: datetime) -> datetime:
        return next_fire_after(self.schedule, after)

    def first_fire_after(self, anchor: datetime) -> datetime:
        return first_fire_after(self.schedule, anchor)

    def describe_schedule(self) -> str:
        return describe_schedule(self.schedule)

    def spec(self) -> dict[str, Any]:
        """The entry's definition (SPEC_FIELDS), as ``entry_from_config`` takes it."""
        return {name: getattr(self, name) for name in SPEC_FIELDS}


# Fire times computed lately, by (schedule's value, instant): a herd of
# thousands of entries with the same cron/crontab schedule asks the same
# question thousands of times at the top of the hour, and pays for it once.
_NEXT_FIRE_MEMO: dict[tuple[Hashable, datetime], datetime] = {}
_NEXT_FIRE_MEMO_SIZE = 8192


# The memo key of a schedule object lately asked, by id: (the object, its app,
# the key).  Entries alike share one object (Interned), so loading 100,000 of
# them computes its key (the app's zone, a tuple) once, not 100,000 times.
# The object and its app are held and compared, so a reused id or an object
# bound to another app since (another zone) is never taken for it.
_KEY_OF: dict[int, tuple[Any, Any, Hashable | None]] = {}


def _memo_key(sched: Any) -> Hashable | None:
    """What determines a cron/crontab schedule's fire times (None: not memoised)."""
    found = _KEY_OF.get(id(sched))
    app = getattr(sched, "_app", None)
    if found is not None and found[0] is sched and found[1] is app:
        return found[2]
    key = _compute_memo_key(sched)
    if len(_KEY_OF) >= 1024:
        _KEY_OF.clear()
    _KEY_OF[id(sched)] = (sched, app, key)
    return key


def _compute_memo_key(sched: Any) -> Hashable | None:
    if isinstance(sched, cron):
        key: Hashable = ("cron", sched._key(), sched.tz)
    elif isinstance(sched, crontab):
        key = ("crontab", sched._orig_minute, sched._orig_hour, sched._orig_day_of_week,
               sched._orig_day_of_month, sched._orig_month_of_year, sched.tz)
    else:
        return None
    return _hashable(key)


def interval_of(sched: Any) -> timedelta | None:
    """The period of an interval schedule (held as given, or a plain
    ``celery.schedules.schedule``); None for any other schedule."""
    kind = type(sched)
    if kind is float or kind is int:
        return timedelta(seconds=sched)
    if kind is timedelta:
        return sched  # type: ignore[no-any-return]
    if kind is schedule:
        return sched.run_every  # type: ignore[no-any-return]
    return None


def _hashable(key: Hashable) -> Hashable | None:
    """``key``, or None when a part of it cannot be hashed."""
    try:
        hash(key)
    except TypeError:  # e.g. crontab(minute={0, 30}): fields given as sets
        return None
    return key


def next_fire_after(sched: Any, after: datetime) -> datetime:
    """The first fire time strictly after ``after`` (aware, UTC)."""
    after = after.astimezone(UTC)
    run_every = interval_of(sched)
    if run_every is not None:  # an interval (most entries): no memo needed
        return after + run_every
    key = _memo_key(sched)
    if key is None:
        return _next_fire_after(sched, after)
    memo = (key, after)
    found = _NEXT_FIRE_MEMO.get(memo)
    if found is None:
        found = _next_fire_after(sched, after)
        if len(_NEXT_FIRE_MEMO) >= _NEXT_FIRE_MEMO_SIZE:
            _NEXT_FIRE_MEMO.clear()
        _NEXT_FIRE_MEMO[memo] = found
    return found


def _next_fire_after(sched: Any, after: datetime) -> datetime:
    if isinstance(sched, cron) or callable(getattr(sched, "next_fire_after", None)):
        # cron, and any schedule that computes exact fire times itself.
        return sched.next_fire_after(after)  # type: ignore[no-any-return]
    if isinstance(sched, schedule) and not isinstance(sched, crontab):
        run_every: timedelta = sched.run_every
        return after + run_every
    if isinstance(sched, crontab):
        # Pinned "now": Celery before 5.7 fires within the hour only when last_run_at
        # is today by the wall clock, so a time on another day would skip its hour.
        start, delta, _ = _pinned(sched, after).remaining_delta(after)
        nxt = (start + delta).astimezone(UTC)
        # remaining_delta works at minute precision; never return a time <= after.
        return nxt if nxt > after else _next_fire_after(sched, after + timedelta(minutes=1)
                                                        - timedelta(seconds=after.second))
    # Any other BaseSchedule (solar, user classes): ask it with "now" pinned to after.
    pinned = _pinned(sched, after)
    remaining = pinned.remaining_estimate(after)
    seconds = remaining.total_seconds() if isinstance(remaining, timedelta) else float(remaining)
    return after + timedelta(seconds=max(seconds, 0.001))


def first_fire_after(sched: Any, anchor: datetime) -> datetime:
    """The first fire time of an entry that never fired, anchored where the schedule
    first saw it.  The next fire time after ``anchor``, unless the schedule says
    otherwise with a ``first_fire_after`` method of its own: a one-shot whose
    time passed before any leader saw it still fires once, at ``anchor``."""
    run_every = interval_of(sched)
    if run_every is not None:  # an interval: no method of its own
        return anchor.astimezone(UTC) + run_every
    own = getattr(sched, "first_fire_after", None)
    if callable(own):
        return own(anchor.astimezone(UTC))  # type: ignore[no-any-return]
    return next_fire_after(sched, anchor)


def _pinned(sched: Any, now: datetime) -> Any:
    clone = sched.__class__.__new__(sched.__class__)
    clone.__dict__.update(sched.__dict__)
    clone.nowfun = lambda: now
    return clone


def describe_schedule(sched: Any) -> str:
    """How the CLI and the page show a schedule: a crontab as its five cron
    fields (``0 */3 * * mon-fri``), not Celery's ``<crontab: ... (m/h/dM/MY/d)>``."""
    if isinstance(sched, cron):
        return repr(sched)
    if isinstance(sched, crontab):
        return " ".join(_cron_field(getattr(sched, f"_orig_{field}")) for field in (
            "minute", "hour", "day_of_month", "month_of_year", "day_of_week"))
    run_every = interval_of(sched)
    if run_every is not None:
        return f"every {run_every.total_seconds():g}s"
    if isinstance(sched, schedule) and not isinstance(sched, crontab):
        return f"every {sched.run_every.total_seconds():g}s"
    return repr(sched)


def _cron_field(value: Any) -> str:
    """One crontab field as given: ``"*/15"``, ``0``, or a set of values."""
    if isinstance(value, (str, int)):
        return str(value)
    try:
        return ",".join(str(item) for item in sorted(value))
    except TypeError:
        return str(value)


# --------------------------------------------------------------------- parsing

class Interned:
    """Schedule objects and empty mappings shared by the entries of one load.

    100,000 entries with a few distinct schedules hold a few schedule objects,
    not 100,000 (a crontab holds its expanded sets; a ``cron`` its croniter),
    and each distinct schedule is validated once.  Schedules are values (equal
    ones fire at the same instants), so sharing them changes no fire time.
    An entry's empty kwargs and options are one shared, never-mutated dict.
    """

    __slots__ = ("empty", "from_json", "schedules", "tasks")

    def __init__(self) -> None:
        self.schedules: dict[Hashable, Any] = {}
        self.empty: dict[str, Any] = {}
        self.tasks: dict[str, str] = {}  # one string per task name (read from JSON: a copy each)
        self.from_json: dict[Hashable, Any] = {}  # a runtime entry's JSON schedule -> object

    def schedule(self, raw: Any, relative: bool, app: Any) -> Any:
        """The app-bound schedule of ``raw`` (``maybe_schedule``), shared with
        every equal one of this load; validated (one fire time computed) once."""
        key = _intern_key(raw, relative)
        found = self.schedules.get(key) if key is not None else None
        if found is None:
            found = maybe_schedule(raw, relative=relative, app=app)
            _check_computes(found)
            if key is not None:
                self.schedules[key] = found
        return found


def _intern_key(raw: Any, relative: bool) -> Hashable | None:
    """What makes two raw schedules equal (None: not shared)."""
    if isinstance(raw, (int, float, timedelta)):
        seconds = raw.total_seconds() if isinstance(raw, timedelta) else float(raw)
        return ("interval", seconds, relative)
    key: Hashable
    if type(raw) is schedule and raw.nowfun is None:
        key = ("interval", raw.run_every.total_seconds(), bool(raw.relative))
    elif type(raw) is crontab and raw.nowfun is None:
        key = ("crontab", raw._orig_minute, raw._orig_hour, raw._orig_day_of_week,
               raw._orig_day_of_month, raw._orig_month_of_year)
    elif type(raw) is cron and raw.nowfun is None:
        key = ("cron", *raw._key())
    else:
        return None
    return _hashable(key)


def _check_computes(sched: Any) -> None:
    """Raise if the schedule cannot compute a fire time (validated at load, not
    at its first tick).  An interval always can: its seconds were checked."""
    if interval_of(sched) is None:
        next_fire_after(sched, datetime.now(UTC))


def entry_from_config(name: str, spec: Any, app: Any,
                      what: str = "beat_schedule entry",
                      interned: Interned | None = None, runtime: bool = False) -> Entry:
    """One ``beat_schedule`` item, validated; raise EntryError naming it.

    ``what`` is how the messages call it (``"runtime entry"`` for the API and
    the command line, where there is no beat_schedule).  ``interned``: share
    schedules, task names and empty mappings with the other entries of the
    same load.  ``runtime``: the entry's ``runtime`` field.
    """
    if not isinstance(spec, dict):
        raise EntryError(f"{what} {name!r} must be a dict, got {spec!r}")
    if not spec.keys() <= ENTRY_KEYS:
        _reject_unknown(f"{what} {name!r}", "key", spec, ENTRY_KEYS)
    task = spec.get("task")
    if not isinstance(task, str) or not task:
        raise EntryError(f"{what} {name!r} needs a task name, got {task!r}")
    raw = spec.get("schedule")
    if isinstance(raw, bool) or not isinstance(raw, (int, float, timedelta, BaseSchedule)):
        raise EntryError(f"{what} {name!r} has an invalid schedule {raw!r}; use "
                         "seconds, a timedelta, schedule, crontab, solar or celery_leader.cron")
    # (A positive finite float, the usual case, is checked without formatting a name.)
    if isinstance(raw, (int, float, timedelta)) and not (
            type(raw) is float and 0 < raw < math.inf):
        interval_seconds(f"{what} {name!r}", raw)
    args = spec.get("args", ())
    if not isinstance(args, (list, tuple)):
        raise EntryError(f"{what} {name!r}: args must be a list or tuple")
    empty = interned.empty if interned is not None else None
    kwargs = spec.get("kwargs") or (empty if empty is not None else {})
    if not isinstance(kwargs, dict):
        raise EntryError(f"{what} {name!r}: kwargs must be a dict")
    options = spec.get("options") or {}
    options = (empty if not options and empty is not None
               else _options(f"{what} {name!r}", options, empty))
    catch_up, grace = spec.get("catch_up"), spec.get("misfire_grace")
    if "catch_up" in options or "misfire_grace" in options:
        options = dict(options)
        catch_up = spec.get("catch_up", options.pop("catch_up", None))
        grace = spec.get("misfire_grace", options.pop("misfire_grace", None))
        if not options and empty is not None:
            options = empty
    if catch_up is not None and catch_up not in CATCH_UP_POLICIES:
        raise EntryError(f"{what} {name!r}: catch_up must be one of "
                         f"{', '.join(CATCH_UP_POLICIES)}, got {catch_up!r}")
    if grace is not None and (isinstance(grace, bool) or not isinstance(grace, (int, float))
                              or grace <= 0):
        raise EntryError(f"{what} {name!r}: misfire_grace must be positive seconds")
    relative = bool(spec.get("relative", False))
    try:
        sched = _schedule_of(raw, relative, app, interned)
    except Exception as exc:
        raise EntryError(f"{what} {name!r}: schedule {raw!r} cannot compute its "
                         f"next fire time: {exc}") from exc
    if interned is not None:
        task = interned.tasks.setdefault(task, task)
    # Positional (Entry's field order): a third faster than by keyword, 100k times.
    return Entry(name, task, sched, tuple(args), kwargs if kwargs is empty else dict(kwargs),
                 options, catch_up, float(grace) if grace is not None else None,
                 bool(spec.get("enabled", True)), runtime)


def _schedule_of(raw: Any, relative: bool, app: Any, interned: Interned | None) -> Any:
    """The schedule an entry holds for its ``raw`` schedule (checked by the caller)."""
    if not relative and type(raw) in (float, int, timedelta):
        return raw  # held as given (interval_of)
    if interned is not None:
        return interned.schedule(raw, relative, app)
    sched = maybe_schedule(raw, relative=relative, app=app)
    _check_computes(sched)
    return sched


def interval_seconds(what: str, value: Any) -> float:
    """An interval schedule's seconds (a number or a timedelta), which must be
    finite and positive; EntryError naming ``what`` otherwise."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise EntryError(f"{what}: interval must be seconds or a timedelta, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise EntryError(f"{what}: interval must be positive, got {value!r}")
    return seconds


_VALID_OPTION_KEYS = OPTION_KEYS | {"catch_up", "misfire_grace"}


def _options(entry: str, options: Any, empty: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checked copy of an entry's options (``empty``, shared, when there are none)."""
    if not isinstance(options, dict):
        raise EntryError(f"{entry}: options must be a dict, got {options!r}")
    if not options and empty is not None:
        return empty
    checked: dict[str, Any] = dict(options)
    options = checked
    if not options.keys() <= _VALID_OPTION_KEYS:
        refused = sorted(key for key in options if key in REFUSED_OPTIONS)
        if refused:
            raise EntryError(f"{entry}: option {refused[0]!r} cannot be used in a schedule: "
                             f"{REFUSED_OPTIONS[refused[0]]}")
        _reject_unknown(entry, "option", options, _VALID_OPTION_KEYS)
    for key, value in options.items():
        # INVARIANT: a tick's options wait in Redis as JSON (its pending copy):
        # a value that does not survive it would be sent mangled, or not at all.
        if not _plain(value):
            raise EntryError(f"{entry}: options[{key!r}] must be plain data (kept in Redis "
                             f"as JSON with each tick), got {type(value).__name__}"
                             + (": give the name instead" if hasattr(value, "name") else ""))
    if "headers" in options and not isinstance(options["headers"], dict):
        raise EntryError(f"{entry}: options['headers'] must be a dict")
    priority = options.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                 or not 0 <= priority <= 255):
        raise EntryError(f"{entry}: priority must be an int 0-255")
    expires = options.get("expires")
    if expires is not None and not isinstance(expires, (int, float, datetime)):
        raise EntryError(f"{entry}: expires must be seconds or a datetime")
    return checked


def _plain(value: Any) -> bool:
    """JSON data as ``json`` writes it back: dicts with str keys, lists and
    tuples, str, numbers, bools, None; datetimes and timedeltas (turned into
    ISO strings and seconds by the pending copy)."""
    if value is None or isinstance(value, (str, int, float, datetime, timedelta)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):  # a canvas Signature is one
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    return False


def _reject_unknown(entry: str, kind: str, given: dict[Any, Any],
                    valid: frozenset[str]) -> None:
    """Unknown keys are an error, naming each with the closest valid one: a
    typo (``"scheduel"``, ``"optons"``) would otherwise be dropped silently."""
    unknown = sorted(str(key) for key in given if key not in valid)
    if not unknown:
        return
    described = []
    for key in unknown:
        match = closest(key, valid)
        described.append(f"{key!r} (did you mean {match!r}?)" if match else repr(key))
    raise EntryError(f"{entry}: unknown {kind}{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(described)}; valid: {', '.join(sorted(valid))}")


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while loading a schedule: the collector would
    run again and again over the objects being made (100,000 entries load in half
    the time without it), and they hold no cycles to collect.  Afterwards, the
    memory the load used for a while (growing dicts, replies) goes back to the
    system (:func:`release_freed_memory`)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        release_freed_memory()


def _find_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_freed_memory() -> None:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``;
    a no-op elsewhere).  Loading 100,000 entries frees ~15 MB of large blocks
    (dict tables outgrown, Redis replies) that glibc would otherwise keep."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _beat_schedule(app: Any) -> dict[str, Any]:
    schedule_conf = app_setting(app, "beat_schedule", None) or {}
    if not isinstance(schedule_conf, dict):
        raise EntryError(f"beat_schedule must be a dict, got {type(schedule_conf).__name__}")
    return schedule_conf


def entries_from_config(app: Any) -> dict[str, Entry]:
    """Every ``beat_schedule`` entry, or EntryError for the first bad one."""
    schedule_conf = _beat_schedule(app)
    interned = Interned()
    with gc_paused():
        return {name: entry_from_config(name, spec, app, interned=interned)
                for name, spec in schedule_conf.items()}


Definition = tuple[str, Any, bool, str]
"""What loading an entry needs of it: (name, schedule, enabled, task)."""


class BeatSchedule(Mapping[str, Entry]):
    """The app's ``beat_schedule`` entries, by name: validated whole at start-up
    (EntryError naming the first bad one), each :class:`Entry` built again from
    its definition whenever it is asked for.

    Problem.  An Entry per item costs ~120 bytes and repeats what beat_schedule
    already holds: 12 MB for 100,000 entries, nearly all of them idle for hours.
    Mechanism.  The runner loads the schedule from the definitions themselves
    (:meth:`definitions`: name, schedule, enabled, task; no object per entry)
    and holds Entry objects only for the entries due soon.  A rebuilt entry
    equals the one validated (same definition, same app), so the two are
    interchangeable.  Like ``celery beat``, this reads beat_schedule as it is at
    start-up: change it by restarting, not by editing the dict of a running app.
    """

    __slots__ = ("_app", "_interned", "_specs")

    def __init__(self, app: Any) -> None:
        self._app = app
        self._specs = _beat_schedule(app)
        interned = Interned()
        with gc_paused():
            for name, spec in self._specs.items():
                # Built and dropped one by one: validated, and nothing held.
                entry_from_config(name, spec, app, interned=interned)
        # Entries built again share their schedules (each checked once more, not
        # at every build: a herd of 10,000 crontab entries is rebuilt ahead of it).
        self._interned = Interned()

    def __getitem__(self, name: str) -> Entry:
        if len(self._interned.schedules) > 1024:
            self._interned = Interned()
        return entry_from_config(name, self._specs[name], self._app, interned=self._interned)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def definitions(self) -> Iterator[Definition]:
        """Every entry's :data:`Definition`, without an Entry: a load of 100,000
        entries makes no object per entry (entries alike share their schedule)."""
        interned = Interned()
        app = self._app
        for name, spec in self._specs.items():
            yield (name, _schedule_of(spec["schedule"], bool(spec.get("relative", False)),
                                      app, interned),
                   bool(spec.get("enabled", True)), spec["task"])


def definitions_of(entries: Mapping[str, Entry]) -> Iterator[Definition]:
    """The :data:`Definition` of each of ``entries`` (a :class:`BeatSchedule`
    makes them from beat_schedule, without an Entry each)."""
    if isinstance(entries, BeatSchedule):
        return entries.definitions()
    return ((name, entry.schedule, entry.enabled, entry.task) for name, entry in entries.items())


# ---------------------------------------------------------------- runtime JSON

def schedule_to_json(sched: Any) -> dict[str, Any]:
    if isinstance(sched, cron):
        zone = sched._tz_arg
        return {"type": "cron", "expr": sched.expression,
                "tz": getattr(zone, "key", zone) if zone is not None else None}
    if isinstance(sched, crontab):
        fields: dict[str, Any] = {
                "type": "crontab", "minute": sched._orig_minute, "hour": sched._orig_hour,
                "day_of_week": sched._orig_day_of_week,
                "day_of_month": sched._orig_day_of_month,
                "month_of_year": sched._orig_month_of_year}
        return fields
    if isinstance(sched, schedule):
        return {"type": "interval", "seconds": sched.run_every.total_seconds()}
    if isinstance(sched, timedelta):
        return {"type": "interval", "seconds": sched.total_seconds()}
    if isinstance(sched, (int, float)) and not isinstance(sched, bool):
        return {"type": "interval", "seconds": float(sched)}
    raise EntryError(f"runtime entries support cron, crontab and intervals, got {sched!r}")


def schedule_from_json(name: str, data: Any, interned: Interned | None = None) -> Any:
    """A runtime entry's schedule from its JSON; with ``interned``, the object
    made for an equal JSON schedule earlier in the same load."""
    if not isinstance(data, dict):
        raise EntryError(f"entry {name!r}: schedule must be a JSON object, got {data!r}")
    if interned is None or data.get("type") == "interval":
        # An interval is its seconds: nothing to share, and 100,000 distinct
        # ones would only fill the cache for the time of the load.
        return _schedule_from_json(name, data)
    try:
        key: Hashable = tuple(sorted(data.items()))
        hash(key)
    except TypeError:  # a list or object in it: invalid, or at least not shared
        return _schedule_from_json(name, data)
    found = interned.from_json.get(key)
    if found is None:
        found = interned.from_json[key] = _schedule_from_json(name, data)
    return found


def _schedule_from_json(name: str, data: dict[str, Any]) -> Any:
    kind = data.get("type")
    try:
        if kind == "cron":
            return cron(data["expr"], tz=data.get("tz"))
        if kind == "crontab":
            return crontab(**{k: str(data[k]) for k in ("minute", "hour", "day_of_week",
                                                         "day_of_month", "month_of_year")
                              if k in data})
        if kind == "interval":
            seconds = data["seconds"]
            if isinstance(seconds, timedelta):
                raise TypeError(f"interval seconds must be a number, got {seconds!r}")
            return interval_seconds(f"entry {name!r}", seconds)
    except EntryError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise EntryError(f"entry {name!r}: invalid schedule {data!r}: {exc}") from exc
    raise EntryError(f"entry {name!r}: unknown schedule type {kind!r}")


def entry_to_json(entry: Entry) -> str:
    return json.dumps(dict(entry.spec(), schedule=schedule_to_json(entry.schedule),
                           args=list(entry.args)), sort_keys=True)


def entry_from_json(name: str, raw: bytes | str, app: Any,
                    interned: Interned | None = None) -> Entry:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EntryError(f"runtime entry {name!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise EntryError(f"runtime entry {name!r} must be a JSON object")
    spec = dict(data, schedule=schedule_from_json(name, data.get("schedule"), interned))
    return entry_from_config(name, spec, app, what="runtime entry", interned=interned,
                             runtime=True)
