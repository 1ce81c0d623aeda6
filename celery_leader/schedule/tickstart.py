"""A tick is done when its task starts, not when it is pushed.

Problem.  The fenced publish (publish.py) proves that each fire time reached
the broker list exactly once.  It does not prove it ran: a worker that pops it
with kombu's ``BRPOP`` and dies, freezes or is cut off before kombu records it
in its ``unacked`` hash (celery/kombu#305) swallows it.

Mechanism.
- The scheduler's publish script records the tick in ``schedule:sent`` (its
  pushes, their delivery tags, kombu's ``unacked`` key) and in
  ``schedule:sent-at`` (when to look at it next), in the same step as the push.
  The record is a small JSON head, a newline, then the pushed messages verbatim
  (the head gives each one's list and byte length): a herd's script stores a
  ~1 KB message by concatenation instead of JSON-encoding it again.  Records of
  the older form (one JSON document with the messages inside) are still read.
- A worker with ``install(app)`` claims the tick when its task is about to
  run (START_TICK_LUA: a start marker set once per tick, the sent record
  ended in the same step); any other copy of the tick finds the marker and is
  skipped, so the body runs once.
- The leader, every retry period, looks at ticks sent a while ago and not
  started (REPUSH_LOST_TICKS_LUA, fenced): one that is neither waiting in its
  list nor held in kombu's ``unacked`` hash was swallowed, and is pushed
  again.  The look-again delay doubles each time a copy is pushed.  A list
  longer than LIST_SCAN is not searched (a herd of thousands of ticks would
  make every sweep scan it) and gets no copies (they would only lengthen the
  backlog): its ticks are looked at again, at the same delay, until the
  backlog is short enough to tell.

Safety argument.  Copies never double a run: only the copy that sets the start
marker runs.  A tick leaves ``schedule:sent`` only when it started (or its
record is unreadable), so a swallowed tick is pushed again while a leader
lives.  Ticks run by workers without ``install(app)`` never claim a start:
turn ``leader_tick_run_once`` off for them (they then keep the dispatch
guarantee only: each fire time pushed once).
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery.exceptions import Ignore

from ..election.redact import secret_safe_logger
from ..election.redislock import FENCED, RedisLock, as_text

# Logger names are part of the interface (users configure them): the old module's.
log = secret_safe_logger("celery_leader.tickstart")

TICK_HEADER = "leader_tick"
"""Message header naming a tick; a task sees it as ``request.leader_tick``."""
TICK_KEYS_HEADER = "leader_tick_keys"
"""Message header: [start marker, sent hash, sent-at sorted set] of the tick."""
STARTED_TTL_MS = 7 * 24 * 3600 * 1000
"""How long a start marker outlives the tick: longer than any copy can wait."""
REPUSH_BATCH = 100
"""Ticks looked at per sweep: one sweep never blocks Redis for long."""
LIST_SCAN = 1000
"""Longest list searched for a tick (a search costs ~50 µs per 1,000 messages);
ticks of a longer list wait until it is shorter."""

# Not fenced (any worker may run a tick): sets the start marker KEYS[1] to the
# attempt ARGV[2] once, and ends the sent record ARGV[1] in the same step.
# Returns 1 to run (also for the same attempt asking again), 0 for a copy.
START_TICK_LUA = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

# Reads a sent record: its head (a table) and its pushes {{list, message}, ...};
# nil for a record that is unreadable.  The record is the head's JSON, a
# newline and the messages back to back (head.pushes = {{list, byte length}});
# one without a newline is the older form, all JSON (pushes = {{list, message}}).
READ_SENT_LUA = """
local function read_sent(raw)
  local cut = string.find(raw, '\\n', 1, true)
  local ok, head = pcall(cjson.decode, cut and string.sub(raw, 1, cut - 1) or raw)
  if not ok or type(head) ~= 'table' or type(head.pushes) ~= 'table' then return nil end
  if not cut then return head, head.pushes, nil end
  local pushes, at = {}, cut + 1
  for i, push in ipairs(head.pushes) do
    local length = type(push) == 'table' and tonumber(push[2])
    if not length or at + length - 1 > #raw then return nil end
    pushes[i] = {push[1], string.sub(raw, at, at + length - 1)}
    at = at + length
  end
  return head, pushes, string.sub(raw, cut)
end
"""

# Fenced: for up to ARGV[4] ticks of the sent-at set KEYS[3] due by now, drops
# the started ones and pushes again those neither held in kombu's unacked hash
# nor waiting in their list; a list longer than ARGV[5] is not searched and its
# ticks are not pushed (undecided).  Each tick is looked at again after ARGV[3]
# ms doubled per push.  Returns the ticks pushed again.
REPUSH_LOST_TICKS_LUA = READ_SENT_LUA + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local pushed = {}
for _, tick in ipairs(due) do
  local record, pushes, messages = read_sent(redis.call('HGET', KEYS[2], tick) or '')
  if not record or redis.call('EXISTS', record.started) == 1 then
    redis.call('HDEL', KEYS[2], tick)
    redis.call('ZREM', KEYS[3], tick)
  else
    local held = false
    for i, push in ipairs(pushes) do
      if record.unacked ~= '' and record.tags[i] ~= ''
          and redis.call('HEXISTS', record.unacked, record.tags[i]) == 1 then
        held = true
      elseif redis.call('LLEN', push[1]) > tonumber(ARGV[5]) then
        held = true  -- undecided: not searched, no copy into a long backlog
      elseif redis.call('LPOS', push[1], push[2], 'RANK', -1) then
        held = true
      end
    end
    local copies = tonumber(record.copies) or 0
    if not held then
      for _, push in ipairs(pushes) do redis.call('LPUSH', push[1], push[2]) end
      copies = copies + 1
      record.copies = copies
      -- The messages stay as they were: only the head is written anew.
      redis.call('HSET', KEYS[2], tick, cjson.encode(record) .. (messages or ''))
      pushed[#pushed + 1] = tick
    end
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]) * 2 ^ copies, tick)
  end
end
return pushed
"""


