"""Real ``celery worker`` processes for integration tests, and the events they record.

Workers are started from the repository root with ``sys.executable -m celery``
against the test's own Redis database, each writing stdout+stderr to a file
under the test's ``tmp_path``.  :class:`Cluster` stops every process it started
by PID (SIGCONT, SIGTERM, bounded wait, then SIGKILL), whatever happened.

Apps under ``tests/apps`` record what they see as JSON in the Redis list
``test:events``; ``at`` is ``time.monotonic()`` in the recording process, and
CLOCK_MONOTONIC is system-wide, so it can be compared across processes and
with the test's own ``time.monotonic()``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import redis

from tests.waiting import wait_until as _wait_until

ROOT = Path(__file__).resolve().parent.parent
LEADER_APP = "tests.apps.leader_app"
EVENTS_KEY = "test:events"
# The app's defaults (tests/apps/leader_app.py); LEADER_* env vars override them.
LEASE, RENEW, RETRY = 2.0, 1.4, 0.3
# client-go's bound for a crash: the lease, plus up to two jittered retry periods.
FAILOVER_BOUND = LEASE + 2.2 * RETRY
POLL = 0.05
# The shared bounded wait, polling at this module's pace.
wait_until = functools.partial(_wait_until, interval=POLL)

T = TypeVar("T")




class Events:
    """The ``test:events`` list of one test's Redis database."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url)

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(EVENTS_KEY, 0, -1)]

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [event for event in self.all() if event["kind"] == kind
                and all(event.get(key) == value for key, value in match.items())]

    def wait_for(self, select: Callable[[list[dict[str, Any]]], T | None], timeout: float,
                 what: str) -> T:
        """Poll until ``select(all events)`` returns something truthy."""
        return wait_until(lambda: select(self.all()), timeout, what, self.dump)

    def wait_kind(self, kind: str, timeout: float, count: int = 1,
                  where: Callable[[dict[str, Any]], bool] = lambda event: True,
                  what: str = "") -> list[dict[str, Any]]:
        """Wait until at least ``count`` events of ``kind`` satisfy ``where``."""

        def select(events: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            found = [event for event in events if event["kind"] == kind and where(event)]
            return found if len(found) >= count else None

        return self.wait_for(select, timeout, what or f"{count} x {kind}")

    def backlog(self, queue: str = "celery_leader") -> int:
        """Messages of ``queue`` still waiting, plus every delivered but unacked message
        (kombu's ``unacked`` hash): zero means nothing can be (re)delivered any more."""
        waiting = sum(self.client.llen(key) for key in self.client.scan_iter(match=f"{queue}*")
                      if self.client.type(key) == b"list")
        return int(waiting + self.client.hlen("unacked"))

    def dump(self) -> str:
        return "events:\n" + "\n".join(f"  {json.dumps(event, sort_keys=True)}"
                                       for event in self.all())

    def close(self) -> None:
        self.client.close()


@dataclass
class Worker:
    name: str
    pool: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stderr_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if self.stderr_path is not None and self.stderr_path.exists():
            text += "\n--- stderr ---\n" + self.stderr_path.read_text(errors="replace")
        return text

    def alive(self) -> bool:
        return self.process.poll() is None

    def is_ready(self) -> bool:
        if not self.alive():
            raise AssertionError(f"worker {self.name} (pid {self.pid}) exited with "
                                 f"{self.process.returncode} before it was ready:\n{self.log()}")
        return " ready." in self.log()

    def signal(self, sig: int) -> float:
        """Send ``sig`` to the worker's main process; returns the monotonic time before."""
        at = time.monotonic()
        self.process.send_signal(sig)
        return at

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.name} (pid {self.pid}) still running after "
                                 f"{timeout}s:\n{self.log()}") from None


