"""With -E, leadership transitions are also sent as Celery events."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.fakes import wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_leader_started_event_is_sent(redis_url: str, election_name: str,
                                      tmp_path: Path) -> None:
    app = Celery("events-probe", broker=redis_url, set_as_current=False)
    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    done = threading.Event()

    def capture() -> None:
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": seen.append})
            ready.set()
            while not done.is_set():
                with contextlib.suppress(Exception):  # timeouts between events
                    receiver.capture(limit=None, timeout=0.5, wakeup=False)

    listener = threading.Thread(target=capture, daemon=True)
    listener.start()
    assert ready.wait(10)
    env = dict(os.environ, REDIS_URL=redis_url, LEADER_NAME=election_name)
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.apps.leader_app", "worker", "-E",
         "--pool", "solo", "-n", "events@%h", "-l", "info"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: any(e.get("type") == "leader-started" for e in seen), 20.0,
                   message="a leader-started event")
        event = next(e for e in seen if e.get("type") == "leader-started")
        assert event["name"] == election_name and event["term"] >= 1
        assert event["identity"].startswith("events@")
    finally:
        done.set()
        listener.join(5)
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
