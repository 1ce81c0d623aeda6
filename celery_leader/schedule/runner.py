"""The leader-gated scheduler: only the leader that owns the schedule
dispatches, every tick is claimed under the leader's term before it is
published, and the schedule's progress lives in Redis so the next leader
continues exactly where the last one stopped.

One schedule, two ways to dispatch it: the workers' election ``<name>`` (with
``leader_beat = True``) or standalone beats, which elect among themselves as
``<name>-beat``.  Both use the same keys, so a switch from one mode to the
other neither repeats nor drops a tick, and the schedule has one owner at a
time: ``schedule:dispatcher`` names the leadership (election, identity, term)
that dispatches it.  Every script that writes progress checks, atomically,
that the caller holds its term *and* owns the schedule; a leader of the other
election takes the schedule over only once the owner's leadership has ended
(its lease no longer names it), and until then refuses with one log line.
The beat election's keys carry the workers' hash tag (``RedisLock(...,
hash_tag=<name>)``) so one script can read both leases.

Redis keys (all in the hash slot of ``{<name>}``, values JSON):

- ``schedule:dispatcher``  the owning leadership {"election", "identity", "holder", "term"}
- ``schedule:state``       hash entry -> {"last": fire_ms, "term": t, "election": e,
  "task_id": id, "skipped": bool}
- ``schedule:pending``     hash tick  -> the message, between claim and publish
- ``schedule:first-seen``  hash entry -> ms when a leader first loaded it (where
  an entry that has not fired yet is anchored)
- ``schedule:entries``     hash name  -> runtime entry definitions
- ``schedule:overrides``   hash name  -> {"enabled": bool} for beat_schedule entries
- ``schedule:version``     counter bumped on every runtime change
- ``schedule:migrated``    hash tick  -> 1, pending ticks already moved from the
  old standalone-beat keys (only while a migration is under way)

Before the modes shared one schedule, the standalone beat kept its own progress
under ``{<name>-beat}``; the first owner of the schedule merges those keys in
(the later ``last`` of each entry wins) and deletes them.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from ..election.config import ConfigurationError
from ..election.elections import BEAT_SUFFIX
from ..election.metrics import Family
from ..election.redact import secret_safe_logger
from ..election.redislock import FENCED, RedisLock, acl_denied, as_text, key_of
from .duequeue import DueQueue
from .entries import (
    BeatSchedule,
    Definition,
    Entry,
    definitions_of,
    first_fire_after,
    gc_paused,
    next_fire_after,
)
from .forget import FORGET_EVERY, FORGET_REMOVED_LUA, RemovedEntries
from .herd import (
    HERD_DISPATCH_LUA,
    Claim,
    HerdDispatcher,
    HerdKeys,
    pending_message,
)
from .metrics import SKIPPED_GRACE, SKIPPED_POLICY, ScheduleStats
from .options import ScheduleOptions
from .publish import Unsupported, capture_redis_publish
from .source import EntrySource, RunRecordsHash
from .store import ScheduleStore, from_ms, next_fire_time, to_ms
from .tickstart import LostTicks, TickKeys

# Logger names are part of the interface (users configure them): the old module's.
log = secret_safe_logger("celery_leader.scheduler")
UTC = timezone.utc
TASK_ID_NAMESPACE = uuid.UUID("6f1c7f5e-3b4e-4d8a-9a57-1f0a5c2f2d11")

NOT_DISPATCHER = -2
"""What a schedule script returns when another election's live leadership owns
the schedule."""

# Used by every schedule script, after FENCE_LUA (which defines holds_term).
# KEYS[2] = schedule:dispatcher, KEYS[3] = the other election's lease;
# ARGV[3] = the caller's election, ARGV[4] = the caller's owner record.  The
# caller owns the schedule if the record is its own, or takes it when it is
# free, held by an older leadership of its own election (which the election
# itself has ended), or by a leadership of the other election that ended (its
# lease no longer names that holder and term).  INVARIANT: a live leadership
# of the other election is never displaced, so two elections never both own.
OWN_SCHEDULE_LUA = """
local function own_schedule()
  local raw = redis.call('GET', KEYS[2])
  if raw == ARGV[4] then return true, raw end
  if raw then
    local ok, owner = pcall(cjson.decode, raw)
    if ok and type(owner) == 'table' and owner.election ~= ARGV[3]
       and type(owner.holder) == 'string' and holds_term(KEYS[3], owner.holder, owner.term) then
      return false, raw
    end
  end
  redis.call('SET', KEYS[2], ARGV[4])
  return true, raw
end
"""

# Prefix of the scripts that write progress: nothing after it runs unless the
# caller owns the schedule (checked and taken in the same atomic step).
OWNED_LUA = OWN_SCHEDULE_LUA + """
if not own_schedule() then return -2 end
"""

# Fenced + owned: takes the schedule if it may; returns {1 or 0, the owner
# record found before ('' if none)}.
TAKE_SCHEDULE_LUA = OWN_SCHEDULE_LUA + """
local owned, previous = own_schedule()
return {owned and 1 or 0, previous or ''}
"""

# Fenced + owned: pushes the broker message(s) ARGV[9..] to the broker lists
# KEYS[7..] and deletes the pending copy ARGV[5], only if that copy is still
# ARGV[6]; and records the tick as sent (ARGV[7], unless empty) in KEYS[5], to
# be looked at after ARGV[8] ms (KEYS[6]), until it starts (tickstart.py).  A
# tick is thus either published, cleared and tracked, or none of them, and only
# by its term while it owns the schedule.  A tracked tick whose start token (the
# record its claim wrote) is gone has started: its copy is cleared, not pushed (2).
PUBLISH_TICK_LUA = OWNED_LUA + """
if redis.call('HGET', KEYS[4], ARGV[5]) ~= ARGV[6] then return 0 end
if ARGV[7] ~= '' and redis.call('HEXISTS', KEYS[5], ARGV[5]) == 0 then
  -- INVARIANT: a tracked tick whose token is consumed started: no copy is pushed.
  redis.call('HDEL', KEYS[4], ARGV[5])
  return 2
