"""A tick that a worker took ahead and had not started when it was killed
(held in kombu's ``unacked`` hash) runs once, a visibility timeout after it
was delivered: the leader sends no copy of a held tick, and kombu gives it back
to the queue only then (README.md, "django-celery-beat tasks").

Real processes of tests/apps/held_tick_app.py: a standalone beat dispatches an
entry every 2 s; worker w1 (one thread, prefetch 1) is kept busy by a long task
and takes the next tick ahead; it is killed by PID as soon as the tick is held;
worker w2 then runs the ticks.  The visibility timeout (15 s) is longer than the
leader's look-again delay for unstarted ticks (10 s), so a copy the leader sent
would run before it.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from tests.sched_procs import Replicas
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

VISIBILITY_TIMEOUT = 15


def held_tick(client: Any) -> tuple[str, float] | None:
    """The tick held in kombu's ``unacked`` hash (its leader_tick header) and when
    it was delivered, if one is."""
    for tag, raw in (client.hgetall("unacked") or {}).items():
        message = json.loads(raw)[0]
        tick = (message.get("headers") or {}).get("leader_tick")
        if tick:
            return str(tick), float(client.zscore("unacked_index", tag))
    return None


def fire_ms(record: dict[str, Any]) -> int:
    return round(datetime.fromisoformat(record["fire_time"]).timestamp() * 1000)


def busy_worker(r: Replicas) -> Any:
    """A beat dispatching, and a one-process worker busy with a long task: the next
    tick it takes from the queue waits, held, behind that task."""
    r.beat()
    busy = r.worker("-c", "1")
    r.wait_workers_ready()
    r.wait_ticks(1, label="every-2s", timeout=60)
    sent = r.celery("call", "tests.apps.held_tick_app.block", "--args", "[600]")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: r.client.lrange("test:blocked", 0, -1), 20,
               "the busy worker to start its long task", r.logs)
    return busy


def test_a_tick_held_by_a_killed_worker_runs_once_after_the_visibility_timeout(
        tmp_path: Path, redis_url: str, election_name: str) -> None:
    r = Replicas(tmp_path, redis_url, election_name, app="tests.apps.held_tick_app",
                 env={"VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)})
    try:
        busy = busy_worker(r)
        tick, delivered_at = wait_until(lambda: held_tick(r.client), 20,
                                        "the busy worker to hold a tick", r.logs)
        busy.signal(signal.SIGKILL)
        busy.popen.wait(10)
        r.retired.add(busy.pid)
        r.worker()
        held_ms = int(tick.rpartition("@")[2])

        def runs() -> list[dict[str, Any]]:
            return [t for t in r.ticks() if fire_ms(t) == held_ms]

        [run] = wait_until(runs, VISIBILITY_TIMEOUT + 30,
                           f"the held tick {tick} to run", r.logs)
        assert run["at"] >= delivered_at + VISIBILITY_TIMEOUT - 0.5, (
            f"{tick} ran {run['at'] - delivered_at:.1f} s after its delivery to the killed "
            f"worker, before the visibility timeout ({VISIBILITY_TIMEOUT} s)")
        # Two more ticks later (4 s): none of them, nor it, ran twice.
        r.wait_ticks(len(r.ticks()) + 2, label="every-2s", timeout=15)
        assert len(runs()) == 1, runs()
        fired = [fire_ms(t) for t in r.ticks()]
        assert len(fired) == len(set(fired)), sorted(fired)
    finally:
        r.stop()
        print(r.logs())  # shown by pytest only when the test failed


def sent_not_started(client: Any) -> list[str]:
    """The ticks sent and not started yet (their start tokens, tickstart.py)."""
    return [field.decode() for key in client.scan_iter(match="*schedule:sent")
            for field in client.hkeys(key)]


def ready_in(url: str, queue: str) -> int:
    """Messages waiting in ``queue`` on RabbitMQ (not those delivered and unacked)."""
    with Connection(url) as connection:
        return int(connection.default_channel.queue_declare(queue, passive=True).message_count)


def test_a_tick_held_by_a_killed_worker_runs_once_on_rabbitmq(
        tmp_path: Path, redis_url: str, rabbitmq_url: str, election_name: str) -> None:
    """The same fault with RabbitMQ as the broker (the lease on Redis): the killed
    worker's connection closes, RabbitMQ puts the tick it held back at once, and
    the other worker runs it, once; no visibility timeout to wait for."""
    r = Replicas(tmp_path, redis_url, election_name, app="tests.apps.held_tick_app",
                 env={"VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT), "BROKER_URL": rabbitmq_url})
    try:
        busy = busy_worker(r)
        ran = {fire_ms(t) for t in r.ticks()}

        def held() -> str | None:
            # A tick sent, not started, not waiting in the queue: the only
            # consumer, the busy worker, holds it (asked twice: a tick is
            # recorded just before it is published).
            unstarted = [t for t in sent_not_started(r.client)
                         if int(t.rpartition("@")[2]) not in ran]
            if not unstarted or ready_in(rabbitmq_url, "celery"):
                return None
            again = [t for t in sent_not_started(r.client) if t in unstarted]
            return again[0] if again and not ready_in(rabbitmq_url, "celery") else None

        tick = wait_until(held, 20, "the busy worker to hold a tick", r.logs)
        busy.signal(signal.SIGKILL)
        killed = time.time()
        busy.popen.wait(10)
        r.retired.add(busy.pid)
        r.worker()
        held_ms = int(tick.rpartition("@")[2])

        def runs() -> list[dict[str, Any]]:
            return [t for t in r.ticks() if fire_ms(t) == held_ms]

        [run] = wait_until(runs, 30, f"the held tick {tick} to run", r.logs)
        print(f"{tick} ran {run['at'] - killed:.1f} s after the kill of the worker holding it")
        # Two more ticks later (4 s): none of them, nor it, ran twice.
        r.wait_ticks(len(r.ticks()) + 2, label="every-2s", timeout=15)
        assert len(runs()) == 1, runs()
        fired = [fire_ms(t) for t in r.ticks()]
        assert len(fired) == len(set(fired)), sorted(fired)
    finally:
        r.stop()
        print(r.logs())  # shown by pytest only when the test failed
