"""What the example project records in Redis, and how to read it back.

The tasks and the signal receivers write here, in the app's own Redis (the
broker's, so the election may run as a restricted Redis user); the demo (and
anyone checking on a deployment) reads it.  Keys carry the election name as a hash tag, like
celery-leader's own keys, so one election's data stays in one Cluster slot:

- ``example:{<name>}:events``      list of JSON leadership transitions (capped);
- ``example:{<name>}:heartbeats``  hash fire time (ms) -> times a heartbeat ran;
- ``example:{<name>}:recent``      list of the latest heartbeat runs (JSON, capped);
- ``example:{<name>}:maintenance`` hash describing the last maintenance run.

Imports only redis, never Celery.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from typing import Any

import redis

EVENTS_CAP = 1000
RECENT_CAP = 50

_clients: dict[tuple[int, str], redis.Redis] = {}


def client(url: str) -> redis.Redis:
    """One client per URL and process.

    Keyed by pid and guarded by no lock on purpose: a prefork child is forked
    while the worker's elector thread may be recording an event, and a lock
    held at that instant would stay held forever in the child.
    """
    found = _clients.get((os.getpid(), url))
    if found is None:
        found = _clients[(os.getpid(), url)] = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5)
    return found


def key(name: str, what: str) -> str:
    return f"example:{{{name}}}:{what}"


def fire_time_ms(fire_time: str | datetime) -> int:
    """A ``leader_fire_time`` header (ISO 8601, UTC) as milliseconds since the epoch."""
    if isinstance(fire_time, str):
        fire_time = datetime.fromisoformat(fire_time)
    return round(fire_time.timestamp() * 1000)


# ------------------------------------------------------------------ writing

def record_event(url: str, name: str, kind: str, **fields: Any) -> None:
    """A leadership transition seen by this process.

    ``at`` is CLOCK_MONOTONIC, one clock for every process of a host, so the
    demo can subtract the instant it sent a signal from it.
    """
    fields.update(kind=kind, pid=os.getpid(), at=time.monotonic(), wall=time.time())
    pipe = client(url).pipeline()
    pipe.rpush(key(name, "events"), json.dumps(fields, sort_keys=True))
    pipe.ltrim(key(name, "events"), -EVENTS_CAP, -1)
    pipe.execute()


def record_heartbeat(url: str, name: str, fire_time: str, term: int, worker: str) -> None:
    """One run of the heartbeat task: which tick, which leader's term sent it, who ran it."""
    fire_ms = fire_time_ms(fire_time)
    run = {"fire_ms": fire_ms, "term": term, "worker": worker, "pid": os.getpid(),
           "ran_at": time.time()}
    pipe = client(url).pipeline()
    pipe.hincrby(key(name, "heartbeats"), str(fire_ms), 1)
    pipe.lpush(key(name, "recent"), json.dumps(run, sort_keys=True))
    pipe.ltrim(key(name, "recent"), 0, RECENT_CAP - 1)
    pipe.execute()


# ------------------------------------------------------------------ reading

def events(conn: redis.Redis, name: str, start: int = 0) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in conn.lrange(key(name, "events"), start, -1)]


def heartbeats(conn: redis.Redis, name: str) -> dict[int, int]:
    """Fire time (ms) -> how many times the heartbeat for it ran."""
    return {int(fire): int(count)
            for fire, count in conn.hgetall(key(name, "heartbeats")).items()}


def recent(conn: redis.Redis, name: str, count: int = 10) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in conn.lrange(key(name, "recent"), 0, count - 1)]


def maintenance(conn: redis.Redis, name: str) -> dict[str, str]:
    return {k.decode(): v.decode()
            for k, v in conn.hgetall(key(name, "maintenance")).items()}


def _window(runs: dict[int, int], until_ms: int | None,
            from_ms: int | None) -> tuple[dict[int, int], int, int] | None:
    """The runs that count, and the first and last fire time expected to run."""
    if until_ms is not None:
        runs = {fire: count for fire, count in runs.items() if fire <= until_ms}
    if not runs and (from_ms is None or until_ms is None):
        return None
    first = min([*runs, *([] if from_ms is None else [from_ms])])
    last = max(runs) if until_ms is None else until_ms
    return runs, first, last


def tick_anomalies(runs: dict[int, int], until_ms: int | None = None,
                   from_ms: int | None = None) -> tuple[list[int], list[int]]:
    """(lost fire times, duplicated fire times), in ms, of a per-second schedule.

    Every second from ``from_ms`` (or the first fire time that ran, if earlier)
    to ``until_ms`` (or the last one that ran) is expected to run exactly once.
    """
    window = _window(runs, until_ms, from_ms)
    if window is None:
        return [], []
    runs, first, last = window
    lost = [fire for fire in range(first, last + 1, 1000) if fire not in runs]
    return lost, sorted(fire for fire, count in runs.items() if count > 1)


def tick_accounting(runs: dict[int, int], until_ms: int | None = None,
                    from_ms: int | None = None) -> dict[str, int]:
    """Exactly-once accounting of a per-second schedule (see :func:`tick_anomalies`):
    ticks expected, dispatched (distinct fire times that ran), duplicated (runs
    beyond the first for a fire time) and lost (expected but never ran)."""
    window = _window(runs, until_ms, from_ms)
    if window is None:
        return {"expected": 0, "dispatched": 0, "duplicated": 0, "lost": 0}
    runs, first, last = window
    lost, _ = tick_anomalies(runs, until_ms, from_ms)
    return {
        "expected": max(0, (last - first) // 1000 + 1),
        "dispatched": len(runs),
        "duplicated": sum(count - 1 for count in runs.values()),
        "lost": len(lost),
    }