end
for i = 7, #KEYS do redis.call('LPUSH', KEYS[i], ARGV[i + 2]) end
redis.call('HDEL', KEYS[4], ARGV[5])
if ARGV[7] ~= '' then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  redis.call('HSET', KEYS[5], ARGV[5], ARGV[7])
  redis.call('ZADD', KEYS[6], now + tonumber(ARGV[8]), ARGV[5])
end
return 1
"""

# Fenced + owned: takes over a pending message left by another leadership (an
# older term, or the schedule's previous owner), if unchanged.
ADOPT_PENDING_LUA = OWNED_LUA + """
if redis.call('HGET', KEYS[4], ARGV[5]) ~= ARGV[6] then return 0 end
redis.call('HSET', KEYS[4], ARGV[5], ARGV[7])
return 1
"""

# Fenced + owned: merges the old standalone-beat progress into the schedule's.
# KEYS[4] state, KEYS[5] first-seen, KEYS[6] pending, KEYS[7] migrated;
# ARGV[5] = number of state pairs, ARGV[6] = number of first-seen pairs, then
# the state pairs (entry, state), the first-seen pairs (entry, ms) and the
# pending quadruples (tick, message, entry, fire ms).  A pending tick is moved
# at most once (``migrated`` remembers it) and only if this schedule has not
# claimed that fire time itself; a state only moves ``last`` forward; a
# first-seen time only moves back.  Returns {moved, dropped} pending ticks.
MIGRATE_LEGACY_LUA = OWNED_LUA + """
local n_state, n_seen = tonumber(ARGV[5]), tonumber(ARGV[6])
local first_pending = 7 + 2 * n_state + 2 * n_seen
local moved, dropped = 0, 0
local function last_of(raw)
  if not raw then return nil end
  local ok, state = pcall(cjson.decode, raw)
  if ok and type(state) == 'table' then return tonumber(state.last) end
  return nil
end
for i = first_pending, #ARGV, 4 do
  local tick = ARGV[i]
  if redis.call('HEXISTS', KEYS[7], tick) == 0 then
    local last = last_of(redis.call('HGET', KEYS[4], ARGV[i + 2]))
    if last and last >= tonumber(ARGV[i + 3]) then
      dropped = dropped + 1
    elseif redis.call('HEXISTS', KEYS[6], tick) == 0 then
      redis.call('HSET', KEYS[6], tick, ARGV[i + 1])
      moved = moved + 1
    end
    redis.call('HSET', KEYS[7], tick, 1)
  end
end
for i = 7, 6 + 2 * n_state, 2 do
  local old = last_of(ARGV[i + 1])
  local current = last_of(redis.call('HGET', KEYS[4], ARGV[i]))
  if old and (not current or current < old) then
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  end
end
for i = 7 + 2 * n_state, first_pending - 1, 2 do
  local current = tonumber(redis.call('HGET', KEYS[5], ARGV[i]))
  if not current or tonumber(ARGV[i + 1]) < current then
    redis.call('HSET', KEYS[5], ARGV[i], ARGV[i + 1])
  end
end
return {moved, dropped}
"""

class ScheduleTakenOver(Exception):
    """A schedule script found another election's live leadership owning the
    schedule: this leadership must stop dispatching and take it again first."""


def beat_election_name(options: ScheduleOptions, standalone: bool) -> str:
    """Standalone beat replicas elect among themselves, apart from the workers'
    election (which leads the leader queue), so a worker can never win the
    beats' election and leave the schedule idle."""
    return f"{options.name}{BEAT_SUFFIX}" if standalone else options.name


# Idle time is spent building templates in slices of at most WARM_SLICE s,
# stopping WARM_MARGIN s before the next tick is due.
WARM_SLICE, WARM_MARGIN = 0.1, 0.05
TEMPLATES_AHEAD = 60.0
"""Message templates (herd.py) are built ahead only for the entries due within
this many seconds, and kept after a tick only while the entry is due again
within it: a herd at the top of the hour finds its templates ready (10,000
fill in well under a second), and 100,000 idle entries hold none (~1.2 KB each).
The window is looked at again when less than half of it is left."""

_Tally = tuple[int, int, int]  # due ticks skipped by policy, by grace; caught up
# Where a loaded entry comes from (ScheduleRunner._load_entries).
_CONFIG, _RUNTIME, _HELD = "beat_schedule", "runtime", "source"
LOAD_BATCH = 5000
"""beat_schedule entries loaded at a time (one first-seen script call each)."""


@dataclass(slots=True)
class Loaded:
    """The schedule as the runner last loaded it.

    An entry costs its place in ``queue`` and no object of its own: its Entry
    is built again when it comes within TEMPLATES_AHEAD, from beat_schedule
    (entries.BeatSchedule) or from Redis (a runtime entry), so 100,000 idle
    entries hold ~100 bytes each.  Only an EntrySource's entries are ``held``
    (the source holds them anyway).
    """

    queue: DueQueue  # the enabled entries by next fire time
    held: dict[str, Entry]  # an EntrySource's entries, enabled or not
    # Entries re-enabled while leading, after ticks: (name, the reload's ms), to
    # be passed over in Redis (ScheduleRunner._pass_over_resumed).
    resumed: list[tuple[str, int]]


