"""The leader queue: taken only under the current term, never lost in flight.

Problem.  kombu's Redis transport takes a message with ``BRPOP`` and records
it in its ``unacked`` hash only once the reply has reached a live client
(celery/kombu#305).  A leader that dies, freezes or is cut off while its BRPOP
is registered in Redis (a few ms after a SIGKILL; up to the BRPOP timeout when
no FIN arrives) has the next leader-only message popped into a dead
connection, and it is gone.  With one consumer on the leader queue that is the
first message after every crash.  A blocking pop also cannot be fenced: a
deposed leader's BRPOP still takes messages.

Mechanism.  While the broker is the lease's Redis (one server, one database),
the leader queue is not consumed through kombu at all:

- a *doorbell*, ``BLMOVE q q RIGHT RIGHT``, blocks until the list holds a
  message and moves its oldest message from the tail back to the tail: it
  waits without taking, so a dead or deposed doorbell can leave nothing missing;
- TAKE_LUA, fenced by the term, pops up to N messages and, in the same atomic
  step, records each in the in-flight hash (field: the message's delivery tag;
  value: term, task id, list, message);
- the worker's own consumer gets them in its event loop as kombu messages
  whose ack and reject end the record (a requeue pushes it back in the same
  step); a ``@leader_only`` body that acks early ends its record only when the
  body ends, in the script that marks its start claim ``done``
  (FINISH_RUN_LUA), so a leader that dies mid-run leaves the record behind;
- RECOVER_LUA, fenced, runs when a term starts (and now and then while it
  lasts): every record of an older term whose task is not ``done`` goes back
  to the head of its list, every record whose task is ``done`` is dropped.

Safety argument.  A message is always in its list, in the in-flight hash, or
finished: each step that moves it is one script, and only a fenced script
(the current term's holder) moves it out of its list.  So no fault of a
replica (crash, freeze, partition, at any moment) loses a message; what a
dead term took, the next term puts back, and it cannot take anything after
that term began.  A message that ran under an older term but whose record
survived (the body had not finished, or its end was not recorded) runs again
under the next term, and the per-task-id start claim stops it only if the
body had finished: at least once for in-flight work, fenced by the term.
"""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis
from kombu.transport.virtual.base import Message

from .election.redact import secret_safe_logger
from .election.redislock import FENCED, RedisLock, acl_denied, as_text

log = secret_safe_logger(__name__)

INFLIGHT_SUFFIX = "leader-queue:inflight"
SEQUENCE_SUFFIX = "leader-queue:sequence"
TASK_CLAIM_SUFFIX = "task:"
DELIVERY_HEADER = "leader_delivery"
"""Message header naming the in-flight record; a task sees it as ``request.leader_delivery``."""

# Fenced: moves up to ARGV[3] messages out of the lists KEYS[4..] (in
# priority order) into the in-flight hash KEYS[2] in one step, each under the
# caller's term; returns {tag, message, tag, message, ...}.
TAKE_LUA = """
local inflight, limit, term = KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[2])
local taken = {}
for i = 4, #KEYS do
  while #taken < 2 * limit do
    local raw = redis.call('RPOP', KEYS[i])
    if not raw then break end
    local tag, id = nil, ''
    local ok, message = pcall(cjson.decode, raw)
    if ok and type(message) == 'table' then
      if type(message.properties) == 'table' then tag = message.properties.delivery_tag end
      if type(message.headers) == 'table' and type(message.headers.id) == 'string' then
        id = message.headers.id
      end
    end
    if type(tag) ~= 'string' or redis.call('HEXISTS', inflight, tag) == 1 then
      tag = 'celery-leader:' .. redis.call('INCR', KEYS[3])
    end
    redis.call('HSET', inflight, tag,
      cjson.encode({term = term, id = id, list = KEYS[i], message = raw}))
    taken[#taken + 1] = tag
    taken[#taken + 1] = raw
  end
end
return taken
"""