class Cluster:
    """Replicas of one app in one election; every process is stopped by PID in :meth:`stop`."""

    def __init__(self, tmp_path: Path, redis_url: str, election: str, app: str = LEADER_APP,
                 env: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.election = election
        self.app = app
        self.env = dict(env or {})
        self.workers: list[Worker] = []
        self.events = Events(redis_url)

    def base_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("LEADER_", "CELERY_"))}
        env.update(REDIS_URL=self.redis_url, LEADER_NAME=self.election, PYTHONUNBUFFERED="1")
        env.update(self.env)
        env.update(extra or {})
        return env

    def start(self, count: int = 1, pool: str = "prefork", env: dict[str, str] | None = None,
              args: Sequence[str] = (), per_worker: Callable[[str], dict[str, Any]] | None = None,
              split_stderr: bool = False) -> list[Worker]:
        """Start ``count`` workers at once (they boot in parallel); return without waiting.

        ``per_worker(name)`` may return ``{"env": {...}, "args": [...]}`` for one worker.
        """
        started = []
        for _ in range(count):
            name = f"w{len(self.workers) + 1}"
            own = per_worker(name) if per_worker else {}
            worker_env = self.base_env({**(env or {}), **own.get("env", {})})
            command = [sys.executable, "-m", "celery", "-A", self.app, "worker",
                       "--pool", pool, "-c", "2", "-n", f"{name}@%h", "-l", "info",
                       *args, *own.get("args", [])]
            log_path = self.tmp_path / f"{name}.log"
            stderr_path = self.tmp_path / f"{name}.stderr" if split_stderr else None
            with open(log_path, "wb") as out:
                err = open(stderr_path, "wb") if stderr_path else subprocess.STDOUT  # noqa: SIM115
                try:
                    process = subprocess.Popen(command, cwd=ROOT, env=worker_env, stdout=out,
                                               stderr=err, stdin=subprocess.DEVNULL,
                                               start_new_session=True)
                finally:
                    if stderr_path:
                        err.close()  # type: ignore[union-attr]
            worker = Worker(name, pool, process, log_path, stderr_path, worker_env)
            self.workers.append(worker)
            started.append(worker)
        return started

    def wait_ready(self, workers: Iterable[Worker] | None = None, timeout: float = 30.0) -> None:
        pending = list(self.workers if workers is None else workers)
        wait_until(lambda: all(worker.is_ready() for worker in pending), timeout,
                   "workers " + ", ".join(w.name for w in pending) + " to be ready",
                   self.logs)

    def by_pid(self, pid: int) -> Worker:
        for worker in self.workers:
            if worker.pid == pid:
                return worker
        raise AssertionError(f"pid {pid} is none of the workers "
                             f"{[(w.name, w.pid) for w in self.workers]}")

    def live(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.alive()]

    def wait_leader(self, timeout: float = 30.0, after_term: int = 0,
                    among: Iterable[Worker] | None = None) -> tuple[Worker, dict[str, Any]]:
        """The worker that records ``started_leading`` with a term above ``after_term``."""
        pids = {worker.pid for worker in (self.live() if among is None else among)}
        found = self.events.wait_kind(
            "started_leading", timeout,
            where=lambda e: e["term"] > after_term and e["pid"] in pids,
            what=f"started_leading with a term above {after_term} from pids {sorted(pids)}")
        event = found[0]
        return self.by_pid(event["pid"]), event

    def celery(self, *args: str, timeout: float = 30.0,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``celery -A <app> <args>`` (a non-worker process) to completion."""
        return subprocess.run([sys.executable, "-m", "celery", "-A", self.app, *args],
                              cwd=ROOT, env=self.base_env(env), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def send(self, *calls: dict[str, Any], timeout: float = 30.0) -> list[str]:
        """Send tasks from a separate, non-worker process that imports the app.

        Each call: ``{"task": "<name in the app module>", "args": [...],
        "options": {...}, "count": n}`` (``{i}`` in string args becomes the index).
        Returns the task ids in order.
        """
        result = subprocess.run(
            [sys.executable, "-m", "tests.apps.sender", self.app, json.dumps(list(calls))],
            cwd=ROOT, env=self.base_env(), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"sender failed:\n{result.stdout}\n{result.stderr}"
        return list(json.loads(result.stdout.strip().splitlines()[-1]))

    def logs(self) -> str:
        return "\n".join(f"===== {w.name} ({w.pool}, pid {w.pid}, "
                         f"exit {w.process.poll()}) {w.log_path} =====\n{w.log()}"
                         for w in self.workers)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGCONT + SIGTERM every process still running, wait, then SIGKILL; by PID."""
        running = [w for w in self.workers if w.alive()]
        for worker in running:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                worker.process.send_signal(sig)  # by PID; a no-op once it was reaped
        deadline = time.monotonic() + timeout
        for worker in running:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.send_signal(signal.SIGKILL)
                worker.process.wait(10)


class _Stoppable(Protocol):
    events: Events

    def stop(self) -> Any: ...


S = TypeVar("S", bound=_Stoppable)


@contextlib.contextmanager
def stopped_at_end(request: pytest.FixtureRequest, processes: S,
                   describe: Callable[[], str]) -> Iterator[S]:
    """Yield ``processes``; at the end stop every one by PID, and if the test
    failed print ``describe()`` past pytest's capture (teardown output of a
    failed test is otherwise lost)."""
    failed_before = request.session.testsfailed
    try:
        yield processes
    finally:
        try:
            processes.stop()
        finally:
            if request.session.testsfailed > failed_before:
                show_past_capture(request, describe())
            processes.events.close()


def show_past_capture(request: pytest.FixtureRequest, text: str) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print(text)
        return
    reporter.write_line("")
    for line in text.splitlines():
        reporter.write_line(line)
