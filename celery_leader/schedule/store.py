"""The schedule's store: entries, overrides and progress, shared through Redis
by every replica and both dispatch modes (keys: see runner.py).

The public API for runtime entries (``add``, ``update``, ``enable``,
``disable``, ``remove``) and the reads the runner and ``celery leader
schedule`` make.  It takes a :class:`RedisLock` for its client and key space
and the Celery app for ``beat_schedule``; it never reads ``leader_*`` settings
(``celery_leader.schedule_api.ScheduleStore.for_app`` does).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import redis

from ..election.redact import secret_safe_logger
from ..election.redislock import RedisLock, acl_denied, as_text, key_of
from .entries import (
    NEVER,
    Definition,
    Entry,
    EntryError,
    EntryExistsError,
    Interned,
    entries_from_config,
    entry_from_config,
    entry_from_json,
    entry_to_json,
    first_fire_after,
    next_fire_after,
)

# Logger names are part of the interface (users configure them): the old module's.
log = secret_safe_logger("celery_leader.scheduler")
UTC = timezone.utc


def to_ms(dt: datetime) -> int:
    """An instant as whole milliseconds since the epoch (how Redis stores it)."""
    return round(dt.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


# Not fenced (any replica's answer is as good): for each entry of the JSON
# array ARGV[3] (prefixed 'r' for a runtime entry, 's' for a beat_schedule one) records
# ARGV[1] as its first-seen time if it has none (ARGV[2] = 'keep') or in any
# case (ARGV[2] = 'move'), and returns each entry's, in order, as one
# comma-separated string ('' for none, 'x' for a malformed one): one reply to
# parse for thousands of entries.  The first leader to see an entry sets it;
# later leaders anchor the entry there.  A runtime entry that no longer exists
# gets none, so a removed entry leaves nothing behind.
FIRST_SEEN_LUA = """
local names = cjson.decode(ARGV[3])
local seen, writes = {}, {}
for i = 1, #names do
  local name = string.sub(names[i], 2)
  local at = redis.call('HGET', KEYS[1], name)
  if string.sub(names[i], 1, 1) == 'r' and redis.call('HEXISTS', KEYS[2], name) == 0 then
    at = ''
  elseif not at or ARGV[2] == 'move' then
    at = ARGV[1]
    writes[#writes + 1] = name
    writes[#writes + 1] = at
    if #writes >= 1000 then
      redis.call('HSET', KEYS[1], unpack(writes))
      writes = {}
    end
  elseif not string.match(at, '^%-?%d+$') then
    at = 'x'
  end
  seen[i] = at
end
if #writes > 0 then redis.call('HSET', KEYS[1], unpack(writes)) end
return table.concat(seen, ',')
"""
RUNTIME_CHUNK = 1000
"""Runtime entries read per HSCAN call (a hint to Redis, which may return more)."""
FIRST_SEEN_CHUNK = 5000
"""Entries per FIRST_SEEN_LUA call: a few milliseconds of Redis time each."""

# (Only commands the documented ACL rule allows: scripts are checked too.)
# Not fenced (an API call): sets (ARGV[2], JSON) or clears (ARGV[2] = '') the
# override of beat_schedule entry ARGV[1] and bumps the version, in one step.
WRITE_OVERRIDE_LUA = """
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('INCRBY', KEYS[2], 1)
return 1
"""

# Not fenced (an API call): stores runtime entry ARGV[1] as ARGV[2] and bumps
# the version; a changed entry loses its first-seen time in the same step, so
# every runner counts a changed entry that has not fired from when it next
# loads it, without keeping the old definition to compare.
WRITE_RUNTIME_ENTRY_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[1])
end
redis.call('INCRBY', KEYS[2], 1)
return 1
"""

# Not fenced (an API call): removes runtime entry ARGV[1] and, with ARGV[2] =
# '1', its progress (state and first-seen time) in the same step, so nothing
# of a removed entry stays behind and a later entry of that name starts afresh.
REMOVE_RUNTIME_ENTRY_LUA = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if removed == 1 then
  if ARGV[2] == '1' then
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[4], ARGV[1])
  end
  redis.call('INCRBY', KEYS[2], 1)
end
return removed
"""


def next_fire_time(schedule: Any, last: datetime | None, first_seen: datetime | None,
                   now: datetime) -> datetime:
    """Where the runner puts an entry's next tick when it loads it (``schedule``:
    the entry's): after its last claimed fire time; if it never fired, after
    where the schedule first saw it; if no leader has seen it yet, after
    ``now``.  ``celery leader schedule`` shows the same."""
    if last is not None:
        return next_fire_after(schedule, last)
    return first_fire_after(schedule, first_seen or now)


def _iso_unless_never(moment: datetime) -> str | None:
    return None if moment >= NEVER else moment.isoformat()


class ScheduleStore:
    """The schedule's entries, overrides and progress, shared through Redis by
    every replica and both dispatch modes.

    Every key lives under the schedule's name (``leader_name``), whichever
    election dispatches, so the API need not know which mode runs.
    """

    def __init__(self, app: Any, lock: RedisLock, entries_name: str | None = None) -> None:
        self.app = app
        self.lock = lock
        self.client = lock.client
        self.name = entries_name or lock.hash_tag
        prefix = lock.key_prefix

        def key(suffix: str) -> str:
            return key_of(prefix, self.name, self.name, f"schedule:{suffix}")

        self.state_key = key("state")
        self.pending_key = key("pending")
        self.first_seen_key = key("first-seen")
        self.entries_key = key("entries")
        self.version_key = key("version")
        self.overrides_key = key("overrides")
        self.dispatcher_key = key("dispatcher")
        self.migrated_key = key("migrated")
        self.sent_key = key("sent")  # tickstart.py: pushed, not started yet
        self.sent_at_key = key("sent-at")
        self.started_key = key("started")
        # The standalone beat's own progress before both modes shared one.
        legacy = f"{self.name}-beat"
        self.legacy_beat_election = legacy
        self.legacy_beat_lease_key = key_of(prefix, legacy, legacy, "lease")
        self.legacy_state_key = key_of(prefix, legacy, legacy, "schedule:state")
        self.legacy_pending_key = key_of(prefix, legacy, legacy, "schedule:pending")
        self.legacy_first_seen_key = key_of(prefix, legacy, legacy,
                                                      "schedule:first-seen")
        self._first_seen = self.client.register_script(FIRST_SEEN_LUA)
        self._remove = self.client.register_script(REMOVE_RUNTIME_ENTRY_LUA)
        self._write_entry = self.client.register_script(WRITE_RUNTIME_ENTRY_LUA)
        self._write_override = self.client.register_script(WRITE_OVERRIDE_LUA)
        self._warned_clashes: set[str] = set()
        self.invalid_runtime_entries = 0  # runtime entries skipped at the last read
        self._warned_external: set[tuple[str, str]] = set()
        self._warned_no_hscan = False

    # -- beat_schedule entries and their overrides -----------------------------

    def static_entries(self) -> dict[str, Entry]:
        """The app's ``beat_schedule`` (EntryError for a bad one), overrides applied."""
        return self.apply_overrides(self._configured())

    def _configured(self) -> dict[str, Entry]:
        """The app's ``beat_schedule`` as configured (no app: none)."""
        return entries_from_config(self.app) if self.app is not None else {}

    def overrides(self) -> dict[str, bool]:
        """beat_schedule entry -> enabled, as set by enable()/disable()."""
        overrides: dict[str, bool] = {}
        for raw_name, raw in (self.client.hgetall(self.overrides_key) or {}).items():
            name = as_text(raw_name)
            try:
                value = json.loads(raw)
                if isinstance(value, dict) and isinstance(value.get("enabled"), bool):
                    overrides[name] = value["enabled"]
                    continue
            except (ValueError, UnicodeDecodeError):
                pass
            log.error("celery-leader: ignoring malformed override of entry %r: %r", name, raw)
        return overrides

    def apply_overrides(self, static: Mapping[str, Entry]) -> dict[str, Entry]:
        """A copy of ``static`` with the overrides applied (only the entries an
        override changes are new objects: 100k entries are not copied each time)."""
        entries = dict(static)
        for name, enabled in self.overrides().items():
            entry = entries.get(name)
            if entry is not None and entry.enabled != enabled:
                entries[name] = replace(entry, enabled=enabled)
        return entries

    def entries(self, static: Mapping[str, Entry],
                external: Mapping[str, Entry] | None = None) -> dict[str, Entry]:
        """Every entry: ``static`` (beat_schedule) with the overrides applied, the
        runtime ones and ``external`` (an EntrySource's); of two entries of one
        name, the first of these wins (:meth:`runtime_entries`, :meth:`external_beside`)."""
        entries = self.apply_overrides(static)
        runtime = self.runtime_entries(static)
        entries.update(runtime)
        runtime_tasks = {name: entry.task for name, entry in runtime.items()}
        entries.update(self.external_beside(external or {}, static, runtime_tasks))
        return entries

    def external_beside(self, external: Mapping[str, Entry], static: Mapping[str, Entry],
                        runtime_tasks: Mapping[str, str]) -> dict[str, Entry]:
        """The entries of ``external`` (an EntrySource's, source.py) not named like
        a beat_schedule entry (``static``) or a runtime one (``runtime_tasks``:
        name -> task), which win: an error is logged once."""
        beside: dict[str, Entry] = {}
        for name, entry in external.items():
            if name in static:
                winner = ("beat_schedule", static[name].task)
            elif name in runtime_tasks:
                winner = ("runtime", runtime_tasks[name])
            else:
                beside[name] = entry
                continue
            if (entry.source, name) not in self._warned_external:
                self._warned_external.add((entry.source, name))
                log.error("celery-leader: ignoring %s entry %r (task %r): the schedule has a "
                          "%s entry %r (task %r), which wins; rename one of them",
                          entry.source, name, entry.task, winner[0], name, winner[1])
        return beside

    # -- runtime entries (validated before anything is written) --------------

    def add(self, name: str, task: str, schedule: Any, args: Any = (), kwargs: Any = None,
            options: Any = None, *, enabled: bool = True, catch_up: str | None = None,
            misfire_grace: float | None = None, replace_existing: bool = False) -> Entry:
        if not isinstance(name, str) or not name:
            raise EntryError(f"entry name must be a non-empty string, got {name!r}")
        spec = {"task": task, "schedule": schedule, "args": args, "kwargs": kwargs or {},
                "options": options or {}, "catch_up": catch_up,
                "misfire_grace": misfire_grace, "enabled": enabled}
        entry = replace(entry_from_config(name, spec, self.app, what="runtime entry"),
                        runtime=True)
        encoded = entry_to_json(entry)  # also rejects schedules JSON cannot carry
        static = self.static_entries().get(name)
        if static is not None:
            raise EntryError(
                f"runtime entry {name!r} (task {task!r}) would clash with beat_schedule entry "
                f"{name!r} (task {static.task!r}); pick another name (a beat_schedule entry "
                f"is changed in beat_schedule, and can be disabled and enabled at runtime)")
        if not replace_existing and self.client.hexists(self.entries_key, name):
            raise EntryExistsError(f"runtime entry {name!r} already exists; use update()")
        self._write(name, encoded)
        return entry

    def update(self, name: str, **changes: Any) -> Entry:
        spec = self.get(name).spec()
        unknown = set(changes) - set(spec)
        if unknown:
            raise EntryError(f"entry {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
        spec.update(changes)
        schedule = spec.pop("schedule")
        return self.add(name, spec.pop("task"), schedule, replace_existing=True, **spec)

    def enable(self, name: str) -> Entry:
        """Enable a runtime entry, or a beat_schedule entry (an override in Redis)."""
        return self._set_enabled(name, True)

    def disable(self, name: str) -> Entry:
        """Disable a runtime entry, or a beat_schedule entry (an override in Redis,
        kept until enable(); beat_schedule itself is not changed)."""
        return self._set_enabled(name, False)

    def managed_elsewhere(self, name: str) -> str | None:
        """Where an entry of this name that is neither a runtime nor a beat_schedule
        entry is managed (an entry source's, e.g. django-celery-beat's admin), for
        the error that says so; None: nowhere this store knows of."""
        return None

    def _no_entry(self, name: str, message: str) -> EntryError:
        where = self.managed_elsewhere(name)
        return EntryError(message if where is None else f"{name!r} is {where}")

    def _set_enabled(self, name: str, enabled: bool) -> Entry:
        if self.client.hexists(self.entries_key, name):
            return self.update(name, enabled=enabled)
        entry = self._configured().get(name)
        if entry is None:
            raise self._no_entry(name, f"no entry named {name!r}: neither a runtime entry "
                                       "nor in beat_schedule")
        # The same as beat_schedule says: no override.
        override = "" if enabled == entry.enabled else json.dumps({"enabled": enabled})
        self._write_override(keys=[self.overrides_key, self.version_key], args=[name, override])
        return replace(entry, enabled=enabled)

    def remove(self, name: str) -> bool:
        """Remove a runtime entry and its progress; False if there is none.  A
        beat_schedule entry cannot be removed here (EntryError)."""
        static = name in self._configured()
        # Its progress belongs to the beat_schedule entry of that name, if any.
        removed = self._remove(keys=[self.entries_key, self.version_key, self.state_key,
                                     self.first_seen_key], args=[name, "0" if static else "1"])
        if not removed and static:
            raise EntryError(f"{name!r} is a beat_schedule entry: remove it from beat_schedule, "
                             f"or disable it (`celery leader schedule disable {name}`)")
        if not removed and self.managed_elsewhere(name) is not None:
            raise self._no_entry(name, "")
        return bool(removed)

    def get(self, name: str) -> Entry:
        raw = self.client.hget(self.entries_key, name)
        if raw is None:
            if name in self._configured():
                raise EntryError(f"{name!r} is a beat_schedule entry, not a runtime one: "
                                 "change it in beat_schedule (it can only be disabled and "
                                 "enabled at runtime)")
            raise self._no_entry(name, f"no runtime entry named {name!r}")
        return entry_from_json(name, raw, self.app)

    def _write(self, name: str, encoded: str) -> None:
        self._write_entry(keys=[self.entries_key, self.version_key, self.first_seen_key],
                          args=[name, encoded])

    def runtime_entries(self, static: Mapping[str, Entry] | None = None) -> dict[str, Entry]:
        """Valid runtime entries; a bad one is logged and skipped, never fatal.
        ``static``: beat_schedule, whose entries win over runtime ones of their name."""
        interned = Interned()  # entries alike share their schedule objects
        self.invalid_runtime_entries = 0
        entries: dict[str, Entry] = {}
        for chunk in self._runtime_chunks():
            for name, raw in chunk:
                entry = self._runtime_entry(name, raw, static or {}, interned)
                if entry is not None:
                    entries[name] = entry
        return entries

    def runtime_definitions(self, static: Mapping[str, Entry],
                            loaded: dict[str, str]) -> Iterator[list[Definition]]:
        """The :data:`Definition` of every valid runtime entry that beat_schedule
        (``static``) leaves, a chunk at a time, without keeping an Entry each
        (the runner builds one again when it comes near:
        :meth:`runtime_entries_named`).  Each name is yielded once and added to
        ``loaded`` (name -> task)."""
        interned = Interned()
        self.invalid_runtime_entries = 0
        for chunk in self._runtime_chunks():
            definitions: list[Definition] = []
            for name, raw in chunk:
                if name in loaded:
                    continue  # HSCAN may return a field twice
                entry = self._runtime_entry(name, raw, static, interned)
                if entry is not None:
                    loaded[name] = entry.task
                    definitions.append((name, entry.schedule, entry.enabled, entry.task))
            yield definitions

    def _runtime_chunks(self) -> Iterator[list[tuple[str, Any]]]:
        """The stored runtime entries, (name, JSON) about RUNTIME_CHUNK at a time
        (HSCAN): 100,000 entries never sit in memory as one reply.  A user whose
        ACL rule lacks +hscan reads them with one HGETALL (a warning, once)."""
        cursor = 0
        try:
            while True:
                cursor, fields = self.client.hscan(self.entries_key, cursor,
                                                   count=RUNTIME_CHUNK)
                pairs = (fields.items() if isinstance(fields, dict)
                         else zip(fields[::2], fields[1::2], strict=True))
                yield [(as_text(name), raw) for name, raw in pairs]
                if not int(cursor):
                    return
        except redis.exceptions.RedisError as error:
            if cursor or not acl_denied(error):
                raise
            refusal = str(error)
        if not self._warned_no_hscan:
            self._warned_no_hscan = True
            log.warning("celery-leader: the leader_redis_url user may not run HSCAN (%s): "
                        "runtime entries are read with one HGETALL; grant +hscan (the "
                        "documented ACL rule has it) to read them in chunks", refusal)
        fields = self.client.hgetall(self.entries_key) or {}
        yield [(as_text(name), raw) for name, raw in fields.items()]

    def runtime_entries_named(self, names: Iterable[str]) -> dict[str, Entry]:
        """The runtime entries of ``names`` that exist and are valid (one round
        trip: a pipeline of HGETs)."""
        names = list(names)
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hget(self.entries_key, name)
        interned = Interned()
        found = ((name, self._runtime_entry(name, raw, {}, interned))
                 for name, raw in zip(names, pipe.execute(), strict=True) if raw is not None)
        return {name: entry for name, entry in found if entry is not None}

    def _runtime_entry(self, name: str, raw: Any, static: Mapping[str, Entry],
                       interned: Interned) -> Entry | None:
        """Runtime entry ``name`` from its JSON; None, logged, when it is invalid
        (counted in ``invalid_runtime_entries``) or named like an entry of
        ``static`` (beat_schedule, which wins; logged once)."""
        try:
            entry = entry_from_json(name, raw, self.app, interned)
        except EntryError as exc:
            self.invalid_runtime_entries += 1
            log.error("celery-leader: skipping runtime entry: %s", exc)
            return None
        if name not in static:
            return entry
        if name not in self._warned_clashes:
            # Stored before that entry was added to beat_schedule.
            self._warned_clashes.add(name)
            log.error("celery-leader: ignoring runtime entry %r (task %r): beat_schedule "
                      "has an entry %r (task %r), which wins; remove the runtime one with "
                      "`celery leader schedule remove %s`", name, entry.task, name,
                      static[name].task, name)
        return None

    def version(self) -> int:
        raw = self.client.get(self.version_key)
        try:
            return int(raw or 0)
        except ValueError:
            return -1

    # -- progress -------------------------------------------------------------

    def first_seen(self, names: Iterable[str], now_ms: int, move: bool = False,
                   runtime: bool = False) -> dict[str, int]:
        """When the schedule first saw each entry of ``names`` (``now_ms`` if
        never, or with ``move``): where an interval entry that has not fired yet
        is anchored, whoever leads.  With ``runtime`` (they are runtime
        entries), one removed meanwhile is left out."""
        names = list(names)
        seen: dict[str, int] = {}
        for start in range(0, len(names), FIRST_SEEN_CHUNK):
            chunk = names[start:start + FIRST_SEEN_CHUNK]
            reply = as_text(self._first_seen(
                keys=[self.first_seen_key, self.entries_key],
                args=[now_ms, "move" if move else "keep",
                      json.dumps([("r" if runtime else "s") + name for name in chunk])]))
            for name, raw in zip(chunk, reply.split(","), strict=True):
                if not raw:
                    continue  # a runtime entry that was removed
                if raw == "x":
                    log.error("celery-leader: ignoring malformed first-seen time for %r", name)
                    seen[name] = now_ms
                else:
                    seen[name] = int(raw)
        return seen

    def first_seen_times(self) -> dict[str, int]:
        """Every recorded first-seen time (read only)."""
        times: dict[str, int] = {}
        for raw_name, raw in (self.client.hgetall(self.first_seen_key) or {}).items():
            try:
                times[as_text(raw_name)] = int(raw)
            except (TypeError, ValueError):
                continue
        return times

    def states(self, key: str | None = None) -> dict[str, dict[str, Any]]:
        states: dict[str, dict[str, Any]] = {}
        for raw_name, raw in (self.client.hgetall(key or self.state_key) or {}).items():
            name = as_text(raw_name)
            try:
                value = json.loads(raw)
                if isinstance(value, dict) and isinstance(value.get("last"), int):
                    states[name] = value
                    continue
            except (ValueError, UnicodeDecodeError):
                pass
            log.error("celery-leader: ignoring malformed schedule state for %r: %r", name, raw)
        return states

    def dispatcher(self) -> dict[str, Any] | None:
        """The leadership that owns the schedule, as last recorded (it may have ended)."""
        raw = self.client.get(self.dispatcher_key)
        try:
            owner = json.loads(raw) if raw is not None else None
        except (ValueError, UnicodeDecodeError):
            return None
        return owner if isinstance(owner, dict) else None

    # -- reports (``celery leader schedule``) ---------------------------------

    def report(self, external: Mapping[str, Entry] | None = None) -> list[dict[str, Any]]:
        """Every entry with its schedule, next and last fire time, and the term and
        election that claimed its last fire time.  The next fire time is the one the
        runner computes (:func:`next_fire_time`), from the state and first-seen time.
        ``external``: an EntrySource's entries, shown too (``source`` names it)."""
        entries = self.entries(self._configured(), external)
        states = self.states()
        # Progress of a standalone beat that has not been merged yet (an older version).
        for name, state in self.states(self.legacy_state_key).items():
            if name not in states or state["last"] > states[name]["last"]:
                states[name] = {"election": self.legacy_beat_election, **state}
        first_seen = self.first_seen_times()
        now = datetime.now(UTC)
        rows = []
        for name, entry in sorted(entries.items()):
            state = states.get(name, {})
            last = from_ms(state["last"]) if "last" in state else None
            seen = from_ms(first_seen[name]) if name in first_seen else None
            rows.append({
                "name": name, "task": entry.task, "schedule": entry.describe_schedule(),
                "enabled": entry.enabled, "runtime": entry.runtime,
                "source": entry.source or ("runtime" if entry.runtime else "beat_schedule"),
                "last_fire_time": last.isoformat() if last else None,
                "next_fire_time": _iso_unless_never(
                    next_fire_time(entry.schedule, last, seen, now))
                if entry.enabled else None,
                "term": state.get("term"),
                "election": state.get("election", self.name if state else None),
            })
        return rows

    def owner(self) -> dict[str, Any] | None:
        """The leadership recorded as owning the schedule, and whether it still leads
        its election (``leading``); None if no leader has dispatched it yet."""
        owner = self.dispatcher()
        if owner is None:
            return None
        election = str(owner.get("election", ""))
        lease = self.client.get(key_of(self.lock.key_prefix, election, self.name,
                                       "lease")) if election else None
        try:
            record = json.loads(lease) if lease is not None else {}
        except (ValueError, UnicodeDecodeError):
            record = {}
        leading = isinstance(record, dict) and record.get("holderIdentity") == owner.get(
            "identity") and record.get("term") == owner.get("term")
        return {**owner, "mode": "beat" if election != self.name else "worker",
                "leading": leading}
