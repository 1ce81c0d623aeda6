"""A tick is done when its task starts, not when it is pushed.

Problem.  The fenced publish (publish.py) proves that each fire time reached
the broker list exactly once.  It does not prove it ran: a worker that pops it
with kombu's ``BRPOP`` and dies, freezes or is cut off before kombu records it
in its ``unacked`` hash (celery/kombu#305) swallows it.  And whatever copies of
a tick exist (a copy pushed again by the sweep below, one a previous leader
published but did not record as sent, kombu's redelivery of an unacknowledged
message), its body must run once.

Mechanism.  A tracked tick is a *token*: its record in ``schedule:sent``.
- The leader's claim writes the record in the same script as the claim itself
  (HERD_DISPATCH: with the push, or with the pending copy when the broker is
  not the lease's Redis), indexed by when to look at it next in
  ``schedule:sent-at``.  The record is a small JSON head (the pushes' lists
  and byte lengths, delivery tags, kombu's ``unacked`` key, copies pushed,
  when it was written), a newline, then the pushed messages verbatim.
- A worker with ``install(app)`` may run the tick's body only by consuming the
  record (START_TICK_LUA: ``HDEL``), so exactly one copy starts; every other
  copy, now or later, finds no record and is skipped.  The consuming attempt
  is remembered for ATTEMPT_TTL_MS (in ``schedule:started``) so that the same
  attempt asking again after a lost reply is told to run.  A tick Celery
  revokes before its body (its ``expires`` passed) consumes its record the same
  way: it will not run.
- The leader, every retry period, looks at records due in ``sent-at``
  (REPUSH_LOST_TICKS_LUA, fenced): a tick that is neither waiting in its list
  nor held in kombu's ``unacked`` hash was swallowed, and is pushed again; the
  look-again delay doubles each time.  A list longer than LIST_SCAN is not
  searched (the tick is undecided, looked at again later).  A record of
  another broker (no pushes: the sweep cannot see that broker) is only looked
  at for its age.  A record whose tick was pushed MAX_COPIES times, or older
  than MAX_UNSTARTED_MS, is dropped with an error naming it.

Bounded state.  ``schedule:sent`` and ``schedule:sent-at`` hold one record per
tick sent and not started: the work in flight, plus ticks that will never
start (consumed by a worker without ``install(app)``, a task no worker knows)
until MAX_COPIES pushes (~10 minutes with the Redis broker) or MAX_UNSTARTED_MS
(another broker) drop them.  ``schedule:started`` holds the attempts of the
ticks started in the last ATTEMPT_TTL_MS (the schedule's rate times a minute),
each forgotten by the next start after that.  Nothing here grows with the
number of ticks that ran.

Safety argument.  One record is written per claimed fire time, by the one
script that claims it (claims only move forward), and removing it is the only
way into the body; Redis runs one script at a time, so two copies can never
both remove it.  A copy reaching a worker after its tick started, however
late (a backlog, a redelivery after ``visibility_timeout``), finds no record.
A swallowed tick keeps its record, so it is pushed again while a leader lives.
What can be lost is only a tick whose record was dropped (above, with an
error) and then arrives, or one whose record a Redis fail-over lost.  Ticks
run by workers without ``install(app)`` never consume their record: turn
``leader_tick_run_once`` off for them (they then keep the dispatch guarantee
only: each fire time pushed once).
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery.exceptions import Ignore
from celery.signals import task_revoked

from ..election.redact import secret_safe_logger
from ..election.redislock import FENCED, RedisLock, as_text, script_then_wait

# Logger names are part of the interface (users configure them): the old module's.
log = secret_safe_logger("celery_leader.tickstart")

TICK_HEADER = "leader_tick"
"""Message header naming a tick; a task sees it as ``request.leader_tick``."""
TICK_KEYS_HEADER = "leader_tick_keys"
"""Message header: [started attempts, sent hash, sent-at sorted set] of the tick."""
ATTEMPT_TTL_MS = 60_000
"""How long the attempt that started a tick is remembered: longer than
TickStartClaim asks again (CLAIM_GIVE_UP_S) and than one request can take."""
CLAIM_GIVE_UP_S = 10.0
"""How long a worker asks again to start a tick while Redis does not answer."""
REPUSH_BATCH = 100
"""Ticks looked at per script call: one call never blocks Redis for long."""
REPUSH_CALLS = 20
"""Script calls per sweep at most: a sweep keeps up with 2,000 due records."""
LIST_SCAN = 1000
"""Longest list searched for a tick (a search costs ~50 µs per 1,000 messages);
ticks of a longer list wait until it is shorter."""
MAX_COPIES = 5
"""Pushes of a tick that never starts before its record is dropped (with the
default look-again delay, ~10 minutes after its send): a tick consumed by a
worker without ``install(app)``, or one Celery drops, is not pushed forever."""
MAX_UNSTARTED_MS = 7 * 24 * 3600 * 1000
"""Age at which the record of a tick that never started is dropped: a tick of
another broker, which the sweep cannot see, waits at most this long."""

# Not fenced (any worker may run a tick): the only way into a tick's body.
# Consumes the tick's sent record (KEYS[2] field ARGV[1], and its KEYS[3]
# entry) and remembers the attempt ARGV[2] in the sorted set KEYS[1] (scored by
# when), in one step; attempts older than ARGV[3] ms are forgotten first.
# Returns 1 to run (also for the same attempt asking again), 0 for a copy (the
# record is gone: another copy started, or the tick was dropped).
START_TICK_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
local attempt = ARGV[1] .. ' ' .. ARGV[2]
if redis.call('ZSCORE', KEYS[1], attempt) then return 1 end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[1], now, attempt)
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

# Fenced: for up to ARGV[4] records of the sent-at set KEYS[3] due by now,
# pushes again the ticks neither held in kombu's unacked hash nor waiting in
# their list (a list longer than ARGV[5] is not searched: undecided; a record
# without pushes, of another broker, is undecided too); drops an unreadable
# record, and one pushed ARGV[6] times or older than ARGV[7] ms that is not
# waiting in its list.  Each is looked at again after ARGV[3] ms doubled per
# push.  Returns {records looked at, {ticks pushed again}, {ticks dropped}}.
REPUSH_LOST_TICKS_LUA = READ_SENT_LUA + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local pushed, dropped = {}, {}
for _, tick in ipairs(due) do
  local record, pushes, messages = read_sent(redis.call('HGET', KEYS[2], tick) or '')
  local drop = not record
  if record then
    local held, waiting = #pushes == 0, false
    for i, push in ipairs(pushes) do
      if record.unacked ~= '' and record.tags[i] ~= ''
          and redis.call('HEXISTS', record.unacked, record.tags[i]) == 1 then
        held = true
      elseif redis.call('LLEN', push[1]) > tonumber(ARGV[5]) then
        held = true  -- undecided: not searched, no copy into a long backlog
      elseif redis.call('LPOS', push[1], push[2], 'RANK', -1) then
        held, waiting = true, true
      end
    end
    local copies = tonumber(record.copies) or 0
    local old = tonumber(record.at) and now - tonumber(record.at) > tonumber(ARGV[7])
    -- INVARIANT: a tick waiting in its list keeps its record, however old.
    if not waiting and (old or (not held and copies >= tonumber(ARGV[6]))) then
      drop = true
      dropped[#dropped + 1] = tick
    elseif not held then
      for _, push in ipairs(pushes) do redis.call('LPUSH', push[1], push[2]) end
      copies = copies + 1
      record.copies = copies
      -- The messages stay as they were: only the head is written anew.
      redis.call('HSET', KEYS[2], tick, cjson.encode(record) .. (messages or ''))
      pushed[#pushed + 1] = tick
    end
    if not drop then
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]) * 2 ^ math.min(copies, 16), tick)
    end
  end
  if drop then
    redis.call('HDEL', KEYS[2], tick)
    redis.call('ZREM', KEYS[3], tick)
  end
end
return {#due, pushed, dropped}
"""


