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
(any other broker, or an entry whose message has no template), and records a
pushed tick for tick-start tracking (tickstart.py).  Messages come from
per-entry templates (template.py), byte for byte what ``send_task`` sends;
while anything listens to ``before_task_publish``/``after_task_publish`` or
``task_send_sent_event`` is on, every tick goes through ``send_task`` instead.

Safety argument.  The script is atomic and decides every tick before it
writes anything, so a batch is applied whole or not at all: a deposed leader's
batch is refused whole (FENCED), and the successor, reading the claims the
script did not write, sends exactly those ticks.  With another broker the
claims still travel in batches (pending copies, as for one tick); the claimed
messages are then pushed in one pipeline per batch and their pending copies
cleared in one call, and whatever a leader claimed but did not push is sent
by the next leader (``_recover_pending``), as before.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from celery.signals import after_task_publish, before_task_publish

from ..election.redislock import FENCED, FencedScript
from .entries import Entry
from .store import from_ms
from .template import MessageTemplate, NoTemplate, Rendered, TickValues, build_template

log = logging.getLogger("celery_leader.scheduler")

HERD_BATCH = 500
"""Ticks per HERD_DISPATCH_LUA call: one call stays a few milliseconds of Redis
time (see docs/benchmarks.md, "Herds", for the longest measured)."""

# Runs after OWNED_LUA (fenced + owned).  KEYS[4] state, [5] pending, [6]
# runtime entries, [7] sent, [8] sent-at, [9..] broker lists; ARGV[5] look-again
# delay ms, [6] kombu's unacked key, [7] start-marker prefix ('' = ticks not
# tracked), [8] term, [9] election (JSON), then HERD_ARGS_PER_TICK per tick:
# entry, fire ms, task id, flags (runtime '1'/'0', mode 'q' push / 'p' pending
# copy / 'c' claim only, then the list's KEYS index), message, delivery tag.
# Claims every tick whose fire time is later than its entry's recorded one (a
# removed runtime entry: none), decided for the whole batch before anything is
# written, so the batch applies whole or not at all.  Returns one code per
# tick: 1 claimed, 0 already claimed, 2 entry removed.
HERD_DISPATCH_LUA = """
local codes = {}
local n = 0
for i = 10, #ARGV, 6 do
  n = n + 1
  local code = 1
  if string.byte(ARGV[i + 3], 1) == 49 and redis.call('HEXISTS', KEYS[6], ARGV[i]) == 0 then
    code = 2
  else
    local current = redis.call('HGET', KEYS[4], ARGV[i])
    if current then
      local ok, state = pcall(cjson.decode, current)
      if ok and type(state) == 'table' and tonumber(state.last)
         and tonumber(state.last) >= tonumber(ARGV[i + 1]) then
        code = 0
      end
    end
  end
  codes[n] = code
end
-- Pushes first: a user that may not push fails here, before anything is written.
n = 0
for i = 10, #ARGV, 6 do
  n = n + 1
  if codes[n] == 1 and string.sub(ARGV[i + 3], 2, 2) == 'q' then
    redis.call('LPUSH', KEYS[tonumber(string.sub(ARGV[i + 3], 3))], ARGV[i + 4])
  end
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local look_after, unacked, started = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local term_election = ', "term": ' .. ARGV[8] .. ', "election": ' .. ARGV[9] .. ', "task_id": "'
n = 0
for i = 10, #ARGV, 6 do
  n = n + 1
  if codes[n] == 1 then
    local entry, fire, flags = ARGV[i], ARGV[i + 1], ARGV[i + 3]
    local mode = string.sub(flags, 2, 2)
    redis.call('HSET', KEYS[4], entry, '{"last": ' .. fire .. term_election .. ARGV[i + 2]
      .. '", "skipped": ' .. (mode == 'c' and 'true' or 'false') .. '}')
    local tick = entry .. '@' .. fire
    if mode == 'p' then
      redis.call('HSET', KEYS[5], tick, ARGV[i + 4])
    elseif mode == 'q' and started ~= '' then
      local key = KEYS[tonumber(string.sub(flags, 3))]
      redis.call('HSET', KEYS[7], tick, cjson.encode({pushes = {{key, ARGV[i + 4]}},
        tags = {ARGV[i + 5]}, unacked = unacked, started = started .. tick, copies = 0}))
      redis.call('ZADD', KEYS[8], now + look_after, tick)
    end
  end
end
return codes
"""
HERD_ARGS_PER_TICK = 6
HERD_BATCH_ARGS = 5  # after the election and owner record (OWNED_LUA's)
HERD_CLAIMED, HERD_ALREADY_CLAIMED, HERD_ENTRY_REMOVED = 1, 0, 2

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
    started_prefix: str  # '' when ticks are not tracked