# Fenced: puts every in-flight record of a term older than the caller's back
# at the head of its list, and drops every record whose task's start claim
# (ARGV[3] .. id) is 'done', each in one step; returns {requeued, dropped}.
RECOVER_LUA = """
local inflight, term = KEYS[2], tonumber(ARGV[2])
local records = redis.call('HGETALL', inflight)
local requeued, dropped = 0, 0
for i = 1, #records, 2 do
  local tag = records[i]
  local ok, record = pcall(cjson.decode, records[i + 1])
  if ok and type(record) == 'table' and type(record.list) == 'string' then
    if record.id ~= '' and redis.call('GET', ARGV[3] .. record.id) == 'done' then
      redis.call('HDEL', inflight, tag)
      dropped = dropped + 1
    elseif tonumber(record.term) < term then
      redis.call('RPUSH', record.list, record.message)
      redis.call('HDEL', inflight, tag)
      requeued = requeued + 1
    end
  end
end
return {requeued, dropped}
"""

# Guarantees a record leaves the in-flight hash KEYS[1] only by going back to
# the head of its list in the same step; returns 1 if it was still there.
REQUEUE_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local record = cjson.decode(raw)
redis.call('RPUSH', record.list, record.message)
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# Guarantees a leader-only run's outcome (KEYS[1] 'done', or deleted so a
# retry may run it) and the end of its in-flight record (KEYS[2] field
# ARGV[3], if any) are written together.
FINISH_RUN_LUA = """
if ARGV[1] == '1' then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
if ARGV[3] ~= '' then redis.call('HDEL', KEYS[2], ARGV[3]) end
return 1
"""

DOORBELL_TIMEOUT = 0.5
"""Seconds one doorbell wait lasts; also the longest a message only in a
priority sub-list waits, and how soon the loop sees its leadership end."""
RECOVER_EVERY = 30.0
"""Seconds between sweeps of the in-flight hash while one term lasts."""
DEFAULT_PREFETCH = 100
"""Messages handed to Celery but not yet acknowledged, when the worker sets no limit."""


def inflight_key(lock: RedisLock) -> str:
    return lock.key(INFLIGHT_SUFFIX)


def task_claim_key(lock: RedisLock, task_id: str) -> str:
    return lock.key(f"{TASK_CLAIM_SUFFIX}{task_id}")


class FinishRun:
    """Records the end of a leader-only body (FINISH_RUN_LUA)."""

    def __init__(self, lock: RedisLock) -> None:
        self._lock = lock
        self._script = lock.client.register_script(FINISH_RUN_LUA)

    def __call__(self, task_id: str, done: bool, ttl_ms: int, delivery: str | None) -> None:
        # With leader_wait_replicas, the end is acknowledged by replicas before the
        # message is: a Redis fail-over then keeps the 'done' that refuses a copy.
        _, acknowledged = self._lock.run_then_wait(
            self._script, [task_claim_key(self._lock, task_id), inflight_key(self._lock)],
            ["1" if done else "0", ttl_ms, delivery or ""])
        if not acknowledged:
            self._lock.warn_unreplicated(f"the end of leader-only task {task_id}")


class _InflightChannel:
    """What a kombu message needs of a channel: its ack and reject end the record."""

    no_ack_consumers = None

    def __init__(self, session: _Session) -> None:
        self._session = session

    def decode_body(self, body: Any, encoding: str | None = None) -> Any:
        if encoding == "base64":
            return base64.b64decode(body)
        return body

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        self._session.settled(delivery_tag, requeue=None)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self._session.settled(delivery_tag, requeue=requeue)


class _Session:
    """One leadership's deliveries: its slots, and what is still outstanding."""

    def __init__(self, queue: LeaderQueue, term: int, capacity: Callable[[], int]) -> None:
        self.queue = queue
        self.term = term
        self._capacity = capacity  # read each time: the consumer may attach later
        self.outstanding: dict[str, bool] = {}  # tag -> the body's end ends its record
        self.changed = threading.Condition()
        self.channel = _InflightChannel(self)
        self._batches_handed = 0

    def free_slots(self) -> int:
        with self.changed:
            return max(1, self._capacity()) - len(self.outstanding)

    def wait_for_slot(self, stop: threading.Event, timeout: float) -> bool:
        """Wait until a slot frees; True if the event loop handed a batch to Celery
        meanwhile (its acks then wait in the loop, which does not wake itself)."""
        with self.changed:
            if (len(self.outstanding) >= max(1, self._capacity()) and not stop.is_set()
                    and not self._batches_handed):
                self.changed.wait(timeout)
            handed, self._batches_handed = self._batches_handed, 0
            return handed > 0

    def batch_handed(self) -> None:
        with self.changed:
            self._batches_handed += 1
            self.changed.notify_all()

    def settled(self, tag: str, requeue: bool | None) -> None:
        """Celery acked (``requeue`` None) or rejected the message."""
        with self.changed:
            keeps_record = self.outstanding.pop(tag, None)
            self.changed.notify_all()
        try:
            if requeue:
                self.queue.requeue(tag)  # only if its record is still there
            elif keeps_record is False:  # None: given back already, the record is another's
                self.queue.lock.client.hdel(self.queue.inflight_key, tag)
        except redis.RedisError as exc:  # the record stays: the next term puts it back
            log.warning("celery-leader: could not end the in-flight record of %s (%s)",
                        tag, exc)


