"""The leader-gated scheduler: only the current leader dispatches, every tick
is claimed under the leader's term before it is published, and the schedule
state lives in Redis so the next leader continues exactly where the last one
stopped.

Redis keys (all in the election's hash slot, values JSON):

- ``schedule:state``   hash entry -> {"last": fire_ms, "term": t, "task_id": id}
- ``schedule:pending`` hash tick  -> the message, between claim and publish
- ``schedule:entries`` hash name  -> runtime entry definitions
- ``schedule:version`` counter bumped on every runtime change
- ``schedule:first-seen`` hash entry -> ms when a leader first loaded it (where
  an entry that has not fired yet is anchored)
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import redis

from .entries import Entry, EntryError, entries_from_config, entry_from_json, entry_to_json
from .publish import Unsupported, capture_redis_publish
from .redislock import FENCED, RedisLock
from .settings import LeaderSettings
from .tickstart import LostTicks, TickKeys

log = logging.getLogger(__name__)
UTC = timezone.utc
TASK_ID_NAMESPACE = uuid.UUID("6f1c7f5e-3b4e-4d8a-9a57-1f0a5c2f2d11")

# Fenced (FENCE_LUA runs first): advances the entry's state to fire time ARGV[4]
# only if it is later than the recorded one, and records the message as pending
# in the same step.  A fire time is thus claimed at most once, by a current term.
CLAIM_TICK_LUA = """
local current = redis.call('HGET', KEYS[2], ARGV[3])
if current then
  local ok, state = pcall(cjson.decode, current)
  if ok and type(state) == 'table' and tonumber(state.last)
     and tonumber(state.last) >= tonumber(ARGV[4]) then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[3], ARGV[6], ARGV[7]) end
