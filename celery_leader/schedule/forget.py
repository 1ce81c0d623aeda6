"""Forgetting the progress of entries that left the schedule.

Problem.  The schedule keeps, per entry, its progress (``schedule:state``), the
time a leader first saw it (``schedule:first-seen``) and, for a source that
counts runs, its run record (e.g. ``schedule:django-runs``).  A runtime entry
takes its own with it when it is removed (store.REMOVE_RUNTIME_ENTRY_LUA), but
an entry removed from ``beat_schedule`` or a deleted django-celery-beat row left
them behind for ever: a cluster that makes and deletes per-customer rows every
day grew without bound.

Mechanism.  The leader, once per leadership and every FORGET_EVERY seconds
while it lasts, reads the names these hashes hold, keeps those its schedule
still has (``beat_schedule``, the source's entries, enabled or not), and hands
the rest to FORGET_REMOVED_LUA, fenced and owned, which forgets a name only if
it is not a runtime entry either (checked in the same step as the delete, so
an entry added meanwhile keeps its progress) and only if neither its last
claimed fire time nor its first-seen time is more recent than FORGET_AFTER_MS.

Bound.  Each hash holds the entries of the schedule, plus those removed within
FORGET_AFTER_MS (or whose last tick fell within it) and not yet swept (one
FORGET_EVERY later at most).

Safety argument.  The grace period keeps the progress of an entry that is only
missing from the leader's configuration for a while (a rolling deploy: the
next leader may still have it) and of anything that ticked recently; an entry
forgotten and then scheduled again starts like a new one, from when a leader
next sees it: its next fire time comes after that moment, later than every
tick it had claimed, so nothing is sent twice; what it loses is only the
catch-up of ticks missed while it was gone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..election.redact import secret_safe_logger
from ..election.redislock import FENCED, as_text

log = secret_safe_logger(__name__)

FORGET_AFTER_MS = 24 * 3600 * 1000
"""How long an entry missing from the leader's schedule keeps its progress
after its last tick (or after it was first seen, if it never ticked)."""
FORGET_EVERY = 3600.0
"""Seconds between sweeps while one leadership lasts."""
FORGET_CHUNK = 1000
"""Names per script call."""

# Runs after OWNED_LUA (fenced + owned).  KEYS[4] state, [5] first-seen, [6]
# runtime entries, [7] run records ('' field set: ARGV[6] = '0' when there are
# none); ARGV[5] FORGET_AFTER_MS, ARGV[7..] names the leader's schedule lacks.
# Guarantees a name is forgotten only if it is no runtime entry at this instant
# and neither its last claimed fire time nor its first-seen time is more recent
# than ARGV[5] ms ago; returns the names forgotten.
FORGET_REMOVED_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local cutoff = now - tonumber(ARGV[5])
local forgotten = {}
for i = 7, #ARGV do
  local name = ARGV[i]
  if redis.call('HEXISTS', KEYS[6], name) == 0 then
    local newest = tonumber(redis.call('HGET', KEYS[5], name) or '0') or 0
    local raw = redis.call('HGET', KEYS[4], name)
    if raw then
      local ok, state = pcall(cjson.decode, raw)
      local last = ok and type(state) == 'table' and tonumber(state.last) or 0
      if last > newest then newest = last end
    end
    if newest <= cutoff then
      redis.call('HDEL', KEYS[4], name)
      redis.call('HDEL', KEYS[5], name)
      if ARGV[6] == '1' then redis.call('HDEL', KEYS[7], name) end
      forgotten[#forgotten + 1] = name
    end
  end
end
return forgotten
"""

Owned = Callable[[Any, int, list[str], list[Any]], Any]


class RemovedEntries:
    """The leader's sweep of progress left by entries its schedule no longer has."""

    def __init__(self, client: Any, script: Any, owned: Owned, keys: tuple[str, str, str]) -> None:
        """``script``: the fenced OWNED_LUA + FORGET_REMOVED_LUA; ``owned`` runs it
        (the runner's, adding the ownership keys); ``keys``: state, first-seen,
        runtime entries."""
        self._client = client
        self._script = script
        self._owned = owned
        self._keys = keys

    def forget(self, term: int, scheduled: Callable[[str], bool],
               runs_key: str | None) -> bool:
        """Forget what entries missing from the schedule (``scheduled`` False) left;
        False when this term is over."""
        state_key, first_seen_key, _ = self._keys
        # HSCAN, not HKEYS: the documented ACL rule has it (runtime entries), and
        # it never blocks Redis for a whole hash.
        names = {as_text(name) for key in (state_key, first_seen_key, runs_key) if key
                 for name, _ in self._client.hscan_iter(key, count=1000)}
        gone = sorted(name for name in names if not scheduled(name))
        forgotten: list[str] = []
        for start in range(0, len(gone), FORGET_CHUNK):
            result = self._owned(
                self._script, term, [*self._keys, runs_key or state_key],
                [FORGET_AFTER_MS, "1" if runs_key else "0", *gone[start:start + FORGET_CHUNK]])
            if result is FENCED:
                return False
            forgotten += (as_text(name) for name in result)
        if forgotten:
            log.info("celery-leader: forgot the progress of %d entries not scheduled and "
                     "idle for over %d hours: %s", len(forgotten), FORGET_AFTER_MS // 3_600_000,
                     _some(forgotten))
        return True


def _some(names: Iterable[str]) -> str:
    listed = list(names)
    return ", ".join(repr(name) for name in listed[:10]) + (" ..." if len(listed) > 10 else "")
