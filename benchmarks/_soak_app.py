"""The worker app of benchmarks/soak.py: SOAK_ENTRIES interval entries of 1 s,
run by the leading worker (``install(app)``, ``leader_beat`` on), and one
``@leader_only`` task the harness sends.

Configured from the environment: SOAK_REDIS_URL (broker and election, the same
server and database, so the reliable leader queue and the start claims share
the Redis being measured), SOAK_ELECTION (the election name), SOAK_ENTRIES.
SOAK_WORKER=1 (set by the harness for its workers only) makes the process end
with the harness (benchmarks/_child.py), so a killed harness leaves no worker.
SOAK_TRACEMALLOC_DIR (workers only): trace Python allocations and write a
snapshot to ``<dir>/<pid>-<n>.snap`` every SOAK_TRACEMALLOC_EVERY seconds, so
the harness can tell what grew in the leader.

The bodies count their runs with one INCR each on a key of their own
(TICKS_KEY, LEADER_RUNS_KEY): two keys, whatever the number of runs.  No result
backend: nothing else is written per task outside celery-leader and kombu.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from typing import Any

import redis
from _child import exit_with_parent
from celery import Celery

import celery_leader
from celery_leader import leader_only

TICK_TASK = "soak.tick"
LEADER_TASK = "soak.leader_only"
TICKS_KEY = "soak:ticks-run"
LEADER_RUNS_KEY = "soak:leader-only-runs"
ENTRY_PREFIX = "soak-"

REDIS_URL = os.environ["SOAK_REDIS_URL"]
ENTRIES = int(os.environ.get("SOAK_ENTRIES", "200"))

TRACE_DIR = os.environ.get("SOAK_TRACEMALLOC_DIR", "")
TRACE_EVERY = float(os.environ.get("SOAK_TRACEMALLOC_EVERY", "60"))
TRACE_FRAMES = 1  # the allocating line only: the cheapest tracing


def _snapshots() -> None:
    """Every TRACE_EVERY s, this process's allocations to TRACE_DIR (bounded:
    a daemon thread, at most 10,000 snapshots)."""
    for index in range(10_000):
        time.sleep(TRACE_EVERY)
        path = os.path.join(TRACE_DIR, f"{os.getpid()}-{index:04d}.snap")
        tracemalloc.take_snapshot().dump(path + ".tmp")
        os.replace(path + ".tmp", path)  # the harness never reads half a file


if os.environ.get("SOAK_WORKER") == "1":
    exit_with_parent()
    if TRACE_DIR:
        tracemalloc.start(TRACE_FRAMES)
        threading.Thread(target=_snapshots, daemon=True).start()

app = Celery("bench_soak", broker=REDIS_URL, set_as_current=True)
app.conf.update(
    leader_name=os.environ.get("SOAK_ELECTION", "bench-soak"),
    leader_beat=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
    beat_schedule={f"{ENTRY_PREFIX}{i:05d}": {"task": TICK_TASK, "schedule": 1.0}
                   for i in range(ENTRIES)},
)
celery_leader.install(app)

# One client per process (redis-py's pool reconnects after a fork).
_client = redis.Redis.from_url(REDIS_URL)


@app.task(name=TICK_TASK)
def tick() -> None:
    _client.incr(TICKS_KEY)


@leader_only
@app.task(name=LEADER_TASK)
def leader_task() -> None:
    _client.incr(LEADER_RUNS_KEY)


def counters(client: Any) -> tuple[int, int]:
    """(ticks run, leader-only runs) so far."""
    ticks, runs = client.mget([TICKS_KEY, LEADER_RUNS_KEY])
    return int(ticks or 0), int(runs or 0)
