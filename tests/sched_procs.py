"""Real ``celery worker`` / ``celery beat`` replicas of tests.apps.beat_app, and the
ticks they record, for the scheduler's integration tests.

Every process is started from the repository root with ``sys.executable -m
celery`` against the test's own Redis database, writes stdout+stderr to a file
under the test's ``tmp_path``, and is stopped by PID in :meth:`Replicas.stop`
(SIGCONT, SIGTERM, bounded wait, then SIGKILL), whatever happened.

``test:ticks`` holds one JSON object per executed tick task: ``label``,
``fire_time`` (the ``leader_fire_time`` header, ISO 8601 UTC), ``term``,
``task_id``, ``pid`` and ``at`` (``time.time()`` when it ran).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.beat_app"
TICKS_KEY = "test:ticks"
KEY_PREFIX = "celery-leader"
# tests/apps/beat_app.py defaults (LEADER_LEASE / LEADER_RENEW / LEADER_RETRY).
LEASE, RENEW, RETRY = 2.0, 1.4, 0.3
POLL = 0.02





@dataclass
class Proc:
    name: str
    kind: str  # "worker" or "beat"
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)  # by PID; a no-op once reaped

    def describe(self) -> str:
        return f"{self.name} ({self.kind}, pid {self.pid}, exit {self.popen.poll()})"


class Replicas:
    """The processes of one test; :meth:`stop` ends every one of them by PID."""

    def __init__(self, tmp_path: Path, redis_url: str, name: str,
                 env: dict[str, str] | None = None, app: str = APP) -> None:
        self.app = app
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.name = name
        self.env = dict(env or {})
        self.procs: list[Proc] = []
        self.retired: set[int] = set()  # PIDs a test stopped on purpose
        self.client = redis.Redis.from_url(redis_url)

    # ------------------------------------------------------------ processes

    def base_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("LEADER_", "CELERY_"))}
        env.update(REDIS_URL=self.redis_url, LEADER_NAME=self.name, PYTHONUNBUFFERED="1")
        env.update(self.env)
        env.update(extra or {})
        return env

    def _spawn(self, kind: str, args: list[str], env: dict[str, str] | None) -> Proc:
        name = f"{kind[0]}{sum(p.kind == kind for p in self.procs) + 1}"
        command = [sys.executable, "-m", "celery", "-A", self.app, kind, *args]
        if kind == "worker":
            command += ["-n", f"{name}@%h"]
        log_path = self.tmp_path / f"{name}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(command, cwd=ROOT, env=self.base_env(env), stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        proc = Proc(name, kind, popen, log_path)
        self.procs.append(proc)
        return proc

    def worker(self, *args: str, env: dict[str, str] | None = None) -> Proc:
        """A worker with the threads pool (no pool children to orphan on SIGKILL)."""
        return self._spawn("worker", ["--pool", "threads", "-c", "2", "-l", "info", *args], env)

    def beat(self, *args: str, env: dict[str, str] | None = None) -> Proc:
        schedule = str(self.tmp_path / f"beat{len(self.procs)}-schedule")
        return self._spawn("beat", ["-S", "leader", "-l", "info", "-s", schedule, *args], env)

    def wait_workers_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            for proc in self.procs:
                if proc.pid not in self.retired and not proc.alive():
                    raise AssertionError(f"{proc.describe()} exited early\n{self.logs()}")
            return all(" ready." in p.log() for p in self.procs
                       if p.kind == "worker" and p.pid not in self.retired)

        wait_until(ready, timeout, "workers to be ready", self.logs)

    def celery(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``celery -A tests.apps.beat_app <args>`` to completion."""
        return subprocess.run([sys.executable, "-m", "celery", "-A", self.app, *args], cwd=ROOT,
                              env=self.base_env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def by_pid(self, pid: int) -> Proc:
        for proc in self.procs:
            if proc.pid == pid:
                return proc
        raise AssertionError(f"pid {pid} is none of {[p.describe() for p in self.procs]}")

    def logs(self) -> str:
        return "\n".join(f"===== {p.describe()} {p.log_path} =====\n{p.log()[-20000:]}"
                         for p in self.procs)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGCONT + SIGTERM every process still running, wait, then SIGKILL; by PID."""
        running = [p for p in self.procs if p.alive()]
        for proc in running:
            proc.signal(signal.SIGCONT)
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.signal(signal.SIGKILL)
                proc.popen.wait(10)
        self.client.close()

    # ------------------------------------------------------------ election

    def lease_key(self, election: str) -> str:
        """The lease of the workers' election, or of the beats' (``<name>-beat``,
        whose keys carry the workers' hash tag)."""
        if election == self.name:
            return f"{KEY_PREFIX}:{{{election}}}:lease"
        return f"{KEY_PREFIX}:{{{self.name}}}:{election}:lease"

    def lease(self, election: str) -> dict[str, Any] | None:
        raw = self.client.get(self.lease_key(election))
        return None if raw is None else dict(json.loads(raw))

    def leader(self, election: str) -> tuple[Proc, int] | None:
        """The process holding ``election``'s lease, and its term."""
        lease = self.lease(election)
        if not lease or not lease.get("holderIdentity"):
            return None
        pid = int(str(lease["holderIdentity"]).rsplit(":", 1)[1])
        return self.by_pid(pid), int(lease["term"])

    def wait_leader(self, election: str, timeout: float = 30.0, not_pid: int = 0,
                    after_term: int = 0) -> tuple[Proc, int]:
        def found() -> tuple[Proc, int] | None:
            current = self.leader(election)
            if current and current[0].pid != not_pid and current[1] > after_term:
                return current
            return None

        return wait_until(found, timeout, f"a leader of {election} other than pid {not_pid}",
                          self.logs)

    # ------------------------------------------------------------ ticks

    def ticks(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(TICKS_KEY, 0, -1)]

    def seconds(self, label: str = "every-second") -> list[int]:
        """Recorded fire times of ``label`` as whole epoch seconds, in arrival order."""
        return [fire_second(t) for t in self.ticks() if t["label"] == label]

    def wait_ticks(self, count: int, label: str = "every-second",
                   timeout: float = 30.0, term: int = 0) -> None:
        wait_until(lambda: len([t for t in self.ticks() if t["label"] == label
                                and t["term"] > term]) >= count, timeout,
                   f"{count} ticks of {label} (term > {term})", self.logs)

    def wait_quiet(self, contiguous: bool, timeout: float = 15.0) -> None:
        """Wait for a moment between ticks: the tick of the current second has been
        recorded and the next one is at least 0.3 s away (with ``contiguous``, every
        second since the first is recorded too).  A leader killed now has no tick
        message in flight, so a lost message cannot be mistaken for a missed tick."""

        def quiet() -> bool:
            now = time.time()
            if not 0.25 <= now % 1 <= 0.7:
                return False
            seen = set(self.seconds())
            if int(now) not in seen:
                return False
            return not contiguous or seen == set(range(min(seen), int(now) + 1))

        wait_until(quiet, timeout, "a quiet moment between ticks",
                   lambda: f"seconds: {sorted(set(self.seconds()))}\n{self.logs()}")


def fire_second(tick: dict[str, Any]) -> int:
    stamp = datetime.fromisoformat(tick["fire_time"])
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0, tick
    value = stamp.timestamp()
    assert value == int(value), f"fire time is not a whole second: {tick}"
    return int(value)


@dataclass
class Analysis:
    first: int
    last: int
    recorded: int
    expected: int
    duplicates: dict[int, int]
    missing: list[int]
    terms: list[int]

    def summary(self) -> str:
        return (f"window {self.last - self.first + 1}s [{self.first}..{self.last}]: "
                f"{self.recorded} recorded / {self.expected} expected, "
                f"{sum(self.duplicates.values())} duplicated, {len(self.missing)} missing "
                f"(gaps at {self.missing}), terms {self.terms}")


def analyse(ticks: list[dict[str, Any]], until: int, label: str = "every-second") -> Analysis:
    """Fire times of ``label`` from the first recorded one through ``until``."""
    mine = [t for t in ticks if t["label"] == label]
    seconds = [fire_second(t) for t in mine]
    first = min(seconds)
    window = [s for s in seconds if s <= until]
    counts = Counter(window)
    last = max(window)
    return Analysis(first=first, last=last, recorded=len(window), expected=last - first + 1,
                    duplicates={s: n - 1 for s, n in counts.items() if n > 1},
                    missing=[s for s in range(first, last + 1) if s not in counts],
                    terms=sorted({int(t["term"]) for t in mine}))