class TickKeys:
    """Where one schedule keeps its sent ticks and their start markers."""

    def __init__(self, sent: str, sent_at: str, started_prefix: str) -> None:
        self.sent = sent
        self.sent_at = sent_at
        self._started_prefix = started_prefix

    def started(self, tick: str) -> str:
        return self._started_prefix + tick

    def headers(self, tick: str) -> dict[str, Any]:
        return {TICK_HEADER: tick, TICK_KEYS_HEADER: [self.started(tick), self.sent,
                                                      self.sent_at]}

    def sent_record(self, tick: str, pushes: list[tuple[str, str]], unacked: str) -> str:
        """The record PUBLISH_TICK_LUA stores beside the push (format: READ_SENT_LUA)."""
        tags = []
        for _, payload in pushes:
            try:
                tags.append(str(json.loads(payload)["properties"]["delivery_tag"]))
            except (ValueError, KeyError, TypeError):
                tags.append("")
        return sent_record(pushes, tags, unacked, self.started(tick))


def sent_record(pushes: list[tuple[str, str]], tags: list[str], unacked: str,
                started: str, copies: int = 0) -> str:
    """A tick's sent record: the JSON head (ASCII only, so no raw newline), a
    newline, then the messages verbatim; the head gives each one's byte length."""
    head = json.dumps({"pushes": [[key, len(payload.encode("utf-8"))] for key, payload in pushes],
                       "tags": tags, "unacked": unacked, "started": started, "copies": copies})
    return head + "\n" + "".join(payload for _, payload in pushes)


def read_sent_record(raw: bytes | str) -> dict[str, Any]:
    """A sent record as one dict, its pushes as ``[[list, message], ...]`` (both
    forms READ_SENT_LUA reads); ValueError for one it cannot read."""
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    cut = data.find(b"\n")
    head = json.loads(data if cut < 0 else data[:cut])
    if not isinstance(head, dict) or not isinstance(head.get("pushes"), list):
        raise ValueError(f"not a sent record: {data[:80]!r}")
    if cut < 0:
        return head
    at, pushes = cut + 1, []
    for key, length in head["pushes"]:
        if at + int(length) > len(data):
            raise ValueError(f"a sent record shorter than its head says: {data[:80]!r}")
        pushes.append([key, data[at:at + int(length)].decode("utf-8")])
        at += int(length)
    return {**head, "pushes": pushes}


class LostTicks:
    """The leader's sweep for ticks that were sent and never started."""

    def __init__(self, lock: RedisLock, keys: TickKeys, look_after: float) -> None:
        self._keys = keys
        self._look_after_ms = max(1, round(look_after * 1000))
        self._repush = lock.fenced_script(REPUSH_LOST_TICKS_LUA)

    def repush(self, term: int) -> bool:
        """Push swallowed ticks again; False when this term is over."""
        result = self._repush(term, keys=[self._keys.sent, self._keys.sent_at],
                              args=[self._look_after_ms, REPUSH_BATCH, LIST_SCAN])
        if result is FENCED:
            return False
        ticks = [as_text(tick) for tick in result]
        if ticks:  # one line per sweep: a herd swallowed by one worker is thousands
            log.warning("celery-leader: %d ticks were sent but never started (a worker "
                        "that took them died?); sent them again: %s%s", len(ticks),
                        ", ".join(ticks[:10]), " ..." if len(ticks) > 10 else "")
        return True


class TickStartClaim:
    """Runs a tick's body only for the copy that claims its start first."""

    def __init__(self, client: Callable[[], Any]) -> None:
        self._client = client
        self._script: Any = None

    def claim(self, tick: str, keys: list[str], give_up_after: float = 10.0) -> bool:
        """True: run it.  False: another copy started (or Redis stayed unreachable:
        the leader pushes the tick again, since it did not start)."""
        client = self._client()
        if self._script is None:
            self._script = client.register_script(START_TICK_LUA)
        attempt = uuid.uuid4().hex
        deadline = time.monotonic() + give_up_after
        delay = 0.05
        while True:
            try:
                # Asked again with the same attempt if a reply is lost: never a false "copy".
                return bool(self._script(keys=keys, args=[tick, attempt, STARTED_TTL_MS]) == 1)
            except Exception as exc:
                if time.monotonic() >= deadline:
                    log.error("celery-leader: could not claim the start of tick %s (%s); "
                              "not running it here, the leader sends it again", tick, exc)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.5)


def guard_tick_starts(tasks: Any, claim: TickStartClaim) -> None:
    """Wrap every task's body so a tick runs only in the copy that claims its start."""
    for task in list(tasks.values()):
        if not getattr(task, "_leader_tick_guard", False) and hasattr(task, "run"):
            task.run = _claiming_run(task, task.run, claim)
            task._leader_tick_guard = True


def _claiming_run(task: Any, original_run: Callable[..., Any],
                  claim: TickStartClaim) -> Callable[..., Any]:
    @functools.wraps(original_run)
    def run(*args: Any, **kwargs: Any) -> Any:
        request = task.request
        tick = getattr(request, TICK_HEADER, None)
        keys = getattr(request, TICK_KEYS_HEADER, None)
        if tick and isinstance(keys, list) and len(keys) == 3 \
                and not claim.claim(str(tick), [str(key) for key in keys]):
            log.info("celery-leader: tick %s already started; skipping this copy", tick)
            raise Ignore()
        return original_run(*args, **kwargs)

    return run
