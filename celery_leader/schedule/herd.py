"""Dispatching a herd: many ticks due at the same instant, in fenced batches.

Problem.  Cron schedules herd (``0 * * * *`` for thousands of per-customer
reports).  One claim script, one publish script and one ``send_task`` per tick
cost milliseconds each, so 10,000 ticks due at one instant took seconds.

Mechanism.  The runner hands every tick due now to :meth:`HerdDispatcher.dispatch`
as ``(entry, fire time, publish?)`` claims.  They go to Redis in batches of at
most :data:`HERD_BATCH`, each one call of HERD_DISPATCH_LUA, which checks the
term and the schedule's owner once and then, for every tick of the batch,
claims the fire time (only forward), and either pushes the tick's message to
its broker list (broker on the lease's Redis) or records its pending copy
(any other broker, or an entry whose message has no template), records a
pushed tick for tick-start tracking (tickstart.py), and counts the run of a
sent tick whose entry source keeps a count (source.RecordsRuns: run records,
only for those ticks, so a leader dying after the call loses no count).  Messages come from
per-entry templates (template.py), byte for byte what ``send_task`` sends;
while anything listens to ``before_task_publish``/``after_task_publish`` or
``task_send_sent_event`` is on, every tick goes through ``send_task`` instead.

Pipelining.  With the broker on the lease's Redis, batch k+1 is packed and
sent before batch k's reply is read (``_dispatch_pipelined``, on one
connection held for the herd), so Python prepares the next batch while Redis
runs the last one.  Each batch's sent record stores the message verbatim after
a small JSON head (tickstart.py), two arguments per tick.

Safety argument.  The script is atomic and decides every tick before it
writes anything, so a batch is applied whole or not at all: a deposed leader's
batch is refused whole (FENCED), and the successor, reading the claims the
script did not write, sends exactly those ticks.  With another broker the
claims still travel in batches (each with its pending copy); the claimed
messages are then pushed in one pipeline per batch and their pending copies
cleared in one call, and whatever a leader claimed but did not push is sent
by the next leader (``_recover_pending``), as before.

Why pipelined batches are safe: applied batches always form a prefix.
Fencing alone would give most of it (terms only grow, so once batch k is
FENCED every later batch is too), but not all: batch k can also fail in
Redis (NOPERM, a list of the wrong type, a script error) or be refused
because another election's live leader owns the schedule, which may change
by batch k+1.  So the batches are chained: batch k+1 runs only if the chain
key holds the token that batch k writes as its very last step (a random
token per herd, kept 60 s); a batch that is refused or fails for any reason
does not write it (Redis runs one script at a time and the commands of one
connection in order; a script that errors stops before its last line), so
every batch after it answers 'C' and writes nothing.  At the first reply that
is not a plain success, the dispatcher reads the reply in flight and runs
that batch and the rest the ordinary way, one call at a time, unchained:
that call says what happened (FENCED: stop; not the owner: ScheduleTakenOver;
NOPERM: pending copies), exactly as without pipelining.  A lost connection
leaves unknown whether the batch in flight ran; the ordinary way runs it
again and finds its claims made (claims only move forward): nothing is sent
twice.  Tests: tests/test_herd.py (a failing middle batch applies no later
batch; a leader deposed with a batch in flight applies a prefix only).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from celery.signals import after_task_publish, before_task_publish

from ..election.redact import secret_safe_logger
from ..election.redislock import FENCED, FencedScript, acl_denied, as_text
from .entries import Entry
from .source import EntrySource, RecordsRuns
from .store import from_ms
from .template import MessageTemplate, NoTemplate, Rendered, build_template

log = secret_safe_logger("celery_leader.scheduler")

HERD_BATCH = 500
"""Ticks per HERD_DISPATCH_LUA call: one call stays a few milliseconds of Redis
time (see docs/benchmarks.md, "Herds", for the longest measured)."""

# Runs after OWNED_LUA (fenced + owned).  KEYS[4] state, [5] pending, [6]
# runtime entries, [7] sent, [8] sent-at, [9] the batch chain, [10..] broker
# lists and run records' hashes; ARGV[5] look-again delay ms, [6] kombu's
# unacked key, [7] '' when ticks are not tracked (tickstart.py), [8] term, [9]
# election (JSON), [10] the chain token this batch requires in KEYS[9] ('' =
# none), [11] the token it leaves there once applied ('' = none), [12] R, the
# number of run records,
# then HERD_ARGS_PER_RUN per run record (its tick's number in the batch, from 1;
# the KEYS index of its hash; identity; base: source.py's RunRecord), then
# HERD_ARGS_PER_TICK per tick: its head "<flags> <fire ms> <task id> <delivery
# tag or ''> <entry>" (flags: runtime '1'/'0', mode 'q' push / 'p' pending copy
# / 'c' claim only, then the list's KEYS index) and its message (the push, or
# the pending copy).  Claims every tick whose fire time is later than its
# entry's recorded one (a removed runtime entry: none), writes each claimed
# tracked tick's start token (tickstart.py: with the message it pushes, or
# without pushes beside a pending copy), and counts the run of
# each claimed tick with a run record, in the same step (an entry source's
# count: a claim without its count, or a count without its claim, cannot be);
# decided for the whole batch before anything is written (the run records'
# hashes read first), so the batch applies whole or not at all; a batch whose
# required token is missing (the batch before it was not applied) writes
# nothing.  Returns one code per tick, as one string: '1' claimed, '0' already
# claimed, '2' entry removed; or 'C' for a broken chain.
HERD_DISPATCH_LUA = r"""
if ARGV[10] ~= '' and redis.call('GET', KEYS[9]) ~= ARGV[10] then return 'C' end
local function call_many(command, key, values)
  -- One command per 1000 values: unpack stays far below Lua's C stack limit.
  for from = 1, #values, 1000 do
    redis.call(command, key, unpack(values, from, math.min(from + 999, #values)))
  end
end
local first = 13 + 4 * tonumber(ARGV[12])  -- the first tick's head
local flags, fires, ids, tags, entries, codes = {}, {}, {}, {}, {}, {}
local n = 0
for i = first, #ARGV, 2 do
  n = n + 1
  local flag, fire, id, tag, entry = string.match(ARGV[i], '^(%S+) (%d+) (%S+) (%S*) (.*)$')
  flags[n], fires[n], ids[n], tags[n], entries[n] = flag, fire, id, tag, entry
  local code = '1'
  if string.byte(flag, 1) == 49 and redis.call('HEXISTS', KEYS[6], entry) == 0 then
    code = '2'
  else
    local current = redis.call('HGET', KEYS[4], entry)
    if current then
      local ok, state = pcall(cjson.decode, current)
      if ok and type(state) == 'table' and tonumber(state.last)
         and tonumber(state.last) >= tonumber(fire) then
        code = '0'
      end
    end
  end
  codes[n] = code
end
-- Run records: each claimed tick's run counted (RunRecord in source.py), read
-- now, so a hash of the wrong type fails here, before anything is written.
local runs, run_keys, run_order = {}, {}, {}
for r = 13, first - 1, 4 do
  local j = tonumber(ARGV[r])
  if codes[j] == '1' then
    local k, entry = tonumber(ARGV[r + 1]), entries[j]
    if not runs[k] then runs[k] = {}; run_order[k] = {}; run_keys[#run_keys + 1] = k end
    local record = runs[k][entry]
    if not record then
      local raw = redis.call('HGET', KEYS[k], entry)
      if raw then
        local ok, value = pcall(cjson.decode, raw)
        if ok and type(value) == 'table' and tostring(value.pk) == ARGV[r + 2] then
          record = value
        end
      end
      -- INVARIANT: a record of another identity (a row made again) starts afresh.
      if not record then record = {pk = ARGV[r + 2], base = ARGV[r + 3], count = 0, last = '0'} end
      runs[k][entry] = record
      run_order[k][#run_order[k] + 1] = entry
    end
    record.count = tonumber(record.count) + 1
    if tonumber(fires[j]) > tonumber(record.last) then record.last = fires[j] end
  end
end
-- One LPUSH per list (in order).
local pushes, lists = {}, {}
for j = 1, n do
  if codes[j] == '1' and string.sub(flags[j], 2, 2) == 'q' then
    local k = tonumber(string.sub(flags[j], 3))
    if not pushes[k] then pushes[k] = {}; lists[#lists + 1] = k end
    local list = pushes[k]
    list[#list + 1] = ARGV[first - 1 + 2 * j]
  end
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local look_at = now + tonumber(ARGV[5])
local unacked, tracked = cjson.encode(ARGV[6]), ARGV[7] ~= ''
local no_pushes = '{"pushes": [], "tags": [], "unacked": "", "copies": 0, "at": ' .. now .. '}\n'
local term_election = ', "term": ' .. ARGV[8] .. ', "election": ' .. ARGV[9] .. ', "task_id": "'
local states, pending, sent, sent_at, list_json = {}, {}, {}, {}, {}
for j = 1, n do
  if codes[j] == '1' then
    local entry, fire, mode = entries[j], fires[j], string.sub(flags[j], 2, 2)
    states[#states + 1] = entry
    states[#states + 1] = '{"last": ' .. fire .. term_election .. ids[j]
      .. '", "skipped": ' .. (mode == 'c' and 'true' or 'false') .. '}'
    local tick, record = entry .. '@' .. fire, nil
    if mode == 'p' then
      pending[#pending + 1] = tick
      pending[#pending + 1] = ARGV[first - 1 + 2 * j]
    end
    -- INVARIANT: a tracked tick's start token is written by the call that claims it.
    if mode == 'q' and tracked then
      -- The sent record (tickstart.py, READ_SENT_LUA): a JSON head, a newline,
      -- the message verbatim (not JSON-encoded a second time).
      local k = tonumber(string.sub(flags[j], 3))
      if not list_json[k] then list_json[k] = cjson.encode(KEYS[k]) end
      local message = ARGV[first - 1 + 2 * j]
      record = '{"pushes": [[' .. list_json[k] .. ', ' .. #message
        .. ']], "tags": ["' .. tags[j] .. '"], "unacked": ' .. unacked
        .. ', "copies": 0, "at": ' .. now .. '}\n' .. message
    elseif mode == 'p' and tracked then
      record = no_pushes  -- published after the call (another broker)
    end
    if record then
      sent[#sent + 1] = tick
      sent[#sent + 1] = record
      sent_at[#sent_at + 1] = look_at
      sent_at[#sent_at + 1] = tick
    end
  end
end
-- The writes a user may be refused come first, so a refusal (NOPERM) stops
-- the call before any claim is written: the sent-at index (a member without
-- its record is dropped by the sweep), then the pushes.
if #sent_at > 0 then call_many('ZADD', KEYS[8], sent_at) end
for _, k in ipairs(lists) do call_many('LPUSH', KEYS[k], pushes[k]) end
if #states > 0 then call_many('HSET', KEYS[4], states) end
if #pending > 0 then call_many('HSET', KEYS[5], pending) end
if #sent > 0 then call_many('HSET', KEYS[7], sent) end
for _, k in ipairs(run_keys) do
  local values = {}
  for _, entry in ipairs(run_order[k]) do
    values[#values + 1] = entry
    values[#values + 1] = cjson.encode(runs[k][entry])
  end
  call_many('HSET', KEYS[k], values)
end
if ARGV[11] ~= '' then redis.call('SET', KEYS[9], ARGV[11], 'PX', 60000) end
return table.concat(codes)
"""
HERD_ARGS_PER_TICK = 2
HERD_ARGS_PER_RUN = 4  # only for the ticks of entries whose source counts runs
HERD_BATCH_ARGS = 8  # after the election and owner record (OWNED_LUA's)
HERD_CLAIMED, HERD_ALREADY_CLAIMED, HERD_ENTRY_REMOVED = "1", "0", "2"
HERD_CHAIN_BROKEN = "C"
FIRE_TIMES_KEPT = 256
"""Fire times whose header text is kept for reuse (a herd shares a few): a
steady schedule makes a new one every tick, so the cache is emptied past this
(it held 4,096, ~1 MB of the leader's RSS that a soak saw growing for an hour)."""
MAX_HERD_BATCH = 1000
"""call_many's slices hold pairs: keep a batch's commands within a few of them."""

_PUSH, _PENDING, _CLAIM_ONLY = "q", "p", "c"
_NO_TEMPLATE = object()


@dataclass(frozen=True, slots=True)
class Claim:
    """One fire time of one entry to claim, and whether to publish it."""

    entry: Entry
    fire_ms: int
    publish: bool


@dataclass
class HerdKeys:
    state: str
    pending: str
    entries: str
    sent: str
    sent_at: str
    tracked: bool  # each claimed tick gets a start token (tickstart.py)
    chain: str = ""  # the pipelined batches' chain token; '' = beside ``state``

    def __post_init__(self) -> None:
        if not self.chain:
            self.chain = self.state.rpartition(":")[0] + ":herd-chain"


@dataclass
class _Prepared:
    """One batch, ready for HERD_DISPATCH_LUA (lists are per tick, in order)."""

    keys: list[str]
    args: list[Any]
    ticks: list[str]
    modes: list[str]
    messages: list[str]  # the pending copy ('p') or the pushed payload ('q')
    # Pending copies only: the message from the entry's template, and its template.
    rendered: dict[int, tuple[Rendered, MessageTemplate]]
    atomic: bool  # prepared for pushes from the script (the broker on the lease's Redis)


class HerdDispatcher:
    """Claims and publishes ticks in batches for one ScheduleRunner.

    ``owned(script, term, keys, args)`` runs a schedule script (fenced and
    owned; raises ScheduleTakenOver), ``publish_one(tick, message, term)`` is
    the per-tick publish (``send_task``) for ticks without a template, and
    ``send(producer, entry, task_id, headers)`` sends an entry's message as a
    tick's publish would (used once per entry to build its template).
    ``source()`` is the runner's entry source (or None): a sent tick of one of
    its entries is counted in the call that claims it when it records runs.
    """

    def __init__(self, app: Any, lease_client: Any, script: FencedScript, keys: HerdKeys,
                 schedule_name: str, election: str, look_after_ms: int,
                 task_id_namespace: uuid.UUID,
                 owned: Callable[[Any, int, list[str], list[Any]], Any],
                 publish_one: Callable[[str, str, int], None],
                 send: Callable[[Any, Entry, str, dict[str, Any]], None],
                 still_leading: Callable[[], bool],
                 atomic_allowed: Callable[[], bool],
                 forbid_atomic: Callable[[Exception], None],
                 sent_pending: set[str],
                 claimed: Callable[[Claim], None] = lambda claim: None,
                 sent: Callable[[str, int, float], None] = lambda tick, term, now: None,
                 published: Callable[[bool, str], None] = lambda atomic, why: None,
                 batch_size: int = HERD_BATCH, pipeline: bool = True,
                 source: Callable[[], EntrySource | None] = lambda: None) -> None:
        self.app = app
        self.lease_client = lease_client
        self.script = script
        self.keys = keys
        self.schedule_name = schedule_name
        self.election = election
        self._election_json = json.dumps(election)
        self.look_after_ms = look_after_ms
        self.namespace = task_id_namespace
        self.owned = owned
        self.publish_one = publish_one
        self.send = send
        self.still_leading = still_leading
        self.atomic_allowed = atomic_allowed
        self.forbid_atomic = forbid_atomic
        self.sent_pending = sent_pending
        self.claimed = claimed
        self.sent = sent
        # How ticks reach the broker, told once (the runner logs it at the first tick).
        self.published = published
        self._told_how = False
        # The runner's entry source, if any: its sent ticks are counted in the
        # claiming script when it keeps a count (source.RecordsRuns).
        self.source = source
        self.batch_size = batch_size
        self.pipeline = pipeline  # batches sent ahead of their replies (module docstring)
        self.pipelined_batches = 0
        self.dispatched = 0
        self.claims_done = 0  # claims of the last dispatch() in batches that were applied
        self.longest_call_s = 0.0  # the longest batch script call seen (client side)
        self._templates: dict[str, tuple[Entry, Any]] = {}
        # One template per (task, options), shared by the entries alike (template.py).
        self._shared: dict[tuple[str, str], Any] = {}
        self._template_thread: int | None = None
        self._fire_iso: dict[int, str] = {}
        self._fire_escaped: dict[int, str] = {}
        self._names_escaped: dict[str, str] = {}
        self._task_id_prefix = f"{schedule_name}:"
        self._namespace_bytes = task_id_namespace.bytes
        if not 1 <= batch_size <= MAX_HERD_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_HERD_BATCH}, got {batch_size}")

    # -- templates -------------------------------------------------------------

    def template(self, entry: Entry) -> MessageTemplate | None:
        """The entry's template, built once per entry (and per thread: Celery's
        ``reply_to`` is a per-thread id), from its group's shared template when
        it has one; None if it has none."""
        if not self.templates_allowed():
            return None
        return self._template(entry)

    def templates_allowed(self) -> bool:
        """False while something expects a ``send_task`` per message: then keep it."""
        return not (before_task_publish.receivers or after_task_publish.receivers
                    or self.app.conf.task_send_sent_event)

    def warm(self, entries: list[Entry], deadline: float) -> None:
        """Build templates of ``entries`` (taken from the end) until the
        ``time.monotonic()`` deadline: ahead of their ticks, off the dispatch path."""
        if not self.templates_allowed():
            entries.clear()
            return
        while entries and time.monotonic() < deadline:
            entry = entries.pop()
            if entry.enabled:
                self._template(entry)

    def forget_template(self, name: str) -> None:
        """Drop entry ``name``'s template (built again when needed)."""
        self._templates.pop(name, None)

    def keep_templates_of(self, names: Container[str]) -> None:
        """Drop every entry's template but those of ``names``."""
        for name in [name for name in self._templates if name not in names]:
            del self._templates[name]

    def _template(self, entry: Entry) -> MessageTemplate | None:
        thread = threading.get_ident()
        if thread != self._template_thread:
            self._templates.clear()
            self._shared.clear()
            self._template_thread = thread
        cached = self._templates.get(entry.name)
        if cached is not None and (cached[0] is entry or cached[0] == entry):
            return None if cached[1] is _NO_TEMPLATE else cached[1]
        made = self._entry_template(entry)
        self._templates[entry.name] = (entry, made)
        return None if made is _NO_TEMPLATE else made

    def _entry_template(self, entry: Entry) -> Any:
        group = _group_of(entry)
        shared = self._shared.get(group) if group is not None else None
        if shared is _NO_TEMPLATE:
            return _NO_TEMPLATE
        # The args and kwargs as the tick's publish sends them (its pending copy's).
        parts = json.loads(json.dumps((list(entry.args), entry.kwargs), default=str))
        if shared is not None:
            return shared.for_entry(parts[0], parts[1])
        try:
            made: Any = build_template(
                self.app, lambda producer, task_id, headers: self.send(
                    producer, entry, task_id, headers),
                entry.options, self.lease_client,
                shared=(parts[0], parts[1]) if group is not None else None)
        except NoTemplate as why:
            log.info("celery-leader: entry %r%s is sent tick by tick through send_task (%s)",
                     entry.name, "" if group is None else " (and every entry with its task "
                     "and options)", why)
            made = _NO_TEMPLATE
        if group is not None and (made is _NO_TEMPLATE or made.entry_parts is not None):
            self._shared[group] = made
            if made is not _NO_TEMPLATE:
                return made.for_entry(parts[0], parts[1])
        return made

    def fire_time(self, fire_ms: int) -> str:
        """The leader_fire_time header of a fire time (a herd shares a few)."""
        text = self._fire_iso.get(fire_ms)
        if text is None:
            if len(self._fire_iso) > FIRE_TIMES_KEPT:
                self._fire_iso.clear()
            text = self._fire_iso[fire_ms] = from_ms(fire_ms).isoformat()
        return text

    # -- dispatch ----------------------------------------------------------------

    def dispatch(self, claims: Sequence[Claim], term: int) -> bool:
        """Claim and publish ``claims`` (in order) in batches; False when the term
        is over (the refused batch and every later one left to the successor).
        ``claimed(claim)`` is called for every claim the script made (before its
        pending copy, if any, is published) and ``sent(tick, term, now)`` for every
        tick that reached the broker here (the runner's metrics)."""
        self.claims_done = 0
        batches = [claims[start:start + self.batch_size]
                   for start in range(0, len(claims), self.batch_size)]
        first = self._dispatch_pipelined(batches, term) if self._pipelining() else 0
        # From the first batch not known to be applied on: one call at a time.
        for batch in batches[first:]:
            if not self._dispatch_batch(batch, term):
                return False
            self.claims_done += len(batch)
        return True

    def _pipelining(self) -> bool:
        client = self.lease_client
        # INVARIANT: a batch that must be acknowledged by replicas goes the ordinary
        # way, its WAIT on the connection that wrote it (FencedScript.__call__).
        return (self.pipeline and isinstance(self.script, FencedScript)
                and not self.script.waits_for_replicas
                and type(client) is redis.Redis and self.atomic_allowed())

    def _dispatch_pipelined(self, batches: list[Sequence[Claim]], term: int) -> int:
        """Send batch k+1 before reading batch k's reply, chained (module
        docstring); returns how many leading batches are known applied.  At the
        first reply that is not a plain success (or any error) it stops: that
        batch and the rest go the ordinary way, which says why."""
        if len(batches) < 2:
            return 0
        recorder = _Recorder()
        self.owned(recorder, term, [], [])  # the schedule's own keys and arguments
        chain = uuid.uuid4().hex
        self.script.load()
        pool = self.lease_client.connection_pool
        connection = pool.get_connection()
        sent: list[tuple[int, _Prepared, float]] = []  # in flight: (index, batch, send time)
        applied = 0
        try:
            for index in range(len(batches) + 1):
                if index < len(batches):
                    prepared = self._prepare(
                        batches[index], term, atomic=True,
                        chain=(f"{chain}:{index - 1}" if index else "", f"{chain}:{index}"))
                    command = self.script.command(
                        term, recorder.keys + prepared.keys, recorder.args + prepared.args)
                    connection.send_packed_command([_pack(command)], check_health=False)
                    sent.append((index, prepared, time.perf_counter()))
                if index == 0:
                    continue
                done, prepared, started = sent.pop(0)
                codes = self._pipelined_reply(_read_reply(connection))
                self.longest_call_s = max(self.longest_call_s, time.perf_counter() - started)
                if codes is None:
                    break
                self._applied(batches[done], prepared, codes, term)
                self.claims_done += len(batches[done])
                self.pipelined_batches += 1
                applied = done + 1
        except BaseException:
            connection.disconnect()  # replies may be left unread: never reuse it
            pool.release(connection)
            # Unknown whether the batch in flight was applied: the ordinary way
            # finds its claims made (claims only move forward) and sends nothing twice.
            if isinstance(sys.exc_info()[1], (redis.exceptions.ConnectionError,
                                              redis.exceptions.TimeoutError)):
                return applied
            raise
        for _ in sent:  # a refused batch's successor: refused too (the chain)
            _read_reply(connection)
        pool.release(connection)
        return applied

    def _pipelined_reply(self, raw: Any) -> str | None:
        """A pipelined batch's codes; None when it was not applied (whatever the
        reason: the ordinary way runs it again and translates the refusal)."""
        if isinstance(raw, redis.exceptions.ResponseError):
            return None
        result = self.script.reply(raw)
        if result is FENCED or not isinstance(result, (bytes, str)):
            return None  # fenced, or not the schedule's owner (OWNED_LUA's -2)
        codes = as_text(result)
        return None if codes == HERD_CHAIN_BROKEN else codes

    def _dispatch_batch(self, batch: Sequence[Claim], term: int) -> bool:
        prepared = self._prepare(batch, term, self.atomic_allowed())
        try:
            codes = self._run_script(prepared, term)
        except redis.exceptions.ResponseError as error:
            if not (prepared.atomic and acl_denied(error)):
                raise
            self.forbid_atomic(error)  # nothing was written (pushes run first)
            prepared = self._prepare(batch, term, atomic=False)
            codes = self._run_script(prepared, term)
        if codes is None:
            log.info("celery-leader: term %d is over; not dispatching a batch of %d ticks "
                     "(%s ...): the next leader sends them", term, len(batch),
                     prepared.ticks[0])
            return False
        self._applied(batch, prepared, codes, term)
        return True

    def _applied(self, batch: Sequence[Claim], prepared: _Prepared, codes: str,
                 term: int) -> None:
        """Account for an applied batch: callbacks, metrics, and the pending
        copies to publish (another broker)."""
        if len(codes) != len(batch):
            raise RuntimeError(f"HERD_DISPATCH_LUA returned {codes!r} for {len(batch)} ticks")
        pushes: list[tuple[str, int]] = []  # (tick, index) claimed with a pending copy
        now = time.time()  # when the pushed ticks reached the broker
        claimed, sent, modes, ticks = self.claimed, self.sent, prepared.modes, prepared.ticks
        for index, code in enumerate(codes):
            if code == HERD_CLAIMED:
                claimed(batch[index])
                mode = modes[index]
                if mode == _PUSH:
                    self.dispatched += 1
                    sent(ticks[index], term, now)
                elif mode == _PENDING:
                    pushes.append((ticks[index], index))
            elif code == HERD_ENTRY_REMOVED:
                log.info("celery-leader: runtime entry %r was removed; not dispatching %s",
                         batch[index].entry.name, ticks[index])
            elif code != HERD_ALREADY_CLAIMED:
                raise RuntimeError(f"HERD_DISPATCH_LUA returned {code!r} for {ticks[index]}")
        if not self._told_how and (pushes or _PUSH in modes):
            self._told_how = True
            self.published(*_how_published(prepared, pushes))
        if pushes:
            self._publish_pending(prepared, pushes, term)

    def _prepare(self, batch: Sequence[Claim], term: int, atomic: bool,
                 chain: tuple[str, str] = ("", "")) -> _Prepared:
        """The batch's keys and arguments; ``chain`` = (token required, token left)."""
        keys = self.keys
        broker_keys: dict[str, int] = {}
        script_keys = [keys.state, keys.pending, keys.entries, keys.sent, keys.sent_at,
                       keys.chain]
        args: list[Any] = [self.look_after_ms, "", "1" if keys.tracked else "", term,
                           self._election_json, chain[0], chain[1], 0]
        source = self.source()
        run_record = source.run_record if isinstance(source, RecordsRuns) else None
        runs: list[Any] = []  # HERD_ARGS_PER_RUN per counted tick
        ticks: list[str] = []
        modes: list[str] = []
        messages: list[str] = []
        rendered: dict[int, tuple[Rendered, MessageTemplate]] = {}
        now: datetime | None = None
        allowed = self.templates_allowed()
        prefix, namespace = self._task_id_prefix, self._namespace_bytes
        term_text = str(int(term))
        tags = iter(delivery_tags(len(batch)))
        for index, claim in enumerate(batch):
            entry, fire_ms = claim.entry, claim.fire_ms
            name = entry.name
            tick = f"{name}@{fire_ms}"
            task_id = uuid5_text(namespace, prefix + tick)
            mode, message, key_index, tag = _CLAIM_ONLY, "", 0, ""
            if claim.publish:
                template = self._template(entry) if allowed else None
                if template is not None:
                    if template.needs_now and now is None:
                        now = self.app.now()
                    tag = next(tags)
                    payload = template.fill(
                        task_id, self._escaped_fire_time(template, fire_ms), term_text,
                        self._escaped_name(template, name) + "@" + str(fire_ms), tag, now)
                    if atomic and template.same_server:
                        mode, message = _PUSH, payload
                        key_index = broker_keys.get(template.key, 0)
                        if not key_index:
                            script_keys.append(template.key)
                            # KEYS index: 3 come first (lease, dispatcher, other lease).
                            key_index = broker_keys[template.key] = len(script_keys) + 3
                        args[1] = template.unacked_key
                    else:
                        rendered[index] = (Rendered(template.key, payload, tag), template)
                if mode != _PUSH:
                    mode, tag = _PENDING, ""
                    message = pending_message(entry, fire_ms, term, self.election, task_id,
                                              tracked=keys.tracked)
                if run_record is not None and entry.source:
                    record = run_record(entry)
                    if record is not None:
                        # INVARIANT: counted by the call that claims it, never after.
                        run_key = broker_keys.get(record.key, 0)
                        if not run_key:
                            script_keys.append(record.key)
                            run_key = broker_keys[record.key] = len(script_keys) + 3
                        runs += (index + 1, run_key, record.identity, record.base)
            ticks.append(tick)
            modes.append(mode)
            messages.append(message)
            args.append(f"{'1' if entry.runtime else '0'}{mode}{key_index} {fire_ms} "
                        f"{task_id} {tag} {name}")
            args.append(message)
        if runs:
            args[HERD_BATCH_ARGS - 1] = len(runs) // HERD_ARGS_PER_RUN
            args[HERD_BATCH_ARGS:HERD_BATCH_ARGS] = runs
        return _Prepared(script_keys, args, ticks, modes, messages, rendered, atomic)

    def _escaped_fire_time(self, template: MessageTemplate, fire_ms: int) -> str:
        text = self._fire_escaped.get(fire_ms)
        if text is None:
            if len(self._fire_escaped) > FIRE_TIMES_KEPT:
                self._fire_escaped.clear()
            text = self._fire_escaped[fire_ms] = template.escape(self.fire_time(fire_ms))
        return text

    def _escaped_name(self, template: MessageTemplate, name: str) -> str:
        # JSON escapes character by character: the tick's name is the entry's, '@', digits.
        text = self._names_escaped.get(name)
        if text is None:
            text = self._names_escaped[name] = template.escape(name)
        return text

    def _run_script(self, prepared: _Prepared, term: int) -> str | None:
        started = time.perf_counter()
        result = self.owned(self.script, term, prepared.keys, prepared.args)
        self.longest_call_s = max(self.longest_call_s, time.perf_counter() - started)
        if result is FENCED:
            return None
        codes = as_text(result)
        if codes == HERD_CHAIN_BROKEN:  # asked for no chain token: cannot happen
            raise RuntimeError("HERD_DISPATCH_LUA refused an unchained batch")
        return codes

    def _publish_pending(self, prepared: _Prepared,
                         pushes: list[tuple[str, int]], term: int) -> None:
        """Publish ticks claimed with a pending copy: rendered ones in one pipeline
        to their broker, then their copies cleared in one call; others one by one."""
        # A deposed leader must not publish even what it claimed in time: the
        # next leader adopts pending messages of older terms.
        if not self.still_leading():
            log.warning("celery-leader: leadership ended before %d claimed ticks were sent; "
                        "left pending for the next leader", len(pushes))
            return
        by_client: dict[int, tuple[Any, list[tuple[str, Rendered]]]] = {}
        for tick, index in pushes:
            if index not in prepared.rendered:
                self.publish_one(tick, prepared.messages[index], term)
                continue
            ready, template = prepared.rendered[index]
            client = template.broker_client
            by_client.setdefault(id(client), (client, []))[1].append((tick, ready))
        for client, ticks in by_client.values():
            pipe = client.pipeline(transaction=False)
            for _, ready in ticks:
                pipe.lpush(ready.key, ready.payload)
            try:
                pipe.execute()
            except Exception:
                log.exception("celery-leader: could not send %d ticks (%s ...); will retry",
                              len(ticks), ticks[0][0])
                raise
            self.dispatched += len(ticks)
            now = time.time()
            for tick, _ in ticks:
                self.sent(tick, term, now)
            names = [tick for tick, _ in ticks]
            self.sent_pending.update(names)
            self.lease_client.hdel(self.keys.pending, *names)  # an error: run() retries
            self.sent_pending.difference_update(names)


def _how_published(prepared: _Prepared, pushes: list[tuple[str, int]]) -> tuple[bool, str]:
    """Whether a batch's ticks were pushed by the claiming script, and if not why."""
    if _PUSH in prepared.modes:
        return True, ""
    if not prepared.atomic:
        return False, "the push into the broker's queue was refused to the leader_redis_url user"
    if any(index in prepared.rendered for _, index in pushes):
        return False, "the broker is not the lease's Redis"
    return False, "their messages are sent through send_task"


def _group_of(entry: Entry) -> tuple[str, str] | None:
    """What entries sharing a template have in common: the task and its options
    (None: options that do not serialise plainly, not shared)."""
    try:
        return entry.task, json.dumps(jsonable_options(entry.options), sort_keys=True)
    except (TypeError, ValueError):
        return None


def pending_message(entry: Entry, fire_ms: int, term: int, election: str, task_id: str,
                    tracked: bool) -> str:
    """A tick's pending copy: what any leader needs to send it (``_recover_pending``);
    ``tracked``: its claim wrote its start token, so its message names the tick."""
    return json.dumps({
        "entry": entry.name, "task": entry.task, "args": list(entry.args),
        "kwargs": entry.kwargs, "options": jsonable_options(entry.options),
        "fire_ms": fire_ms, "term": term, "election": election,
        "task_id": task_id, "tracked": tracked}, default=str)


def jsonable_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else
                v.total_seconds() if isinstance(v, timedelta) else v)
            for k, v in options.items()}


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def uuid5_text(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without the UUID objects
    (a herd makes thousands; tests compare the two)."""
    digest = hashlib.sha1(namespace + name.encode("utf-8"), usedforsecurity=False).hexdigest()
    return (f"{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-"
            f"{_VARIANT[digest[16]]}{digest[17:20]}-{digest[20:32]}")


def delivery_tags(count: int) -> list[str]:
    """``count`` random version-4 UUID strings, as kombu's delivery tags
    (``str(uuid4())``), from one read of the system's random source."""
    raw = os.urandom(16 * count).hex()
    return [f"{raw[at:at + 8]}-{raw[at + 8:at + 12]}-4{raw[at + 13:at + 16]}-"
            f"{_VARIANT[raw[at + 16]]}{raw[at + 17:at + 20]}-{raw[at + 20:at + 32]}"
            for at in range(0, 32 * count, 32)]


class _Recorder:
    """Stands in for the script: records the keys and arguments ``owned`` adds."""

    keys: list[Any]
    args: list[Any]

    def __call__(self, term: int, keys: Sequence[str] = (),
                 args: Sequence[Any] = ()) -> object:
        self.keys, self.args = list(keys), list(args)
        return self


def _read_reply(connection: Any) -> Any:
    """The next reply on ``connection``; an error reply returned, not raised."""
    try:
        return connection.read_response()
    except redis.exceptions.ResponseError as error:
        return error


def _pack(command: list[Any]) -> bytes:
    """A command in RESP, in one buffer: one send for the whole batch."""
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)
