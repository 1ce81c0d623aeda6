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
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

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


def test_a_tick_held_by_a_killed_worker_runs_once_after_the_visibility_timeout(
        tmp_path: Path, redis_url: str, election_name: str) -> None:
    r = Replicas(tmp_path, redis_url, election_name, app="tests.apps.held_tick_app",
                 env={"VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)})
    try:
        r.beat()
        busy = r.worker("-c", "1")
        r.wait_workers_ready()
        r.wait_ticks(1, label="every-2s", timeout=60)
        sent = r.celery("call", "tests.apps.held_tick_app.block", "--args", "[600]")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: r.client.lrange("test:blocked", 0, -1), 20,
                   "the busy worker to start its long task", r.logs)
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