class LeaderQueue:
    """Takes the leader queue for the worker's consumer while this replica leads."""

    def __init__(self, lock: RedisLock, queue: str, keeps_record: Callable[[str], bool],
                 deliver: Callable[[Callable[[], None]], None],
                 handler: Callable[[], Callable[[Any], None] | None],
                 capacity: Callable[[], int],
                 refused: Callable[[], None] = lambda: None) -> None:
        """``keeps_record(task name)``: the body's end, not the ack, ends the record.
        ``deliver(callback)`` runs it in the consumer's event loop; ``handler()``
        is the consumer's task handler then (None while it has none).  ``refused()``:
        Redis denies the leader_redis_url user the queue's keys (ACL)."""
        self.lock = lock
        self.queue = queue
        self.inflight_key = inflight_key(lock)
        self._keeps_record = keeps_record
        self._deliver = deliver
        self._handler = handler
        self._capacity = capacity
        self._refused = refused
        self._take = lock.fenced_script(TAKE_LUA)
        self._recover = lock.fenced_script(RECOVER_LUA)
        self._requeue = lock.client.register_script(REQUEUE_LUA)
        self.lists: list[str] = []
        self._doorbell: redis.Redis | None = None
        self._session: _Session | None = None

    # ------------------------------------------------------------ set-up

    def use_lists(self, lists: list[str]) -> None:
        """The Redis lists of the queue, highest priority first (kombu's names)."""
        self.lists = lists

    def doorbell_client(self) -> redis.Redis:
        """A connection of its own, with a socket timeout longer than one wait."""
        if self._doorbell is None:
            pool = self.lock.client.connection_pool
            kwargs = dict(pool.connection_kwargs)
            kwargs["socket_timeout"] = DOORBELL_TIMEOUT + 5.0
            self._doorbell = redis.Redis(connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **kwargs))
        return self._doorbell

    # ------------------------------------------------------------ the leadership

    def run(self, term: int, stop: threading.Event) -> None:
        """Take and hand over messages until ``stop`` is set (leadership over)."""
        try:
            self._run(term, stop)
        finally:
            doorbell, self._doorbell = self._doorbell, None
            if doorbell is not None:
                doorbell.close()

    def _run(self, term: int, stop: threading.Event) -> None:
        session = self._session = _Session(self, term, self._capacity)
        last_recovery = float("-inf")
        failures = 0
        while not stop.is_set():
            try:
                if time.monotonic() - last_recovery >= RECOVER_EVERY:
                    if not self.recover(term):
                        return
                    last_recovery = time.monotonic()
                if self._handler() is None:  # the consumer is (re)connecting
                    stop.wait(0.05)
                    continue
                free = session.free_slots()
                if free <= 0:
                    if session.wait_for_slot(stop, DOORBELL_TIMEOUT):
                        # kombu's loop runs callbacks queued from its own thread (Celery's
                        # acks) only after its next poll: wake it from this one.
                        self._deliver(_nothing)
                    continue
                taken = self._take(term, keys=[self.inflight_key,
                                               self.lock.key(SEQUENCE_SUFFIX), *self.lists],
                                   args=[free])
                if taken == FENCED:
                    return  # INVARIANT: no term, no taking; the elector notices too
                failures = 0
                if taken:
                    self._hand_over(session, taken)
                    continue
                # INVARIANT: the doorbell never takes: tail back to tail, one step.
                # (Through an untyped name: only some redis-py versions type the call.)
                doorbell: Any = self.doorbell_client()
                doorbell.execute_command(
                    "BLMOVE", self.lists[0], self.lists[0], "RIGHT", "RIGHT", DOORBELL_TIMEOUT)
            except redis.RedisError as exc:
                if acl_denied(exc):
                    log.warning("celery-leader: the leader_redis_url user may not take from "
                                "the leader queue's keys; it is consumed through kombu from "
                                "now on (grant the broker's queue keys as docs/deployment.md "
                                "says to keep in-flight recovery)")
                    self._refused()
                    return
                failures += 1
                if failures == 1:
                    log.warning("celery-leader: leader queue: %s; retrying while this "
                                "replica leads", exc)
                stop.wait(min(0.05 * 2 ** failures, 1.0))

    def recover(self, term: int) -> bool:
        """Put older terms' unfinished messages back; False when this term is over."""
        result = self._recover(term, keys=[self.inflight_key],
                               args=[self.lock.key(TASK_CLAIM_SUFFIX)])
        if result == FENCED:
            return False
        requeued, dropped = (int(value) for value in result)
        if requeued:
            log.warning("celery-leader: %d leader-only message(s) taken by an earlier "
                        "leadership and not finished are queued again", requeued)
        if dropped:
            log.debug("celery-leader: %d finished in-flight record(s) dropped", dropped)
        return True

    def requeue(self, tag: str) -> None:
        self._requeue(keys=[self.inflight_key], args=[tag])

    def _hand_over(self, session: _Session, taken: list[Any]) -> None:
        batch: list[tuple[str, dict[str, Any]]] = []
        for index in range(0, len(taken), 2):
            tag = as_text(taken[index])
            try:
                payload = json.loads(taken[index + 1])
                headers = payload.setdefault("headers", {})
                headers[DELIVERY_HEADER] = tag
                payload["properties"]["delivery_tag"] = tag  # what its ack names
                keeps_record = (self._keeps_record(str(headers.get("task", "")))
                                and not _expired(headers.get("expires")))
            except Exception as exc:
                # Celery could not decode it either; kombu drops such a message too.
                log.error("celery-leader: dropping an undecodable leader-queue message "
                          "%s: %s", tag, exc)
                self.lock.client.hdel(self.inflight_key, tag)
                continue
            with session.changed:
                session.outstanding[tag] = keeps_record
            batch.append((tag, payload))
        # One callback per batch: kombu keeps queued callbacks unordered.
        self._deliver(functools.partial(self._receive, session, batch))

    def _receive(self, session: _Session, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """In the consumer's event loop: hand a batch to Celery, oldest first."""
        try:
            for tag, payload in batch:
                handler = self._handler()
                if handler is None:  # no consumer (reconnecting): take it again later
                    self._give_back(session, tag)
                    continue
                try:
                    handler(_kombu_message(payload, session.channel))
                except Exception:
                    log.exception("celery-leader: the worker could not take leader-queue "
                                  "message %s", tag)
                    self._give_back(session, tag)
        finally:
            session.batch_handed()

    def _give_back(self, session: _Session, tag: str) -> None:
        with session.changed:
            session.outstanding.pop(tag, None)
            session.changed.notify_all()
        try:
            self.requeue(tag)
        except redis.RedisError as exc:  # the record stays: the next term recovers it
            log.warning("celery-leader: could not requeue %s (%s)", tag, exc)

    def give_back_unstarted(self) -> None:
        """The consumer restarted: Celery forgot the messages it had not started.
        Queue them again (a copy Celery did start is stopped by its start claim)."""
        session = self._session
        if session is None:
            return
        with session.changed:
            tags = list(session.outstanding)
        for tag in tags:
            self._give_back(session, tag)


def _nothing() -> None:
    """Queued only to wake the event loop."""


def _kombu_message(payload: dict[str, Any], channel: _InflightChannel) -> Any:
    """What kombu's Redis transport would have built from the same payload."""
    message_class: Any = Message  # untyped
    return message_class(payload, channel=channel)


def _expired(expires: Any) -> bool:
    """Celery acks an expired message without running it: its ack ends the record."""
    if not isinstance(expires, str):
        return False
    try:
        when = datetime.fromisoformat(expires)
    except ValueError:
        return False
    now = datetime.now(when.tzinfo) if when.tzinfo else datetime.now()
    return when <= now
