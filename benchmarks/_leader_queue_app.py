"""The worker app of benchmarks/leader_queue.py: one no-op task, registered twice.

``bench.plain_noop`` goes to Celery's default queue (``celery``, kombu's BRPOP);
``bench.leader_noop`` is the same body under ``@leader_only``, so it goes to the
leader queue, which the leading worker takes through celery_leader/leaderqueue.py
(doorbell, fenced TAKE, ``hub.call_soon``) and whose body is wrapped by the
start claim (TASK_START_LUA) and the end of its run (FINISH_RUN_LUA).

Configured from the environment: BENCH_REDIS_URL (broker and election, the same
server and database, so the reliable leader queue is used), BENCH_ELECTION (the
election name), BENCH_OUT_DIR (where every process appends its stamps).

Each process appends lines to ``BENCH_OUT_DIR/<pid>.log`` with one ``os.write``
each (no Redis round trip, so the stamps cost the two variants the same few
microseconds); every time is ``time.monotonic()`` (CLOCK_MONOTONIC, one clock
for every process on Linux):

- ``R <task id> <t>``: the worker's main process received the message
  (``task_received``: the request exists, before it goes to the pool);
- ``T <task name> <task id> <prerun> <start> <postrun> <delivery> <term>``:
  the pool process ran it; ``prerun`` is Celery's ``task_prerun``, ``start`` the
  first line of the body (after the leader-only start claim), ``postrun``
  Celery's ``task_postrun`` (after the leader-only end of run); ``delivery`` is
  1 when the message came through the reliable leader queue
  (``request.leader_delivery`` set), ``term`` the leader term it ran under (0: none);
- ``L <term> <t>`` / ``S <term> <t>``: this worker started / stopped leading;
- ``W <t>``: the worker is ready (``worker_ready``; its log line is at INFO).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery import signals as celery_signals

import celery_leader
from celery_leader import leader_only, signals

PLAIN_TASK = "bench.plain_noop"
LEADER_TASK = "bench.leader_noop"

REDIS_URL = os.environ["BENCH_REDIS_URL"]
OUT_DIR = os.environ["BENCH_OUT_DIR"]

app = Celery("bench_leader_queue", broker=REDIS_URL, set_as_current=True)
app.conf.update(
    leader_name=os.environ.get("BENCH_ELECTION", "bench-leader-queue"),
    leader_beat=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
celery_leader.install(app)

_fd: int | None = None
_fd_pid = 0
_prerun: dict[str, float] = {}
_start: dict[str, float] = {}


def stamp(line: str) -> None:
    """Append one line to this process's file (reopened after a fork)."""
    global _fd, _fd_pid
    pid = os.getpid()
    if _fd is None or _fd_pid != pid:
        _fd = os.open(os.path.join(OUT_DIR, f"{pid}.log"),
                      os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fd_pid = pid
    os.write(_fd, line.encode() + b"\n")


@app.task(bind=True, name=PLAIN_TASK)
def plain_noop(self: Any) -> None:
    _start[self.request.id] = time.monotonic()


@leader_only
@app.task(bind=True, name=LEADER_TASK)
def leader_noop(self: Any) -> None:
    _start[self.request.id] = time.monotonic()


@celery_signals.task_received.connect
def _received(request: Any = None, **kwargs: Any) -> None:
    stamp(f"R {request.id} {time.monotonic()!r}")


@celery_signals.task_prerun.connect
def _prerun_stamp(task_id: str = "", **kwargs: Any) -> None:
    _prerun[task_id] = time.monotonic()


@celery_signals.task_postrun.connect
def _postrun_stamp(task_id: str = "", task: Any = None, **kwargs: Any) -> None:
    postrun = time.monotonic()
    request = task.request
    delivery = 1 if getattr(request, "leader_delivery", None) else 0
    term = getattr(request, "leader_term", 0) or 0
    stamp(f"T {task.name} {task_id} {_prerun.pop(task_id, 0.0)!r} "
          f"{_start.pop(task_id, 0.0)!r} {postrun!r} {delivery} {term}")


@celery_signals.worker_ready.connect
def _ready(**kwargs: Any) -> None:
    stamp(f"W {time.monotonic()!r}")


@signals.started_leading.connect
def _started(sender: Any = None, term: int = 0, **kwargs: Any) -> None:
    stamp(f"L {term} {time.monotonic()!r}")


@signals.stopped_leading.connect
def _stopped(sender: Any = None, term: int = 0, **kwargs: Any) -> None:
    stamp(f"S {term} {time.monotonic()!r}")
