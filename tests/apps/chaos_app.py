"""The app of the chaos suite (tests/chaos): a per-second schedule, a claiming
leader-only task, and fault hooks installed at import time.

Env: REDIS_URL (broker and election: the replica's own TCP proxy in the
suite), CHAOS_EVENTS_URL (the real Redis the records go to, so a partitioned
replica's records are not held by its cut; REDIS_URL if unset), LEADER_NAME, LEADER_CATCH_UP,
LEADER_LEASE / LEADER_RENEW / LEADER_RETRY, LEADER_HEALTHZ_PORT, and the fault
hooks, each a file that arms the fault while it exists:

- CHAOS_WEDGE_FILE: the elector's lock reads and writes block (a wedged
  elector thread in a process that otherwise lives on);
- CHAOS_FREEZE_FILE: the scheduler thread freezes in Celery's
  ``after_task_publish`` of a tick: the message is built, but the fenced script
  that pushes it to the broker and clears its pending copy has not run yet
  (writes ``<file>.frozen`` first; thaws when the file is removed);
- CHAOS_LOSE_REPLY_FILE: the next start claim of a leader-only task runs in
  Redis but its reply is lost, as when a stalled server answers after the
  client's socket timeout (one-shot: the file is removed).

What it records, all with ``time.monotonic()`` (CLOCK_MONOTONIC is system-wide,
so comparable across the processes of this host and with the test's clock):

- every tick message carries, besides the scheduler's ``leader_fire_time`` and
  ``leader_term`` headers, ``chaos_at`` (just before publishing), ``chaos_pid``
  and the publisher's shared leadership page (``chaos_page_term``,
  ``chaos_valid_until``).  The tick queue (``chaos-ticks``) has no consumer:
  the messages themselves are the dispatch record, one per publish, kept by
  Redis through restarts (AOF, fsync always) and unaffected by killed consumers;
- ``test:events``: leadership signals (``started_leading`` / ``stopped_leading``
  / ``new_leader``), the start of every ``claimer`` run, and every run of the
  no-op leader-only task ``noop`` (``leader_run``: task id, the term it was
  claimed under, ``current_term()`` and the replica's identity);
- ``test:claims``: every fenced claim the ``claimer`` task makes.

Recording never blocks the elector: events go through an in-memory queue that
a daemon thread flushes (a Redis outage only delays them).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import threading
import time
from typing import Any

import redis
from billiard.util import get_pdeathsig, set_pdeathsig
from celery import Celery
from celery.signals import after_task_publish, before_task_publish
from redis.backoff import NoBackoff
from redis.retry import Retry

import celery_leader
import celery_leader.decorators
import celery_leader.worker
from celery_leader import cron, leader_only, signals
from celery_leader.healthz import serve_healthz
from celery_leader.redislock import RedisLock
from celery_leader.state import shared_leadership

REDIS_URL = os.environ["REDIS_URL"]
TICK_QUEUE = "chaos-ticks"
TICK_TASK = "tests.apps.chaos_app.tick"
CLAIMER_TASK = "tests.apps.chaos_app.claimer"
NOOP_TASK = "tests.apps.chaos_app.noop"
EVENTS_KEY = "test:events"
CLAIMS_KEY = "test:claims"
CLAIMER_STOP_KEY = "test:claimer-stop"

app = Celery("chaos_app", broker=REDIS_URL)
app.conf.update(
    leader_name=os.environ.get("LEADER_NAME", "chaos_app"),
    leader_lease_duration=float(os.environ.get("LEADER_LEASE", "2.0")),
    leader_renew_deadline=float(os.environ.get("LEADER_RENEW", "1.4")),
    leader_retry_period=float(os.environ.get("LEADER_RETRY", "0.3")),
    leader_beat=True,
    leader_catch_up=os.environ.get("LEADER_CATCH_UP", "all"),
    beat_schedule={
        "every-second": {"task": TICK_TASK, "schedule": cron("* * * * * *"),
                         "args": ("every-second",), "options": {"queue": TICK_QUEUE}},
    },
    worker_prefetch_multiplier=1,
    # A leader-only message a killed or cut-off leader had taken (kombu's
    # ``unacked`` hash) comes back within seconds, not the default hour.
    broker_transport_options={"visibility_timeout": 6, "unacked_restore_interval": 1,
                              "unacked_restore_throttle": 1},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if os.environ.get("LEADER_HEALTHZ_PORT"):
    app.conf.leader_healthz_port = int(os.environ["LEADER_HEALTHZ_PORT"])
celery_leader.install(app)

# ---------------------------------------------------------------- fault hooks

# /healthz on loopback only: the worker's server binds 0.0.0.0 and has no setting
# for the host.
celery_leader.worker.serve_healthz = functools.partial(  # type: ignore[attr-defined]
    serve_healthz, host="127.0.0.1")

WEDGE_FILE = os.environ.get("CHAOS_WEDGE_FILE", "")


def _wedgeable(method: Any) -> Any:
    @functools.wraps(method)
    def call(self: RedisLock, *args: Any, **kwargs: Any) -> Any:
        if WEDGE_FILE and os.path.exists(WEDGE_FILE):
            _record("wedged", method=method.__name__)
            while os.path.exists(WEDGE_FILE):
                time.sleep(0.05)
            _record("unwedged", method=method.__name__)
        return method(self, *args, **kwargs)

    return call


RedisLock.update = _wedgeable(RedisLock.update)  # type: ignore[method-assign]
RedisLock.get = _wedgeable(RedisLock.get)  # type: ignore[method-assign]

FREEZE_FILE = os.environ.get("CHAOS_FREEZE_FILE", "")
LOSE_REPLY_FILE = os.environ.get("CHAOS_LOSE_REPLY_FILE", "")


@after_task_publish.connect
def _freeze_after_publish(sender: Any = None, **kw: Any) -> None:
    if sender != TICK_TASK or not FREEZE_FILE or not os.path.exists(FREEZE_FILE):
        return
    with open(FREEZE_FILE + ".frozen", "w") as marker:
        marker.write(str(time.monotonic()))
    while os.path.exists(FREEZE_FILE):
        time.sleep(0.05)


_task_start_script = celery_leader.decorators._task_start_script


def _losing_task_start_script(controller: Any) -> Any:
    script = _task_start_script(controller)

    def call(term: int, keys: Any = (), args: Any = ()) -> Any:
        result = script(term, keys=keys, args=args)
        if LOSE_REPLY_FILE and os.path.exists(LOSE_REPLY_FILE):
            os.unlink(LOSE_REPLY_FILE)
            _record("reply_lost", keys=list(keys), result=result, term=term)
            raise redis.exceptions.TimeoutError("chaos: the script ran, its reply was lost")
        return result

    return call


celery_leader.decorators._task_start_script = _losing_task_start_script

# ---------------------------------------------------------------- recording

# No retries and short timeouts: the recorder must never add its own stalls.
_recorder = redis.Redis.from_url(os.environ.get("CHAOS_EVENTS_URL", REDIS_URL),
                                 socket_timeout=0.5, socket_connect_timeout=0.5,
                                 retry=Retry(NoBackoff(), 0))
_outbox: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
_flusher_pid = 0
_flusher_guard = threading.Lock()


def _flush_forever() -> None:
    pending: list[tuple[str, str]] = []
    while True:
        if not pending:
            pending.append(_outbox.get())
        while True:
            try:
                pending.append(_outbox.get_nowait())
            except queue.Empty:
                break
        try:
            pipe = _recorder.pipeline(transaction=False)
            for key, value in pending:
                pipe.rpush(key, value)
            pipe.execute()
            pending.clear()
        except Exception:
            time.sleep(0.2)  # Redis is down or paused: keep them, try again


def _record(kind: str, key: str = EVENTS_KEY, **fields: Any) -> None:
    """Queue one record; a flusher thread (one per process, started lazily so a
    forked child gets its own) writes it to Redis."""
    global _flusher_pid
    fields.update(kind=kind, pid=os.getpid(), at=time.monotonic())
    _outbox.put((key, json.dumps(fields)))
    if _flusher_pid != os.getpid():
        with _flusher_guard:
            if _flusher_pid != os.getpid():
                _flusher_pid = os.getpid()
                threading.Thread(target=_flush_forever, name="chaos-recorder",
                                 daemon=True).start()


def _record_now(kind: str, **fields: Any) -> None:
    """Record before returning (a run must not be lost with a pool child killed
    right after it); only a Redis down for 20 s leaves it to the flusher."""
    line = json.dumps({**fields, "kind": kind, "pid": os.getpid(), "at": time.monotonic()})
    deadline = time.monotonic() + 20.0
    while True:
        try:
            _recorder.rpush(EVENTS_KEY, line)
            return
        except Exception:
            if time.monotonic() > deadline:
                _record(kind, **fields)
                return
            time.sleep(0.2)


def _flush_now(timeout: float) -> None:
    """Best effort: wait until the outbox was taken by the flusher."""
    deadline = time.monotonic() + timeout
    while not _outbox.empty() and time.monotonic() < deadline:
        time.sleep(0.02)


@signals.started_leading.connect
def _started(sender: Any = None, identity: str = "", term: int = 0, **kw: Any) -> None:
    _record("started_leading", identity=identity, term=term)


@signals.stopped_leading.connect
def _stopped(sender: Any = None, identity: str = "", term: int = 0, reason: str = "",
             **kw: Any) -> None:
    _record("stopped_leading", identity=identity, term=term, reason=reason)


@signals.new_leader.connect
def _new(sender: Any = None, identity: str = "", term: int = 0, **kw: Any) -> None:
    _record("new_leader", identity=identity, term=term)


@before_task_publish.connect
def _stamp(sender: Any = None, headers: dict[str, Any] | None = None, **kw: Any) -> None:
    if sender != TICK_TASK or headers is None:
        return
    page_term, valid_until = shared_leadership().snapshot()
    headers.update(chaos_at=time.monotonic(), chaos_pid=os.getpid(),
                   chaos_page_term=page_term, chaos_valid_until=valid_until)


# ---------------------------------------------------------------- tasks


@app.task(name=TICK_TASK)
def tick(label: str) -> None:
    """Never consumed in the suite: its messages are the record."""


@leader_only
@app.task(bind=True, acks_late=True, name=NOOP_TASK)
def noop(self: Any, label: str) -> None:
    """Leader-only traffic alongside the ticks: each run is recorded."""
    controller = celery_leader.worker.current_controller()
    # The page as the body reads it: a term of 0 with the run's own term on the
    # page and its validity just past is a body that started at the edge of it.
    page_term, valid_until = celery_leader.state.shared_leadership().snapshot()
    _record_now("leader_run", label=label, task_id=self.request.id,
                term=int(getattr(self.request, "leader_term", 0) or 0),
                current_term=celery_leader.current_term(),
                page_term=page_term, page_lapsed=time.monotonic() >= valid_until,
                identity=controller.identity if controller is not None else "")


@leader_only
@app.task(bind=True, name=CLAIMER_TASK)
def claimer(self: Any, run_id: str, outlive: bool, seconds: float) -> int:
    """Claim ``chaos:<run_id>:<n>`` under the term this run started with, every
    100 ms, for ``seconds`` or until ``test:claimer-stop`` names ``run_id``.

    With ``outlive`` the pool child clears the parent-death signal Celery sets
    (SIGKILL), standing in for any process that dispatches and outlives the one
    that elects (a subprocess a task started, a platform without pdeathsig).
    """
    controller = celery_leader.worker.current_controller()
    term = int(getattr(self.request, "leader_term", 0) or 0)
    pdeathsig = get_pdeathsig()
    if outlive:
        set_pdeathsig(0)
    _record("claimer_start", run_id=run_id, ppid=os.getppid(), term=term, pdeathsig=pdeathsig,
            outlive=outlive, controller=controller is not None)
    if controller is None:
        return 0
    stop_key = f"{CLAIMER_STOP_KEY}:{run_id}"
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        begin = time.monotonic()
        try:
            result = controller.lock.claim(f"chaos:{run_id}:{n}", term).name
        except Exception as exc:
            result = f"error:{type(exc).__name__}"
        end = time.monotonic()
        _record("claim", key=CLAIMS_KEY, run_id=run_id, n=n, ppid=os.getppid(), term=term,
                result=result, begin=begin, end=end,
                page_term=celery_leader.current_term())
        try:
            if _recorder.exists(stop_key):
                break
        except Exception:
            pass
        time.sleep(0.1)
    _flush_now(5.0)
    return n