class TickKeys:
    """Where one schedule keeps its sent ticks and the attempts that started ticks."""

    def __init__(self, sent: str, sent_at: str, started: str) -> None:
        self.sent = sent
        self.sent_at = sent_at
        self.started = started

    def headers(self, tick: str) -> dict[str, Any]:
        return {TICK_HEADER: tick, TICK_KEYS_HEADER: [self.started, self.sent, self.sent_at]}

    def sent_record(self, pushes: list[tuple[str, str]], unacked: str) -> str:
        """The record PUBLISH_TICK_LUA stores beside the push (format: READ_SENT_LUA)."""
        tags = []
        for _, payload in pushes:
            try:
                tags.append(str(json.loads(payload)["properties"]["delivery_tag"]))
            except (ValueError, KeyError, TypeError):
                tags.append("")
        return sent_record(pushes, tags, unacked, at_ms=int(time.time() * 1000))


def sent_record(pushes: list[tuple[str, str]], tags: list[str], unacked: str,
                at_ms: int, copies: int = 0) -> str:
    """A tick's sent record: the JSON head (ASCII only, so no raw newline), a
    newline, then the messages verbatim; the head gives each one's byte length."""
    head = json.dumps({"pushes": [[key, len(payload.encode("utf-8"))] for key, payload in pushes],
                       "tags": tags, "unacked": unacked, "copies": copies, "at": at_ms})
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
        """Push swallowed ticks again, drop the records of ticks that will not
        start; False when this term is over."""
        pushed: list[str] = []
        dropped: list[str] = []
        for _ in range(REPUSH_CALLS):
            result = self._repush(term, keys=[self._keys.sent, self._keys.sent_at],
                                  args=[self._look_after_ms, REPUSH_BATCH, LIST_SCAN,
                                        MAX_COPIES, MAX_UNSTARTED_MS])
            if result is FENCED:
                return False
            looked_at, again, gone = result
            pushed += (as_text(tick) for tick in again)
            dropped += (as_text(tick) for tick in gone)
            if int(looked_at) < REPUSH_BATCH:
                break
        # One line each per sweep: a herd swallowed by one worker is thousands.
        if pushed:
            log.warning("celery-leader: %d ticks were sent but never started (a worker "
                        "that took them died?); sent them again: %s", len(pushed),
                        _some(pushed))
        if dropped:
            log.error("celery-leader: %d ticks never started after %d pushes or %d days "
                      "(consumed by a worker without install(app)? an unknown task?); "
                      "forgetting them, a copy arriving later is skipped: %s", len(dropped),
                      MAX_COPIES, MAX_UNSTARTED_MS // 86_400_000, _some(dropped))
        return True


def _some(ticks: list[str]) -> str:
    return ", ".join(ticks[:10]) + (" ..." if len(ticks) > 10 else "")


class TickStartClaim:
    """Runs a tick's body only for the copy that claims its start first.

    With ``wait_replicas`` = n > 0 (the lock's ``leader_wait_replicas``) the
    claim is followed, on its own connection, by ``WAIT n`` before the body
    runs: a replica that acknowledged it holds the consumed token and, earlier
    in the stream, the leader's claim of the tick, so a fail-over to it neither
    sends the tick again nor lets a second copy start.  One WAIT round trip per
    tick.  Not acknowledged within ``wait_timeout``: the body runs anyway, with
    a warning naming the tick.  The token is consumed on the primary, so
    refusing would lose the tick whenever the primary survives (nobody sends it
    again); running doubles it only if the primary then dies before a replica
    catches up.
    """

    def __init__(self, client: Callable[[], Any], wait_replicas: int = 0,
                 wait_timeout: float = 0.5) -> None:
        self._client = client
        self._script: Any = None
        self._wait_replicas = wait_replicas
        self._wait_timeout = wait_timeout

    def claim(self, tick: str, keys: list[str], give_up_after: float = CLAIM_GIVE_UP_S) -> bool:
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
                # INVARIANT: asked again only within CLAIM_GIVE_UP_S < ATTEMPT_TTL_MS.
                started, acknowledged = script_then_wait(
                    client, self._script, keys, [tick, attempt, ATTEMPT_TTL_MS],
                    self._wait_replicas, self._wait_timeout)
                if started == 1 and not acknowledged:
                    log.warning("celery-leader: the start of tick %s was not acknowledged by "
                                "%d replica(s) within %.2fs; running it anyway (a Redis "
                                "fail-over before the replica catches up can run it twice)",
                                tick, self._wait_replicas, self._wait_timeout)
                return bool(started == 1)
            except Exception as exc:
                if time.monotonic() >= deadline:
                    log.error("celery-leader: could not claim the start of tick %s (%s); "
                              "not running it here, the leader sends it again", tick, exc)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.5)