class ScheduleRunner:
    """Dispatches the schedule while this replica leads (a leadership hook) and
    its leadership owns the schedule.

    ``lock`` is the workers' election (worker-embedded mode) or the beats'
    (``LeaderSettings.beat_lock``); either way its keys must share the schedule's slot.
    """

    def __init__(self, app: Any, lock: RedisLock, settings: ScheduleOptions,
                 entries: dict[str, Entry] | None = None,
                 still_leading: Callable[[], bool] = lambda: True,
                 now: Callable[[], float] = time.time,
                 per_entry_metrics: bool = False,
                 source: EntrySource | None = None) -> None:
        if lock.hash_tag != settings.name:
            raise ConfigurationError(
                f"the scheduler's election {lock.name!r} must keep its keys in the schedule's "
                f"hash slot {{{settings.name}}} (build its lock with hash_tag="
                f"{settings.name!r})")
        self.app = app
        self.lock = lock
        self.settings = settings
        self.store = ScheduleStore(app, lock, entries_name=settings.name)
        # beat_schedule, validated now; its entries are built when they come near.
        self.config_entries: Mapping[str, Entry] = (BeatSchedule(app) if entries is None
                                                    else entries)
        self.still_leading = still_leading
        self._now = now
        # More entries, from outside Redis (source.py); re-read when its version moves.
        self.source = source
        if source is not None:
            source.watch(self.wake)
        # Which mode this runner dispatches for, and the other mode's lease.
        self.standalone = lock.name != settings.name
        other = settings.name if self.standalone else beat_election_name(settings, True)
        self.other_election = other
        self.other_lease_key = key_of(lock.key_prefix, other, settings.name, "lease")
        self._take = lock.fenced_script(TAKE_SCHEDULE_LUA)
        self._migrate = lock.fenced_script(MIGRATE_LEGACY_LUA)
        self._adopt = lock.fenced_script(ADOPT_PENDING_LUA)
        self._publish_tick = lock.fenced_script(PUBLISH_TICK_LUA)
        self._herd_script = lock.fenced_script(OWNED_LUA + HERD_DISPATCH_LUA)
        self.removed_entries = RemovedEntries(
            self.store.client, lock.fenced_script(OWNED_LUA + FORGET_REMOVED_LUA), self._owned,
            (self.store.state_key, self.store.first_seen_key, self.store.entries_key))
        # Ticks are tracked from their push to their start (tickstart.py).
        self.ticks = TickKeys(self.store.sent_key, self.store.sent_at_key,
                              self.store.started_key)
        self.tick_look_after = max(10.0, 2 * settings.lease_duration)
        self.lost_ticks = (LostTicks(lock, self.ticks, self.tick_look_after)
                           if settings.tick_run_once else None)
        # None until the first publish tells whether the broker is the lease's Redis.
        self.atomic_publish: bool | None = None
        self._told_how = False  # _tell_how_published
        self._warned_unsupported: set[str] = set()
        self._wake = threading.Event()
        self._unsent = False
        # Sent, but the pending copy is not deleted yet: never sent again by this runner.
        self._sent_pending: set[str] = set()
        self._warned_unknown: set[str] = set()  # task names
        self._cold: list[Entry] = []  # entries due soon whose templates are not built yet
        # The entries due within TEMPLATES_AHEAD, built again (Loaded says why).
        self._near: dict[str, Entry] = {}
        # Entries due by this instant (ms) are in _cold or have templates; None: none yet.
        self._warm_horizon: datetime | None = None
        self._dispatched = 0
        self.stats = ScheduleStats(per_entry=per_entry_metrics)
        if per_entry_metrics:  # beat_schedule's entries at 0 from start-up (metrics.py)
            self.stats.known(self.config_entries)
        # Ticks due now are claimed and published in fenced batches (herd.py).
        self.herd = HerdDispatcher(
            app, self.store.client, self._herd_script,
            HerdKeys(self.store.state_key, self.store.pending_key, self.store.entries_key,
                     self.ticks.sent, self.ticks.sent_at,
                     tracked=self.lost_ticks is not None),
            settings.name, lock.name, round(self.tick_look_after * 1000), TASK_ID_NAMESPACE,
            owned=lambda script, term, keys, args: self._owned(script, term, keys, args),
            publish_one=lambda tick, message, term: self._publish(tick, message, term),
            send=self._send_for_template,
            still_leading=lambda: self.still_leading(),
            atomic_allowed=lambda: self.atomic_publish is not False,
            forbid_atomic=self._forbid_atomic,
            sent_pending=self._sent_pending,
            claimed=self._herd_claimed,
            sent=self.stats.sent,
            published=self._tell_how_published,
            source=lambda: self.source)

    @property
    def dispatched(self) -> int:
        """Ticks this runner sent (in batches, or pending copies one at a time)."""
        return self._dispatched + self.herd.dispatched

    def wake(self) -> None:
        self._wake.set()

    def families(self) -> list[Family]:
        """This runner's metrics (schedule/metrics.py), for a scrape."""
        return self.stats.families(self.settings.name, self._pending_ticks)

    def _pending_ticks(self) -> int | None:
        try:
            return int(self.store.client.hlen(self.store.pending_key))
        except Exception:  # Redis unreachable: leave the gauge out of this scrape
            return None

    # -- owning the schedule ------------------------------------------------

    def _owner(self, term: int) -> str:
        """This leadership's record in ``schedule:dispatcher``."""
        return json.dumps({"election": self.lock.name, "identity": self.lock.identity(),
                           "holder": self.lock.holder(), "term": term}, sort_keys=True)

    def _owned(self, script: Any, term: int, keys: list[str], args: list[Any]) -> Any:
        """Run a schedule script (fenced + owned): FENCED when the term is over;
        ScheduleTakenOver when another election's live leadership owns the schedule."""
        result = script(term, keys=[self.store.dispatcher_key, self.other_lease_key, *keys],
                        args=[self.lock.name, self._owner(term), *args])
        if result == NOT_DISPATCHER:
            raise ScheduleTakenOver(
                f"the schedule is owned by {self.store.dispatcher()!r}, not by "
                f"{self.lock.name!r} term {term}")
        return result

    def _take_schedule(self, term: int, stop: threading.Event) -> datetime | None:
        """Own the schedule, waiting while another election's live leadership owns
        it (one log line).  Returns when this leadership began to own it (ticks due
        before are "missed", for the catch-up policy), or None when the term ended
        or ``stop`` was set."""
        refused = warned_legacy = False
        while not stop.is_set() and self.still_leading():
            attempt_at = datetime.fromtimestamp(self._now(), UTC)
            if self.store.client.get(self.store.legacy_beat_lease_key) is not None:
                if not warned_legacy:
                    warned_legacy = True
                    log.warning(
                        "celery-leader: not dispatching the schedule: a standalone beat of an "
                        "older celery-leader version leads election %r (%s) with its own "
                        "progress; stop every old beat (upgrade them together): this "
                        "leader starts once that lease is gone",
                        self.store.legacy_beat_election, self.store.legacy_beat_lease_key)
                stop.wait(self.settings.retry_period)
                continue
            result = self._take(term, keys=[self.store.dispatcher_key, self.other_lease_key],
                                args=[self.lock.name, self._owner(term)])
            if result is FENCED:
                log.info("celery-leader: term %d is over; not dispatching", term)
                return None
            owned, previous = int(result[0]), as_text(result[1])
            if owned:
                self._log_owner_change(previous, term, refused)
                return attempt_at if self._migrate_legacy(term) else None
            if not refused:
                refused = True
                log.warning("%s", self._refusal(previous))
            stop.wait(self.settings.retry_period)
        return None

    def _log_owner_change(self, previous: str, term: int, refused: bool) -> None:
        try:
            owner = json.loads(previous) if previous else {}
        except ValueError:
            owner = {}
        if isinstance(owner, dict) and owner.get("election") == self.other_election:
            log.warning("celery-leader: %s (election %r, term %d) takes over the schedule "
                        "from %s %s (election %r, term %s), whose leadership ended",
                        self._mode(), self.lock.name, term,
                        "the workers' leader" if self.standalone else "the standalone beat",
                        owner.get("identity"), owner.get("election"), owner.get("term"))
        elif refused:
            log.info("celery-leader: %s now dispatches the schedule (term %d)", self._mode(),
                     term)

    def _mode(self) -> str:
        return "this standalone beat" if self.standalone else "this worker"

    def _refusal(self, previous: str) -> str:
        """The one line a leader logs when the other mode owns the schedule."""
        try:
            owner = json.loads(previous)
        except ValueError:
            owner = {}
        holder = (f"{owner.get('identity')} (election {owner.get('election')!r}, "
                  f"term {owner.get('term')})") if isinstance(owner, dict) else previous
        if self.standalone:
            return (f"celery-leader: this standalone beat is not dispatching the schedule: the "
                    f"leading worker {holder} dispatches it (its workers run with "
                    f"leader_beat = True). Set leader_beat = False (or --no-leader-beat) on "
                    f"the workers to dispatch from standalone beats, or stop the standalone "
                    f"beats; this beat takes over when that leadership ends.")
        return (f"celery-leader: this worker is not dispatching the schedule: the standalone "
                f"beat {holder} dispatches it. Set leader_beat = False (or --no-leader-beat) "
                f"on the workers while standalone beats run, or stop the standalone beats; "
                f"this worker takes over when that leadership ends.")

    def _migrate_legacy(self, term: int) -> bool:
        """Merge the standalone beat's pre-shared progress (``{<name>-beat}``
        keys) into the schedule's, then delete it.  False if the term ended."""
        store = self.store
        client = store.client
        old_states = store.states(store.legacy_state_key)
        old_seen = client.hgetall(store.legacy_first_seen_key) or {}
        old_pending = client.hgetall(store.legacy_pending_key) or {}
        if not (old_states or old_seen or old_pending):
            return True
        states = [part for name, state in old_states.items() for part in
                  (name, json.dumps({"election": store.legacy_beat_election, **state}))]
        seen = []
        for raw_name, raw in old_seen.items():
            try:
                seen += [as_text(raw_name), int(raw)]
            except (TypeError, ValueError):
                log.error("celery-leader: dropping malformed old first-seen time %r: %r",
                          raw_name, raw)
        pending = []
        for raw_tick, raw in old_pending.items():
            try:
                data = json.loads(raw)
                pending += [as_text(raw_tick), as_text(raw), str(data["entry"]),
                            int(data["fire_ms"])]
            except (ValueError, KeyError, TypeError):
                log.error("celery-leader: dropping malformed old pending tick %r: %r",
                          raw_tick, raw)
        result = self._owned(self._migrate, term, keys=[
            store.state_key, store.first_seen_key, store.pending_key, store.migrated_key],
            args=[len(states) // 2, len(seen) // 2, *states, *seen, *pending])
        if result is FENCED:
            return False
        moved, dropped = (int(n) for n in result)
        log.warning("celery-leader: merged the old standalone beat progress (%s) into the "
                    "schedule: %d entries, %d pending ticks moved, %d dropped (their fire "
                    "time was already claimed here)", store.legacy_state_key,
                    len(old_states), moved, dropped)
        for key in (store.legacy_pending_key, store.legacy_state_key,
                    store.legacy_first_seen_key, store.migrated_key):
            client.delete(key)  # one at a time: they live in different slots
        return True

    # -- the loop -----------------------------------------------------------

    def run(self, term: int, stop: threading.Event) -> None:
        """Own the schedule, then dispatch until ``stop`` is set or the term is no
        longer current.

        Redis or broker errors never end it while the term lasts: it backs off
        one retry period and carries on from the state in Redis.
        """
        started_at: datetime | None = None  # when this leadership began dispatching
        while not stop.is_set() and self.still_leading():
            try:
                if started_at is None:
                    started_at = self._take_schedule(term, stop)
                    if started_at is None:
                        return
                self._run(term, stop, started_at)
                return
            except ScheduleTakenOver as lost:
                log.warning("celery-leader: stopped dispatching: %s", lost)
                started_at = None
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
        source_version = self.source.version() if self.source is not None else None
        loaded: Loaded | None = self._load_in_term(started_at, None, term)
        next_check = time.monotonic() + self.settings.retry_period
        # Not before the new leadership's first dispatch and catch-up: the sweep
        # reads every entry's name, which a fail-over at 100k entries must not wait on.
        forget_at = time.monotonic() + self.settings.lease_duration
        while loaded is not None and not stop.is_set():
            changed = False  # the entries: runtime ones or overrides, or the source's
            if time.monotonic() >= forget_at:
                forget_at = time.monotonic() + FORGET_EVERY
                if not self._forget_removed(loaded, term):
                    log.info("celery-leader: term %d is over (seen while forgetting "
                             "removed entries)", term)
                    return
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.settings.retry_period
                if self._unsent and not self._recover_pending(term):
                    return
                if self.lost_ticks is not None and not self.lost_ticks.repush(term):
                    log.info("celery-leader: term %d is over (seen by the sweep of ticks "
                             "not started)", term)
                    return
                current = self.store.version()
                changed, version = current != version, current
            if self.source is not None and self.source.version() != source_version:
                source_version = self.source.version()
                changed = True
            if changed:
                loaded = self._load_in_term(datetime.fromtimestamp(self._now(), UTC), loaded,
                                            term)
                if loaded is None:
                    return
            now = datetime.fromtimestamp(self._now(), UTC)
            queue = loaded.queue
            if queue and to_ms(queue.first()) <= to_ms(now) \
                    and not self._fire_all_due(loaded, term, now, started_at):
                return  # fenced: this term is over
            timeout = next_check - time.monotonic()
            if queue:
                timeout = min(timeout, queue.first().timestamp() - self._now())
                self._look_ahead(loaded, now)
            if self._cold and timeout > WARM_MARGIN:
                self._warm_templates(time.monotonic() + min(timeout - WARM_MARGIN, WARM_SLICE))
                continue
            self._wake.clear()
            if timeout > 0:
                self._wake.wait(timeout)

    def _forget_removed(self, loaded: Loaded, term: int) -> bool:
        """Forget the progress of entries the schedule no longer has (forget.py);
        False when the term is over."""
        source = self.source
        runs_key = source.runs_key if isinstance(source, RunRecordsHash) else None
        config, held = self.config_entries, loaded.held
        return self.removed_entries.forget(
            term, lambda name: name in config or name in held, runs_key)

    def _look_ahead(self, loaded: Loaded, now: datetime) -> None:
        """Queue the templates of the entries that came within TEMPLATES_AHEAD
        of ``now`` to be built while idle, the soonest due last (popped first),
        and hold their Entry objects (:meth:`_entry`).  Runs when less than half
        the window is left, and visits only the fire times within the window
        (DueQueue.within)."""
        horizon = now + timedelta(seconds=TEMPLATES_AHEAD)
        previous = self._warm_horizon
        if previous is not None and previous - now >= timedelta(seconds=TEMPLATES_AHEAD / 2):
            return
        self._warm_horizon = horizon
        found = loaded.queue.within(previous, horizon)
        if previous is None:
            # A fresh load: keep only the templates of the entries due soon.
            self.herd.keep_templates_of({name for _, name in found})
        found.sort(reverse=True)
        # The runtime entries among them, read from Redis in one round trip.
        self._near.update(self.store.runtime_entries_named(
            name for _, name in found if name not in loaded.held
            and name not in self._near and name not in self.config_entries))
        near = (self._entry(loaded, name) for _, name in found)
        self._cold[:0] = [entry for entry in near if entry is not None]

    def _load_in_term(self, started_at: datetime, previous: Loaded | None,
                      term: int) -> Loaded | None:
        """:meth:`_load`, then the entries it found re-enabled passed over in Redis
        under ``term``; None when the term is over."""
        loaded = self._load(started_at, previous)
        return loaded if self._pass_over_resumed(loaded, term) else None

    def _pass_over_resumed(self, loaded: Loaded, term: int) -> bool:
        """Claim, without sending, each entry re-enabled while leading at the
        instant it resumed: its progress in Redis then says where it resumed, so
        a later reload or leader counts from there, as this load does.  False
        when the term is over."""
        claims = [Claim(entry, ms, False) for name, ms in loaded.resumed
                  if (entry := self._entry(loaded, name, hold=False)) is not None]
        loaded.resumed = []
        return self.herd.dispatch(claims, term) if claims else True

    def _entry(self, loaded: Loaded, name: str, hold: bool = True) -> Entry | None:
        """Entry ``name`` of ``loaded`` (in its queue): held, or built again, from
        beat_schedule or from Redis, and then (``hold``) held while it is due
        within the window.  None if it is a runtime entry removed since the load
        (a reload follows: the removal bumped the version)."""
        entry = loaded.held.get(name) or self._near.get(name)
        if entry is not None:
            return entry
        if name in self.config_entries:
            entry = self.config_entries[name]
            if not entry.enabled:  # enabled by an override (the queue has enabled ones only)
                entry = replace(entry, enabled=True)
        else:
            entry = self.store.runtime_entries_named([name]).get(name)
            if entry is None:
                return None
        if hold:
            self._near[name] = entry
        return entry

    def _warm_templates(self, deadline: float) -> None:
        """Build message templates ahead of the ticks (herd.py), so a herd at the
        top of the hour does not build thousands of them itself."""
        try:
            self.herd.warm(self._cold, deadline)
        except Exception as error:  # the broker, say: they are built at the first tick
            self._cold = []
            log.warning("celery-leader: could not build message templates ahead (%s); they "
                        "are built at each entry's first tick", error)

    def _load(self, started_at: datetime, previous: Loaded | None = None) -> Loaded:
        """Load the schedule: every entry's next fire time, from its progress in
        Redis (or where the schedule first saw it); ``previous``: the schedule as
        loaded before, for a reload while leading.  Templates are looked at
        afresh: only the entries due within TEMPLATES_AHEAD keep theirs or get one
        built (:meth:`_look_ahead`)."""
        with gc_paused():
            loaded = self._load_entries(started_at, previous)
        self._cold = []
        self._near = {}
        self._warm_horizon = None
        self._look_ahead(loaded, datetime.fromtimestamp(self._now(), UTC))
        return loaded

    def _load_entries(self, started_at: datetime, previous: Loaded | None) -> Loaded:
        config = self.config_entries
        overrides = self.store.overrides()
        states = self.store.states()
        was_due = previous.queue.fire_times() if previous is not None else {}
        runtime: dict[str, str] = {}  # runtime entry -> task, as loaded (beat_schedule wins)
        held: dict[str, Entry] = {}
        started_ms = to_ms(started_at)
        try:
            known: set[str] | None = set(self.app.tasks) | self._warned_unknown
        except Exception:  # pragma: no cover - an app that cannot list its tasks
            known = None
        unknown: dict[str, list[str]] = {}  # task -> the entries that send it
        moved: list[str] = []
        resumed: list[str] = []
        queue = DueQueue()
        count = 0

        def keeps(name: str, kind: str) -> datetime | None:
            """The fire time an enabled entry not fired since the previous load
            keeps (a reload anchored at "now" would postpone an interval entry
            every time), unless it changed: a beat_schedule entry cannot; a
            runtime one is not kept (a change removes its first-seen time
            instead, store.WRITE_RUNTIME_ENTRY_LUA, so it counts from now)."""
            fire = was_due.get(name)
            if fire is None or name in states or kind == _RUNTIME:
                return None
            if kind == _HELD and (previous is None or previous.held.get(name) != held[name]):
                return None
            return fire

        def load(batch: list[Definition], kind: str) -> None:
            nonlocal count
            # An entry that has not fired is anchored where the schedule first saw
            # it, by whichever leader: a fail-over must not postpone its first tick.
            first_seen = self.store.first_seen(
                [name for name, *_ in batch if name not in states and keeps(name, kind) is None],
                started_ms, runtime=kind == _RUNTIME)
            count += len(batch)
            for name, sched, enabled, task in batch:
                if known is not None and task not in known:
                    unknown.setdefault(task, []).append(name)
                if kind == _CONFIG and name in overrides:
                    enabled = overrides[name]
                was = keeps(name, kind) if enabled else None
                if kind == _RUNTIME and enabled and name not in states \
                        and first_seen.get(name, started_ms) != started_ms:
                    # Its first-seen time outlived every write since (a change
                    # removes it): unchanged, so it keeps its fire time too.
                    was = was_due.get(name)
                if was is not None:
                    queue.push(was, name)
                    continue
                state = states.get(name)
                last = from_ms(state["last"]) if state else None
                if previous is not None and last is None and kind != _RUNTIME:
                    # Added, changed or re-enabled while leading, never fired: count
                    # from now, and so does every later leader.
                    moved.append(name)
                    if enabled:
                        queue.push(first_fire_after(sched, started_at), name)
                    continue
                if not enabled:
                    continue
                seen = first_seen.get(name, started_ms)
                # Stored in whole ms; when it is this leader's own start, keep the exact
                # instant.
                seen_at = started_at if seen == started_ms else from_ms(seen)
                if previous is not None and name not in was_due:
                    # Re-enabled while leading: no catch-up for the time it was disabled.
                    fire = next_fire_after(sched, max(last or seen_at, started_at))
                    if last is not None and last < started_at:
                        # And none at a later reload or leader: its progress moves
                        # to now (_pass_over_resumed), or they would count from
                        # ``last`` and send every tick of the time it was disabled.
                        resumed.append(name)
                else:
                    fire = next_fire_time(sched, last, seen_at, started_at)
                queue.push(fire, name)

        definitions = definitions_of(config)
        while batch := list(itertools.islice(definitions, LOAD_BATCH)):
            load(batch, _CONFIG)
        # Runtime entries, a chunk at a time (never one reply of 100,000).
        for batch in self.store.runtime_definitions(config, runtime):
            load(batch, _RUNTIME)
        # The names this load gave to beat_schedule and runtime entries win (a
        # runtime entry removed since is not read again: its name stays taken).
        held = self.store.external_beside(
            self.source.entries() if self.source is not None else {}, config, runtime)
        load([(name, e.schedule, e.enabled, e.task) for name, e in held.items()], _HELD)
        self.store.first_seen(moved, started_ms, move=True)
        self.stats.entries_loaded = count
        self.stats.entries_invalid = self.store.invalid_runtime_entries
        self._warn_unknown_tasks(unknown)
        return Loaded(queue, held, [(name, started_ms) for name in resumed])

    def _warn_unknown_tasks(self, unknown: dict[str, list[str]]) -> None:
        """One warning per task name this app does not register (not one per
        entry: 100,000 entries of one task log one line)."""
        # Still sent: the task may be registered only on other workers.
        for task, names in unknown.items():
            self._warned_unknown.add(task)
            shown = ", ".join(repr(name) for name in names[:3])
            log.warning("celery-leader: %s %s%s send%s task %r, which this app does not "
                        "register; it is sent anyway (check the name)",
                        "entry" if len(names) == 1 else f"{len(names)} entries", shown,
                        ", ..." if len(names) > 3 else "", "s" if len(names) == 1 else "",
                        task)

    # -- one entry ------------------------------------------------------------

    def _fire_all_due(self, loaded: Loaded, term: int, now: datetime,
                      started_at: datetime) -> bool:
        """Pop every entry due by ``now`` (a herd: thousands at the top of the
        hour), claim and publish their ticks in fenced batches (herd.py), then
        queue each at its next fire time.  False when the term is over."""
        now_ms = to_ms(now)
        queue = loaded.queue
        claims: list[Claim] = []
        # (name, its entry, its new next fire time, claims up to here, its tally)
        due: list[tuple[str, Entry, datetime, int, _Tally]] = []
        while queue and to_ms(queue.first()) <= now_ms:
            fire, names = queue.pop_first()
            for name in names:
                entry = self._entry(loaded, name)
                if entry is None or not entry.enabled:
                    continue  # removed or disabled since the load (a reload follows)
                fire_next, tally = self._due_claims(entry, fire, now, now_ms, started_at,
                                                    claims)
                due.append((name, entry, fire_next, len(claims), tally))
        done = self.herd.dispatch(claims, term)
        for _, entry, _, claims_end, tally in due:
            # Counted only for the entries whose claims all went through.
            if claims_end <= self.herd.claims_done:
                self._count(entry, tally)
        if not done:
            return False
        horizon = self._warm_horizon
        for name, _, fire_next, _, _ in due:
            queue.push(fire_next, name)
            if horizon is not None and fire_next > horizon:
                # Not due again within the window: built again when it comes near.
                self.herd.forget_template(name)
                self._near.pop(name, None)
        return True

    def _count(self, entry: Entry, tally: _Tally) -> None:
        """The metrics of one entry's due ticks not sent, or sent late (catch-up)."""
        skipped_policy, skipped_grace, caught_up = tally
        self.stats.skipped_ticks(entry.name, SKIPPED_POLICY, skipped_policy)
        self.stats.skipped_ticks(entry.name, SKIPPED_GRACE, skipped_grace)
        self.stats.caught_up_ticks(entry.name, caught_up)

    def _herd_claimed(self, claim: Claim) -> None:
        """A batch claimed ``claim``: tell its entry source (for its own bookkeeping)."""
        if claim.entry.source and self.source is not None:
            self._tell_source(self.source, claim.entry, from_ms(claim.fire_ms), claim.publish)

    def _due_claims(self, entry: Entry, fire: datetime, now: datetime, now_ms: int,
                    started_at: datetime, claims: list[Claim]) -> tuple[datetime, _Tally]:
        """Append the claims of ``entry``'s ticks from ``fire`` (its next fire time)
        due by ``now`` (catch-up policy, misfire grace), and return its next fire
        time then and the ticks (skipped by the policy, skipped by the grace,
        caught up) for the metrics.  Schedule arithmetic runs once per tick: the
        first fire time not due is the next."""
        policy = entry.catch_up or self.settings.catch_up
        grace = entry.misfire_grace if entry.misfire_grace is not None \
            else self.settings.misfire_grace
        # Compared in whole milliseconds, like the heap keys: a tick the heap calls
        # due must be due here too, or the loop would pop and push it forever.
        due: list[datetime] = []
        while to_ms(fire) <= now_ms:
            due.append(fire)
            fire = entry.next_fire_after(fire)
        if not due:
            return fire, (0, 0, 0)
        if len(due) == 1 and due[0] >= started_at:
            send = due  # the usual case: one current tick
        else:
            missed = [t for t in due if t < started_at]
            current = [t for t in due if t >= started_at]
            if policy == "all":
                send = missed + current
            elif policy == "latest":
                send = ([missed[-1]] if missed else []) + current
            else:
                send = current
        after_policy = len(send)
        if grace is not None:
            send = [t for t in send if (now - t).total_seconds() <= grace]
        # Claims only move forward, so claiming a tick also passes over the
        # skipped ones before it; the last due tick is claimed even if skipped.
        for tick in send:
            claims.append(Claim(entry, to_ms(tick), True))
        if not send or send[-1] != due[-1]:
            claims.append(Claim(entry, to_ms(due[-1]), False))
        tally = (len(due) - after_policy, after_policy - len(send),
                 sum(1 for tick in send if tick < started_at))
        return fire, tally

    def _tell_source(self, source: EntrySource, entry: Entry, fire: datetime,
                     published: bool) -> None:
        try:
            source.claimed(entry, fire, published)
        except Exception:  # its bookkeeping only: the claim in Redis stands
            log.exception("celery-leader: %s entry source failed to record %s@%d",
                          entry.source, entry.name, to_ms(fire))

    def _publish(self, tick: str, message: str, term: int) -> None:
        # A deposed leader must not publish even what it claimed in time: the
        # next leader adopts pending messages of older terms.
        if not self.still_leading():
            log.warning("celery-leader: leadership ended before %s was sent; left pending "
                        "for the next leader", tick)
            return
        data = json.loads(message)

        def send(producer: Any = None) -> None:
            self._send_task(data, producer, from_ms(data["fire_ms"]).isoformat(), term, tick)

        if self.atomic_publish is not False and self._publish_atomically(
                tick, message, term, data["entry"], bool(data.get("tracked")), send):
            return
        try:
            send()
        except Exception:
            log.exception("celery-leader: could not send %s; will retry", tick)
            self._unsent = True
            return
        self._dispatched += 1
        self.stats.sent(tick, term)
        self._sent_pending.add(tick)
        self.store.client.hdel(self.store.pending_key, tick)  # a Redis error: run() retries
        self._sent_pending.discard(tick)

    def _send_task(self, data: dict[str, Any], producer: Any, fire_time: Any, term: Any,
                   tick: str) -> None:
        """``app.send_task`` of a pending copy ``data``, with the leader headers: the
        one way a tick's message is built, for a tick or for an entry's template."""
        options = dict(data["options"])
        headers = dict(options.pop("headers", None) or {})
        headers.update(leader_fire_time=fire_time, leader_term=term)
        if data.get("tracked"):
            headers.update(self.ticks.headers(tick))
        extra = {} if producer is None else {"producer": producer}
        self.app.send_task(data["task"], args=data["args"], kwargs=data["kwargs"],
                           task_id=data["task_id"], headers=headers, **extra, **options)

    def _send_for_template(self, producer: Any, entry: Entry, task_id: str,
                           sentinels: dict[str, Any]) -> None:
        """Send ``entry``'s message as a tick's publish would, with the template's
        sentinels for the task id, fire time, term and tick (template.py)."""
        data = json.loads(pending_message(entry, 0, 0, self.lock.name, task_id,
                                          tracked=self.lost_ticks is not None))
        self._send_task(data, producer, sentinels["leader_fire_time"],
                        sentinels["leader_term"], sentinels["__tick__"])

    def _tell_how_published(self, atomic: bool, why: str) -> None:
        """The one line, at the first tick sent (one at a time or in a herd), that
        says whether ticks are pushed in the step that clears their claim."""
        if self._told_how:
            return
        self._told_how = True
        if atomic:
            log.info("celery-leader: ticks are published in the same atomic step as their "
                     "claim is cleared")
        else:
            log.info("celery-leader: ticks are published after their claim (%s)", why)

    def _forbid_atomic(self, error: Exception) -> None:
        self.atomic_publish = False
        log.warning("celery-leader: the leader_redis_url user may not push to the "
                    "broker's queue (%s); ticks are published after their claim "
                    "from now on (grant it +lpush on the queue keys to fence the "
                    "publish)", error)

    def _publish_atomically(self, tick: str, message: str, term: int, entry: str,
                            tracked: bool, send: Callable[[Any], None]) -> bool:
        """Publish through PUBLISH_TICK_LUA when the broker allows it; False means
        nothing was sent and the caller must publish the ordinary way."""
        try:
            broker_keys: dict[str, str] = {}
            pushes = capture_redis_publish(self.app, self.store.client, send,
                                           check_transport=self.atomic_publish is None,
                                           broker_keys=broker_keys)
            if self.atomic_publish is None:
                self.atomic_publish = pushes is not None
                self._tell_how_published(pushes is not None,
                                         "the broker is not the lease's Redis")
            if pushes is None:
                return False
            sent = (self.ticks.sent_record(pushes, broker_keys.get("unacked", ""))
                    if tracked else "")
            result = self._owned(
                self._publish_tick, term,
                keys=[self.store.pending_key, self.ticks.sent, self.ticks.sent_at,
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
        except ScheduleTakenOver:
            raise
        except Exception as error:
            # NOPERM: Redis refuses the script's keys before running it (or, inside
            # a script, at the first LPUSH, before it wrote anything).
            if acl_denied(error):
                self._forbid_atomic(error)
                return False
            log.exception("celery-leader: could not send %s; will retry", tick)
            self._unsent = True
            return True
        if result is FENCED:
            log.warning("celery-leader: term %d ended before %s was sent; left pending for "
                        "the next leader", term, tick)
        elif result == 1:
            self._dispatched += 1
            self.stats.sent(tick, term)
        elif result == 2:
            log.info("celery-leader: %s already started; not sending it again", tick)
        else:
            log.info("celery-leader: %s was already sent", tick)
        return True

    def _recover_pending(self, term: int) -> bool:
        """Send what another leadership (an older term, or the schedule's previous
        owner) claimed but may not have published, and what this term failed to
        send."""
        self._unsent = False
        for raw_tick, raw in (self.store.client.hgetall(self.store.pending_key) or {}).items():
            tick = as_text(raw_tick)
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
            if old_term == term and data.get("election") == self.lock.name:
                self._publish(tick, as_text(raw), term)
                continue
            # Its writer can no longer publish it: that leadership ended (the fence),
            # or lost the schedule to this one (the ownership check), both atomic.
            adopted = json.dumps(dict(data, term=term, election=self.lock.name))
            result = self._owned(self._adopt, term, keys=[self.store.pending_key],
                                 args=[tick, raw, adopted])
            if result is FENCED:
                return False
            if result == 1:
                self.stats.republished_tick(tick)
                log.warning("celery-leader: sending %s claimed by %s term %d but maybe not "
                            "sent", tick, data.get("election", "an earlier leader"), old_term)
                self._publish(tick, adopted, term)
        return True