@dataclass
class _Prepared:
    """One batch, ready for HERD_DISPATCH_LUA (lists are per tick, in order)."""

    keys: list[str]
    args: list[Any]
    ticks: list[str]
    modes: list[str]
    messages: list[str]  # the pending copy ('p') or the pushed payload ('q')
    rendered: list[Rendered | None]  # the message from the entry's template, if any
    templates: list[MessageTemplate | None]
    atomic: bool  # prepared for pushes from the script (the broker on the lease's Redis)


class HerdDispatcher:
    """Claims and publishes ticks in batches for one ScheduleRunner.

    ``owned(script, term, keys, args)`` runs a schedule script (fenced and
    owned; raises ScheduleTakenOver), ``publish_one(tick, message, term)`` is
    the per-tick publish (``send_task``) for ticks without a template, and
    ``send(producer, entry, task_id, headers)`` sends an entry's message as a
    tick's publish would (used once per entry to build its template).
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
                 batch_size: int = HERD_BATCH) -> None:
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
        self.batch_size = batch_size
        self.dispatched = 0
        self.claims_done = 0  # claims of the last dispatch() in batches that were applied
        self.longest_call_s = 0.0  # the longest batch script call seen (client side)
        self._templates: dict[str, tuple[Entry, Any]] = {}
        # One template per (task, options), shared by the entries alike (template.py).
        self._shared: dict[tuple[str, str], Any] = {}
        self._template_thread: int | None = None
        self._fire_iso: dict[int, str] = {}

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
            if len(self._fire_iso) > 4096:
                self._fire_iso.clear()
            text = self._fire_iso[fire_ms] = from_ms(fire_ms).isoformat()
        return text

    # -- dispatch ----------------------------------------------------------------

    def dispatch(self, claims: Sequence[Claim], term: int) -> bool:
        """Claim and publish ``claims`` (in order) in batches; False when the term
        is over (the refused batch and every later one left to the successor).
        ``claimed(claim)`` is called for every claim the script made (before its
        pending copy, if any, is published) and ``sent(tick, term, now)`` for every
        tick that reached the broker here, as the runner does one by one."""
        self.claims_done = 0
        for start in range(0, len(claims), self.batch_size):
            batch = claims[start:start + self.batch_size]
            if not self._dispatch_batch(batch, term):
                return False
            self.claims_done += len(batch)
        return True

    def _dispatch_batch(self, batch: Sequence[Claim], term: int) -> bool:
        prepared = self._prepare(batch, term, self.atomic_allowed())
        try:
            codes = self._run_script(prepared, term)
        except redis.exceptions.ResponseError as error:
            if not (prepared.atomic and ("NOPERM" in str(error) or isinstance(
                    error, redis.exceptions.NoPermissionError))):
                raise
            self.forbid_atomic(error)  # nothing was written (pushes run first)
            prepared = self._prepare(batch, term, atomic=False)
            codes = self._run_script(prepared, term)
        if codes is None:
            log.info("celery-leader: term %d is over; not dispatching a batch of %d ticks "
                     "(%s ...): the next leader sends them", term, len(batch),
                     prepared.ticks[0])
            return False
        pushes: list[tuple[str, int]] = []  # (tick, index) claimed with a pending copy
        now = time.time()  # when the pushed ticks reached the broker
        for index, code in enumerate(codes):
            tick = prepared.ticks[index]
            if code == HERD_ENTRY_REMOVED:
                log.info("celery-leader: runtime entry %r was removed; not dispatching %s",
                         batch[index].entry.name, tick)
            elif code == HERD_CLAIMED:
                self.claimed(batch[index])
                mode = prepared.modes[index]
                if mode == _PUSH:
                    self.dispatched += 1
                    self.sent(tick, term, now)
                elif mode == _PENDING:
                    pushes.append((tick, index))
            elif code != HERD_ALREADY_CLAIMED:
                raise RuntimeError(f"HERD_DISPATCH_LUA returned {code!r} for {tick}")
        if pushes:
            self._publish_pending(prepared, pushes, term)
        return True

    def _prepare(self, batch: Sequence[Claim], term: int, atomic: bool) -> _Prepared:
        keys = self.keys
        broker_keys: dict[str, int] = {}
        script_keys = [keys.state, keys.pending, keys.entries, keys.sent, keys.sent_at]
        args: list[Any] = [self.look_after_ms, "", keys.started_prefix, term,
                           self._election_json]
        ticks: list[str] = []
        modes: list[str] = []
        messages: list[str] = []
        rendered: list[Rendered | None] = []
        templates: list[MessageTemplate | None] = []
        now: datetime | None = None
        allowed = self.templates_allowed()
        schedule_name, namespace = self.schedule_name, self.namespace
        for claim in batch:
            entry, fire_ms = claim.entry, claim.fire_ms
            tick = f"{entry.name}@{fire_ms}"
            task_id = str(uuid.uuid5(namespace, f"{schedule_name}:{tick}"))
            mode, message, key_index, tag = _CLAIM_ONLY, "", 0, ""
            ready: Rendered | None = None
            template: MessageTemplate | None = None
            if claim.publish and allowed:
                template = self._template(entry)
                if template is not None:
                    if template.needs_now and now is None:
                        now = self.app.now()
                    ready = template.render(
                        TickValues(task_id, self.fire_time(fire_ms), term, tick), now)
            if claim.publish:
                if ready is not None and template is not None and atomic \
                        and template.same_server:
                    mode, message, tag = _PUSH, ready.payload, ready.delivery_tag
                    key_index = broker_keys.get(ready.key, 0)
                    if not key_index:
                        script_keys.append(ready.key)
                        # KEYS index: 3 come first (lease, dispatcher, other lease).
                        key_index = broker_keys[ready.key] = len(script_keys) + 3
                    args[1] = template.unacked_key
                else:
                    mode, message = _PENDING, pending_message(entry, fire_ms, term,
                                                              self.election, task_id)
            ticks.append(tick)
            modes.append(mode)
            messages.append(message)
            rendered.append(ready)
            templates.append(template)
            args += [entry.name, fire_ms, task_id,
                     f"{'1' if entry.runtime else '0'}{mode}{key_index}", message, tag]
        return _Prepared(script_keys, args, ticks, modes, messages, rendered, templates, atomic)

    def _run_script(self, prepared: _Prepared, term: int) -> list[int] | None:
        started = time.perf_counter()
        result = self.owned(self.script, term, prepared.keys, prepared.args)
        self.longest_call_s = max(self.longest_call_s, time.perf_counter() - started)
        if result is FENCED:
            return None
        return [int(code) for code in result]

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
            ready, template = prepared.rendered[index], prepared.templates[index]
            if ready is None or template is None:
                self.publish_one(tick, prepared.messages[index], term)
                continue
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


def _group_of(entry: Entry) -> tuple[str, str] | None:
    """What entries sharing a template have in common: the task and its options
    (None: options that do not serialise plainly, not shared)."""
    try:
        return entry.task, json.dumps(jsonable_options(entry.options), sort_keys=True)
    except (TypeError, ValueError):
        return None


def pending_message(entry: Entry, fire_ms: int, term: int, election: str, task_id: str) -> str:
    """A tick's pending copy: what any leader needs to send it (``_recover_pending``)."""
    return json.dumps({
        "entry": entry.name, "task": entry.task, "args": list(entry.args),
        "kwargs": entry.kwargs, "options": jsonable_options(entry.options),
        "fire_ms": fire_ms, "term": term, "election": election,
        "task_id": task_id}, default=str)


def jsonable_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else
                v.total_seconds() if isinstance(v, timedelta) else v)
            for k, v in options.items()}