return 1
"""

# Fenced: pushes the broker message(s) ARGV[7..] to the broker lists KEYS[5..]
# and deletes the pending copy ARGV[3], only if that copy is still ARGV[4]; and
# records the tick as sent (ARGV[5], unless empty) in KEYS[3], to be looked at
# after ARGV[6] ms (KEYS[4]), until it starts (tickstart.py).  A tick is thus
# either published, cleared and tracked, or none of them, and only by its term.
PUBLISH_TICK_LUA = """
if redis.call('HGET', KEYS[2], ARGV[3]) ~= ARGV[4] then return 0 end
for i = 5, #KEYS do redis.call('LPUSH', KEYS[i], ARGV[i + 2]) end
redis.call('HDEL', KEYS[2], ARGV[3])
if ARGV[5] ~= '' then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[5])
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[3])
end
return 1
"""

# Not fenced (any replica's answer is as good): records ARGV[1] as the first-seen
# time of each entry ARGV[2..] that has none, and returns every entry's.  The
# first leader to see an entry sets it; later leaders anchor the entry there.
FIRST_SEEN_LUA = """
local seen = {}
for i = 2, #ARGV do
  local at = redis.call('HGET', KEYS[1], ARGV[i])
  if not at then
    at = ARGV[1]
    redis.call('HSET', KEYS[1], ARGV[i], at)
  end
  seen[#seen + 1] = at
end
return seen
"""

# Fenced: takes over a pending message left by an older term, if unchanged.
ADOPT_PENDING_LUA = """
if redis.call('HGET', KEYS[2], ARGV[3]) ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
return 1
"""


def _ms(dt: datetime) -> int:
    return round(dt.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def beat_election_name(settings: LeaderSettings, standalone: bool) -> str:
    """Standalone beat replicas elect among themselves, apart from the workers'
    election (which leads the leader queue), so a worker can never win the
    schedule and leave it idle."""
    return f"{settings.name}-beat" if standalone else settings.name


class ScheduleStore:
    """Runtime entries and schedule state, shared by every replica through Redis.

    State and pending ticks live in the dispatching election's hash slot (the
    fenced claim touches them with the lease); runtime entries always live
    under ``leader_name``, so the API need not know which mode dispatches.
    """

    def __init__(self, app: Any, lock: RedisLock, entries_name: str | None = None) -> None:
        self.app = app
        self.lock = lock
        self.client = lock.client
        self.state_key = lock.key("schedule:state")
        self.pending_key = lock.key("schedule:pending")
        self.first_seen_key = lock.key("schedule:first-seen")
        self._first_seen = self.client.register_script(FIRST_SEEN_LUA)
        home = entries_name or lock.name
        self.entries_key = f"{lock.key_prefix}:{{{home}}}:schedule:entries"
        self.version_key = f"{lock.key_prefix}:{{{home}}}:schedule:version"

    @classmethod
    def for_app(cls, app: Any, standalone: bool = False) -> ScheduleStore:
        from .settings import read_settings

        settings = read_settings(app)
        lock = settings.lock("celery-leader-api", name=beat_election_name(settings, standalone))
        return cls(app, lock, entries_name=settings.name)

    # -- runtime entries (validated before anything is written) --------------

    def add(self, name: str, task: str, schedule: Any, args: Any = (), kwargs: Any = None,
            options: Any = None, *, enabled: bool = True, catch_up: str | None = None,
            misfire_grace: float | None = None, replace_existing: bool = False) -> Entry:
        from .entries import EntryExistsError, entry_from_config

        if not isinstance(name, str) or not name:
            raise EntryError(f"entry name must be a non-empty string, got {name!r}")
        spec = {"task": task, "schedule": schedule, "args": args, "kwargs": kwargs or {},
                "options": options or {}, "enabled": enabled, "catch_up": catch_up,
                "misfire_grace": misfire_grace}
        entry = replace(entry_from_config(name, spec, self.app, what="runtime entry"),
                        runtime=True)
        encoded = entry_to_json(entry)  # also rejects schedules JSON cannot carry
        if not replace_existing and self.client.hexists(self.entries_key, name):
            raise EntryExistsError(f"runtime entry {name!r} already exists; use update()")
        self._write(name, encoded)
        return entry

    def update(self, name: str, **changes: Any) -> Entry:
        current = self.get(name)
        spec = {"task": current.task, "schedule": current.schedule, "args": current.args,
                "kwargs": current.kwargs, "options": current.options,
                "enabled": current.enabled, "catch_up": current.catch_up,
                "misfire_grace": current.misfire_grace}
        unknown = set(changes) - set(spec)
        if unknown:
            raise EntryError(f"entry {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
        spec.update(changes)
        schedule = spec.pop("schedule")
        return self.add(name, spec.pop("task"), schedule, replace_existing=True, **spec)

    def enable(self, name: str) -> Entry:
        return self.update(name, enabled=True)

    def disable(self, name: str) -> Entry:
        return self.update(name, enabled=False)

    def remove(self, name: str) -> bool:
        pipe = self.client.pipeline()
        pipe.hdel(self.entries_key, name)
        pipe.incr(self.version_key)
        removed, _ = pipe.execute()
        return bool(removed)

    def get(self, name: str) -> Entry:
        raw = self.client.hget(self.entries_key, name)
        if raw is None:
            raise EntryError(f"no runtime entry named {name!r}")
        return entry_from_json(name, raw, self.app)

    def _write(self, name: str, encoded: str) -> None:
        pipe = self.client.pipeline()
        pipe.hset(self.entries_key, name, encoded)
        pipe.incr(self.version_key)
        pipe.execute()

    def runtime_entries(self) -> dict[str, Entry]:
        """Valid runtime entries; a bad one is logged and skipped, never fatal."""
        entries: dict[str, Entry] = {}
        for raw_name, raw in (self.client.hgetall(self.entries_key) or {}).items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            try:
                entries[name] = entry_from_json(name, raw, self.app)
            except EntryError as exc:
                log.error("celery-leader: skipping runtime entry: %s", exc)
        return entries

    def version(self) -> int:
        raw = self.client.get(self.version_key)
        try:
            return int(raw or 0)
        except ValueError:
            return -1

    def first_seen(self, names: list[str], now_ms: int) -> dict[str, int]:
        """When the schedule first saw each entry (``now_ms`` if never): where an
        interval entry that has not fired yet is anchored, whoever leads."""
        if not names:
            return {}
        seen: dict[str, int] = {}
        replies = self._first_seen(keys=[self.first_seen_key], args=[now_ms, *names])
        for name, raw in zip(names, replies, strict=True):
            try:
                seen[name] = int(raw)
            except (TypeError, ValueError):
                log.error("celery-leader: ignoring malformed first-seen time for %r: %r",
                          name, raw)
                seen[name] = now_ms
        return seen

    def states(self) -> dict[str, dict[str, Any]]:
        states: dict[str, dict[str, Any]] = {}
        for raw_name, raw in (self.client.hgetall(self.state_key) or {}).items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            try:
                value = json.loads(raw)
                if isinstance(value, dict) and isinstance(value.get("last"), int):
                    states[name] = value
                    continue
            except (ValueError, UnicodeDecodeError):
                pass
            log.error("celery-leader: ignoring malformed schedule state for %r: %r", name, raw)
        return states


@dataclass
class _Slot:
    entry: Entry
    last: datetime | None  # last fire time claimed (dispatched or skipped)
    next: datetime


class ScheduleRunner:
    """Dispatches the schedule while this replica leads (a leadership hook)."""

    def __init__(self, app: Any, lock: RedisLock, settings: LeaderSettings,
                 entries: dict[str, Entry] | None = None,
                 still_leading: Callable[[], bool] = lambda: True,
                 now: Callable[[], float] = time.time) -> None:
        self.app = app
        self.lock = lock
        self.settings = settings
        self.store = ScheduleStore(app, lock, entries_name=settings.name)
        self.config_entries = entries_from_config(app) if entries is None else entries
        self.still_leading = still_leading
        self._now = now
        self._claim = lock.fenced_script(CLAIM_TICK_LUA)
        self._adopt = lock.fenced_script(ADOPT_PENDING_LUA)
        self._publish_tick = lock.fenced_script(PUBLISH_TICK_LUA)
        # Ticks are tracked from their push to their start (tickstart.py).
        self.ticks = TickKeys(lock)
        self.tick_look_after = max(10.0, 2 * settings.lease_duration)
        self.lost_ticks = (LostTicks(lock, self.ticks, self.tick_look_after)
                           if settings.tick_run_once else None)
        # None until the first publish tells whether the broker is the lease's Redis.
        self.atomic_publish: bool | None = None
        self._warned_unsupported: set[str] = set()
        self._wake = threading.Event()
        self._unsent = False
        # Sent, but the pending copy is not deleted yet: never sent again by this runner.
        self._sent_pending: set[str] = set()
        self._warned_unknown: set[tuple[str, str]] = set()
        self.dispatched = 0

    def wake(self) -> None:
        self._wake.set()

    # -- the loop -----------------------------------------------------------

    def run(self, term: int, stop: threading.Event) -> None:
        """Dispatch until ``stop`` is set or the term is no longer current.

        Redis or broker errors never end it while the term lasts: it backs off
        one retry period and carries on from the state in Redis.
        """
        started_at = datetime.fromtimestamp(self._now(), UTC)
        while not stop.is_set() and self.still_leading():
            try:
                self._run(term, stop, started_at)
                return
            except Exception:
                log.exception("celery-leader: scheduler error; retrying in %.1fs",
                              self.settings.retry_period)
                stop.wait(self.settings.retry_period)

    def _run(self, term: int, stop: threading.Event, started_at: datetime) -> None:
        if not self._recover_pending(term):
            return
        if self.lost_ticks is not None and not self.lost_ticks.repush(term):
            return
        version = self.store.version()
        slots = self._load_slots(started_at)
        heap = self._heap(slots)
        next_check = time.monotonic() + self.settings.retry_period
        while not stop.is_set():
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.settings.retry_period
                if self._unsent and not self._recover_pending(term):
                    return
                if self.lost_ticks is not None and not self.lost_ticks.repush(term):
                    return
                current = self.store.version()
                if current != version:
                    version = current
                    slots = self._load_slots(datetime.fromtimestamp(self._now(), UTC), slots)
                    heap = self._heap(slots)
            now = datetime.fromtimestamp(self._now(), UTC)
            while heap and heap[0][0] <= _ms(now):
                _, _, name = heapq.heappop(heap)
                slot = slots.get(name)
                if slot is None or not slot.entry.enabled:
                    continue
                if not self._fire_due(slot, term, now, started_at):
                    return  # fenced: this term is over
                heapq.heappush(heap, (_ms(slot.next), id(slot), name))
            timeout = next_check - time.monotonic()
            if heap:
                timeout = min(timeout, heap[0][0] / 1000 - self._now())
            self._wake.clear()
            if timeout > 0:
                self._wake.wait(timeout)

    def _heap(self, slots: dict[str, _Slot]) -> list[tuple[int, int, str]]:
        heap = [(_ms(s.next), id(s), name) for name, s in slots.items() if s.entry.enabled]
        heapq.heapify(heap)
        return heap

    def _load_slots(self, started_at: datetime,
                    previous: dict[str, _Slot] | None = None) -> dict[str, _Slot]:
        entries = dict(self.config_entries)
        entries.update(self.store.runtime_entries())
        states = self.store.states()
        self._warn_unknown_tasks(entries)
        slots: dict[str, _Slot] = {}
        for name, entry in entries.items():
            old = previous.get(name) if previous is not None else None
            if (old is not None and old.entry.enabled and old.entry == entry
                    and name not in states):
                # Unchanged and not fired yet: keep its first fire time (a reload
                # anchored at "now" would postpone an interval entry every time).
                slots[name] = replace(old)
        # An entry that has not fired is anchored where the schedule first saw
        # it, by whichever leader: a fail-over must not postpone its first tick.
        fresh = [name for name in entries if name not in states and name not in slots]
        first_seen = self.store.first_seen(fresh, _ms(started_at))
        moved: dict[str, int] = {}
        for name, entry in entries.items():
            if name in slots:
                continue
            state = states.get(name)
            last = _from_ms(state["last"]) if state else None
            seen = first_seen.get(name, _ms(started_at))
            # Stored in whole ms; when it is this leader's own start, keep the exact instant.
            anchor = last or (started_at if seen == _ms(started_at) else _from_ms(seen))
            old = previous.get(name) if previous is not None else None
            if previous is not None and last is None:
                # Added, changed or re-enabled while leading, never fired: count
                # from now, and so does every later leader.
                anchor = started_at
                moved[name] = _ms(started_at)
            elif previous is not None and (old is None or not old.entry.enabled):
                # Re-enabled while leading: no catch-up for the time it was disabled.
                anchor = max(anchor, started_at)
            slots[name] = _Slot(entry, last, entry.next_fire_after(anchor))
        if moved:
            self.store.client.hset(self.store.first_seen_key,
                                   items=[part for pair in moved.items() for part in pair])
        return slots

    def _warn_unknown_tasks(self, entries: dict[str, Entry]) -> None:
        # Still sent: the task may be registered only on other workers.
        try:
            known = set(self.app.tasks)
        except Exception:  # pragma: no cover - an app that cannot list its tasks
            return
        for name, entry in entries.items():
            key = (name, entry.task)
            if entry.task not in known and key not in self._warned_unknown:
                self._warned_unknown.add(key)
                log.warning("celery-leader: entry %r sends task %r, which this app does not "
                            "register; it is sent anyway (check the name)", name, entry.task)

    # -- one entry ------------------------------------------------------------

    def _fire_due(self, slot: _Slot, term: int, now: datetime, started_at: datetime) -> bool:
        entry = slot.entry
        policy = entry.catch_up or self.settings.catch_up
        grace = entry.misfire_grace if entry.misfire_grace is not None \
            else self.settings.misfire_grace
        due = list(self._due_ticks(slot, now))
        missed = [t for t in due if t < started_at]
        current = [t for t in due if t >= started_at]
        if policy == "all":
            send = missed + current
        elif policy == "latest":
            send = ([missed[-1]] if missed else []) + current
        else:
            send = current
        if grace is not None:
            send = [t for t in send if (now - t).total_seconds() <= grace]
        # Claims only move forward, so claiming a tick also passes over the
        # skipped ones before it; the last due tick is claimed even if skipped.
        claims = [(fire, True) for fire in send]
        if due and (not send or send[-1] != due[-1]):
            claims.append((due[-1], False))
        for fire, publish in claims:
            if not self._claim_and_publish(entry, fire, term, publish=publish):
                return False
        if due:
            slot.last = due[-1]
        slot.next = entry.next_fire_after(slot.last or now)
        return True

    def _due_ticks(self, slot: _Slot, now: datetime) -> Iterator[datetime]:
        # Compared in whole milliseconds, like the heap keys: a tick the heap calls
        # due must be due here too, or the loop would pop and push it forever.
        fire = slot.next
        while _ms(fire) <= _ms(now):
            yield fire
            fire = slot.entry.next_fire_after(fire)

    def _claim_and_publish(self, entry: Entry, fire: datetime, term: int, publish: bool) -> bool:
        fire_ms = _ms(fire)
        tick = f"{entry.name}@{fire_ms}"
        task_id = str(uuid.uuid5(TASK_ID_NAMESPACE, f"{self.settings.name}:{tick}"))
        state = json.dumps({"last": fire_ms, "term": term, "task_id": task_id,
                            "skipped": not publish})
        message = ""
        if publish:
            message = json.dumps({
                "entry": entry.name, "task": entry.task, "args": list(entry.args),
                "kwargs": entry.kwargs, "options": _jsonable_options(entry.options),
                "fire_ms": fire_ms, "term": term, "task_id": task_id}, default=str)
        result = self._claim(term, keys=[self.store.state_key, self.store.pending_key],
                             args=[entry.name, fire_ms, state, tick, message])
        if result == FENCED:
            log.info("celery-leader: term %d is over; not dispatching %s", term, tick)
            return False
        if result == 1 and publish:
            self._publish(tick, message, term)
        return True

    def _publish(self, tick: str, message: str, term: int) -> None:
        # A deposed leader must not publish even what it claimed in time: the
        # next leader adopts pending messages of older terms.
        if not self.still_leading():
            log.warning("celery-leader: leadership ended before %s was sent; left pending "
                        "for the next leader", tick)
            return
        data = json.loads(message)
        options = dict(data["options"])
        headers = dict(options.pop("headers", None) or {})
        headers.update(leader_fire_time=_from_ms(data["fire_ms"]).isoformat(),
                       leader_term=term)
        if self.lost_ticks is not None:
            headers.update(self.ticks.headers(tick))

        def send(producer: Any = None) -> None:
            extra = {} if producer is None else {"producer": producer}
            self.app.send_task(data["task"], args=data["args"], kwargs=data["kwargs"],
                               task_id=data["task_id"], headers=headers, **extra, **options)

        if self.atomic_publish is not False and self._publish_atomically(
                tick, message, term, data["entry"], send):
            return
        try:
            send()
        except Exception:
            log.exception("celery-leader: could not send %s; will retry", tick)
            self._unsent = True
            return
        self.dispatched += 1
        self._sent_pending.add(tick)
        self.store.client.hdel(self.store.pending_key, tick)  # a Redis error: run() retries
        self._sent_pending.discard(tick)

    def _publish_atomically(self, tick: str, message: str, term: int, entry: str,
                            send: Callable[[Any], None]) -> bool:
        """Publish through PUBLISH_TICK_LUA when the broker allows it; False means
        nothing was sent and the caller must publish the ordinary way."""
        try:
            broker_keys: dict[str, str] = {}
            pushes = capture_redis_publish(self.app, self.store.client, send,
                                           check_transport=self.atomic_publish is None,
                                           broker_keys=broker_keys)
            if self.atomic_publish is None:
                self.atomic_publish = pushes is not None
                log.info("celery-leader: ticks are published %s", "in the same atomic step "
                         "as their claim is cleared" if pushes is not None else
                         "after their claim (the broker is not the lease's Redis)")
            if pushes is None:
                return False
            sent = ("" if self.lost_ticks is None else
                    self.ticks.sent_record(tick, pushes, broker_keys.get("unacked", "")))
            result = self._publish_tick(
                term, keys=[self.store.pending_key, self.ticks.sent, self.ticks.sent_at,
                            *(key for key, _ in pushes)],
                args=[tick, message, sent, round(self.tick_look_after * 1000),
                      *(payload for _, payload in pushes)])
        except Unsupported as why:
            if entry not in self._warned_unsupported:
                self._warned_unsupported.add(entry)
                log.warning("celery-leader: entry %r is published after its claim, not with "
                            "it (%s): a leader that dies in between makes the next one send "
                            "it again", entry, why)
            return False
        except Exception as error:
            # NOPERM: Redis refuses the script's keys before running it (or, inside
            # a script, at the first LPUSH, before it wrote anything).
            if isinstance(error, redis.exceptions.NoPermissionError) or (
                    isinstance(error, redis.exceptions.ResponseError)
                    and "NOPERM" in str(error)):
                self.atomic_publish = False
                log.warning("celery-leader: the leader_redis_url user may not push to the "
                            "broker's queue (%s); ticks are published after their claim "
                            "from now on (grant it +lpush on the queue keys to fence the "
                            "publish)", error)
                return False
            log.exception("celery-leader: could not send %s; will retry", tick)
            self._unsent = True
            return True
        if result == FENCED:
            log.warning("celery-leader: term %d ended before %s was sent; left pending for "
                        "the next leader", term, tick)
        elif result == 1:
            self.dispatched += 1
        else:
            log.info("celery-leader: %s was already sent", tick)
        return True

    def _recover_pending(self, term: int) -> bool:
        """Send what an older term claimed but may not have published, and what
        this term failed to send."""
        self._unsent = False
        for raw_tick, raw in (self.store.client.hgetall(self.store.pending_key) or {}).items():
            tick = raw_tick.decode() if isinstance(raw_tick, bytes) else str(raw_tick)
            if tick in self._sent_pending:  # only the clean-up after the send failed
                self.store.client.hdel(self.store.pending_key, tick)
                self._sent_pending.discard(tick)
                continue
            try:
                data = json.loads(raw)
                old_term = int(data["term"])
            except (ValueError, KeyError, TypeError):
                log.error("celery-leader: dropping malformed pending tick %r: %r", tick, raw)
                self.store.client.hdel(self.store.pending_key, tick)
                continue
            if old_term == term:
                self._publish(tick, raw.decode() if isinstance(raw, bytes) else raw, term)
                continue
            if old_term > term:
                continue
            adopted = json.dumps(dict(data, term=term))
            result = self._adopt(term, keys=[self.store.pending_key], args=[tick, raw, adopted])
            if result == FENCED:
                return False
            if result == 1:
                log.warning("celery-leader: sending %s claimed by term %d but maybe not sent",
                            tick, old_term)
                self._publish(tick, adopted, term)
        return True


def _jsonable_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else
                v.total_seconds() if isinstance(v, timedelta) else v)
            for k, v in options.items()}


def schedule_report(app: Any) -> list[dict[str, Any]]:
    """Every entry with its schedule, next and last fire time and dispatching term
    (whichever mode, worker-embedded or standalone, dispatched it last)."""
    store = ScheduleStore.for_app(app)
    entries = entries_from_config(app)
    entries.update(store.runtime_entries())
    states = store.states()
    for name, state in ScheduleStore.for_app(app, standalone=True).states().items():
        if name not in states or state["last"] > states[name]["last"]:
            states[name] = state
    now = datetime.now(UTC)
    rows = []
    for name, entry in sorted(entries.items()):
        state = states.get(name, {})
        last = _from_ms(state["last"]) if "last" in state else None
        rows.append({
            "name": name, "task": entry.task, "schedule": entry.describe_schedule(),
            "enabled": entry.enabled, "runtime": entry.runtime,
            "last_fire_time": last.isoformat() if last else None,
            "next_fire_time": entry.next_fire_after(max(last, now) if last else now).isoformat()
            if entry.enabled else None,
            "term": state.get("term"),
        })
    return rows