def guard_tick_starts(tasks: Any, claim: TickStartClaim) -> None:
    """Wrap every task's body so a tick runs only in the copy that claims its start;
    a tick Celery revokes before its body (expired) consumes its record too."""
    for task in list(tasks.values()):
        if not getattr(task, "_leader_tick_guard", False) and hasattr(task, "run"):
            task.run = _claiming_run(task, task.run, claim)
            task._leader_tick_guard = True

    def revoked(request: Any = None, **_: Any) -> None:
        tick, keys = _tick_of(request)
        if tick is not None and claim.claim(tick, keys, give_up_after=1.0):
            log.info("celery-leader: tick %s was revoked before it started (expired?); "
                     "no copy of it will run", tick)

    task_revoked.connect(revoked, weak=False, dispatch_uid=f"celery-leader-ticks-{id(tasks)}")


def _tick_of(request: Any) -> tuple[str | None, list[str]]:
    """The tick a task request carries (its name and keys), or (None, [])."""
    tick = getattr(request, TICK_HEADER, None)
    keys = getattr(request, TICK_KEYS_HEADER, None)
    if tick and isinstance(keys, list) and len(keys) == 3:
        return str(tick), [str(key) for key in keys]
    return None, []


def _claiming_run(task: Any, original_run: Callable[..., Any],
                  claim: TickStartClaim) -> Callable[..., Any]:
    @functools.wraps(original_run)
    def run(*args: Any, **kwargs: Any) -> Any:
        tick, keys = _tick_of(task.request)
        if tick is not None and not claim.claim(tick, keys):
            log.info("celery-leader: tick %s already started; skipping this copy", tick)
            raise Ignore()
        return original_run(*args, **kwargs)

    return run
