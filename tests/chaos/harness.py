"""Processes and records for the chaos suite: a restartable Redis, worker replicas
of tests.apps.chaos_app, and what they dispatched.

Every process is started by this module and stopped by PID: a replica's
``celery worker`` is a session leader (``start_new_session``), so its pool
children share its process group; :meth:`ChaosCluster.stop` finds them by that
group id in /proc (orphans included), sends SIGCONT first, then SIGTERM, then
SIGKILL to whatever is still running.  Everything listens on 127.0.0.1 only.

Times are ``time.monotonic()``: CLOCK_MONOTONIC is system-wide, so what the
replicas record compares with the test's own clock.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from celery_leader.embedded import EmbeddedRedis, free_port
from tests.tcpproxy import TcpProxy
from tests.waiting import wait_until as _wait_until

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.chaos_app"
TICK_QUEUE = "chaos-ticks"  # tests/apps/chaos_app.py
CLAIMER_TASK = "tests.apps.chaos_app.claimer"
NOOP_TASK = "tests.apps.chaos_app.noop"
EVENTS_KEY = "test:events"
CLAIMS_KEY = "test:claims"
CLAIMER_STOP_KEY = "test:claimer-stop"
KEY_PREFIX = "celery-leader"
LEADER_QUEUE = "celery_leader"
# Short timings, as the issue asks: lease / renew deadline / retry period.
LEASE, RENEW, RETRY = 2.0, 1.4, 0.3
POLL = 0.05
# The shared bounded wait, polling at this module's pace.
wait_until = functools.partial(_wait_until, interval=POLL)





# ---------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def pid_alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def group_pids(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (a group this module created)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[2] == pgid and stat[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def send(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class ChaosRedis:
    """redis-server with AOF (fsync always) in a data dir of the test's; stopped and
    started again on the same port and dir."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.server = EmbeddedRedis(data_dir=str(data_dir), extra_args=[
            "--appendonly", "yes", "--appendfsync", "always"])
        self.port = self.server.port
        self.url = self.server.url
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def start(self) -> None:
        self.server.start(timeout=15.0)
        self.starts += 1

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.server.stop(sig)

    def running(self) -> bool:
        return self.server.process is not None and self.server.process.poll() is None

    def client(self, **options: Any) -> redis.Redis:
        options.setdefault("socket_timeout", 5.0)
        options.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis.from_url(self.url, **options)


@dataclass
class Replica:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    healthz_port: int
    wedge_file: Path
    freeze_file: Path
    lose_reply_file: Path
    proxy: TcpProxy  # its own way to Redis (broker and lease), which a fault can cut
    started_at: float = field(default_factory=time.monotonic)
    stopped: bool = False  # SIGSTOPped by the test

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> float:
        at = time.monotonic()
        self.popen.send_signal(sig)  # by PID; a no-op once reaped
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig in (signal.SIGCONT, signal.SIGKILL):
            self.stopped = False
        return at

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def http(self, path: str, timeout: float = 1.5) -> tuple[int, str] | None:
        """(status, body) of GET ``path`` on its healthz server; None if unreachable."""
        url = f"http://127.0.0.1:{self.healthz_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except (OSError, ValueError):
            return None

    def healthz(self) -> int | None:
        reply = self.http("/healthz")
        return reply[0] if reply else None

    def view(self) -> dict[str, Any] | None:
        """Its own account of the election (the /leader route)."""
        reply = self.http("/leader")
        if not reply or reply[0] != 200:
            return None
        return dict(json.loads(reply[1]))

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid}, exit {self.popen.poll()})"


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Dispatch:
    """One tick message as the broker holds it."""

    fire: int  # whole epoch second
    term: int
    task_id: str
    at: float  # monotonic, just before publishing
    pid: int
    page_term: int  # the publisher's shared leadership page at that instant
    valid_until: float

    @classmethod
    def from_message(cls, raw: bytes) -> Dispatch:
        headers = json.loads(raw)["headers"]
        stamp = datetime.fromisoformat(headers["leader_fire_time"])
        offset = stamp.utcoffset()
        assert offset is not None and offset.total_seconds() == 0, headers
        seconds = stamp.timestamp()
        assert seconds == int(seconds), f"fire time is not a whole second: {headers}"
        return cls(fire=int(seconds), term=int(headers["leader_term"]),
                   task_id=str(headers["id"]), at=float(headers["chaos_at"]),
                   pid=int(headers["chaos_pid"]), page_term=int(headers["chaos_page_term"]),
                   valid_until=float(headers["chaos_valid_until"]))


@dataclass
class DispatchReport:
    problems: list[str]
    first: int
    last: int
    count: int
    terms: list[int]
    missing: list[int]
    duplicates: dict[int, list[int]]  # fire second -> the terms that sent it

    def summary(self) -> str:
        return (f"{self.count} dispatches for fire times {self.first}..{self.last} "
                f"({self.last - self.first + 1} s), terms {self.terms}, "
                f"{len(self.duplicates)} duplicated, {len(self.missing)} missing")


def check_dispatches(dispatches: Iterable[Dispatch], contiguous: bool) -> DispatchReport:
    """What must hold of every dispatch record, whatever the faults were:

    - every fire time is dispatched once;
    - every dispatch happened while its publisher held a valid lease with that
      term on its own clock (the shared page names the term, and it was before
      the page's ``valid_until``);
    - terms never overlap: ordered by dispatch time, terms never decrease, so
      every dispatch of a term precedes every dispatch of a later term;
    - with ``contiguous`` (catch_up="all"), no fire time between the first and
      the last is missing.
    """
    records = sorted(dispatches, key=lambda d: d.at)
    problems: list[str] = []
    assert records, "no dispatch recorded"
    by_fire: dict[int, list[Dispatch]] = {}
    for record in records:
        by_fire.setdefault(record.fire, []).append(record)
    duplicates = {fire: [d.term for d in same] for fire, same in by_fire.items()
                  if len(same) > 1}
    for fire, same in sorted(duplicates.items()):
        problems.append(f"fire time {fire} dispatched {len(same)} times: {same}")
    for record in records:
        if record.page_term != record.term:
            problems.append(f"dispatch of {record.fire} under term {record.term} by pid "
                            f"{record.pid} while its page said term {record.page_term}")
        if not record.at < record.valid_until:
            problems.append(f"dispatch of {record.fire} under term {record.term} by pid "
                            f"{record.pid} at {record.at:.3f}, after its lease ended at "
                            f"{record.valid_until:.3f}")
    for before, after in itertools.pairwise(records):
        if after.term < before.term:
            problems.append(f"term {after.term} dispatched {after.fire} at {after.at:.3f}, "
                            f"after term {before.term} dispatched {before.fire} at "
                            f"{before.at:.3f}: the terms overlap")
    first, last = min(by_fire), max(by_fire)
    missing = [s for s in range(first, last + 1) if s not in by_fire]
    if contiguous and missing:
        problems.append(f"fire times never dispatched: {missing}")
    return DispatchReport(problems=problems, first=first, last=last, count=len(records),
                          terms=sorted({d.term for d in records}), missing=missing,
                          duplicates=duplicates)


@dataclass(frozen=True)
class Claim:
    run_id: str
    n: int
    pid: int
    ppid: int
    term: int
    result: str
    begin: float
    end: float
    page_term: int


# ---------------------------------------------------------------- the cluster


class ChaosCluster:
    """Replicas of tests.apps.chaos_app in one election, on one ChaosRedis."""

    def __init__(self, tmp_path: Path, server: ChaosRedis, election: str,
                 env: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.election = election
        self.env = dict(env or {})
        self.replicas: list[Replica] = []
        self.extra_pids: set[int] = set()  # pool children seen running the claimer
        self.client = server.client()

    # -- processes -------------------------------------------------------------

    def base_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("LEADER_", "CELERY_", "CHAOS_"))}
        env.update(REDIS_URL=self.server.url, LEADER_NAME=self.election,
                   LEADER_LEASE=str(LEASE), LEADER_RENEW=str(RENEW), LEADER_RETRY=str(RETRY),
                   PYTHONUNBUFFERED="1")
        env.update(self.env)
        env.update(extra or {})
        return env

    def start_replica(self) -> Replica:
        name = f"r{len(self.replicas) + 1}"
        port = free_port()
        wedge, freeze, lose = (self.tmp_path / f"{name}.{hook}"
                               for hook in ("wedge", "freeze", "lose-reply"))
        proxy = TcpProxy("127.0.0.1", self.server.port)  # stays valid across Redis restarts
        env = self.base_env({"REDIS_URL": proxy.url(self.server.url),
                             "CHAOS_EVENTS_URL": self.server.url,
                             "LEADER_HEALTHZ_PORT": str(port), "CHAOS_WEDGE_FILE": str(wedge),
                             "CHAOS_FREEZE_FILE": str(freeze),
                             "CHAOS_LOSE_REPLY_FILE": str(lose)})
        command = [sys.executable, "-m", "celery", "-A", APP, "worker", "--pool", "prefork",
                   "-c", "1", "-n", f"{name}@%h", "-l", "info", "--without-mingle",
                   "--without-gossip", "--without-heartbeat"]
        log_path = self.tmp_path / f"{name}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        replica = Replica(name, popen, log_path, port, wedge, freeze, lose, proxy)
        self.replicas.append(replica)
        return replica

    def wait_ready(self, replicas: Iterable[Replica], timeout: float = 45.0) -> None:
        pending = list(replicas)

        def ready() -> bool:
            for replica in pending:
                if not replica.alive():
                    raise AssertionError(f"{replica.describe()} exited before it was ready:\n"
                                         f"{replica.log()[-5000:]}")
            return all(" ready." in r.log() and r.healthz() is not None for r in pending)

        wait_until(ready, timeout, "replicas " + ", ".join(r.name for r in pending)
                   + " to be ready", self.logs)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive()]

    def by_pid(self, pid: int) -> Replica | None:
        return next((r for r in self.replicas if r.pid == pid), None)

    def stop(self, timeout: float = 10.0) -> None:
        """Every process this cluster started, by PID: SIGCONT, SIGTERM, wait, SIGKILL;
        partitions end first (nobody waits on a cut), every proxy is closed last."""
        for replica in self.replicas:
            replica.proxy.reset()
        for replica in self.replicas:
            for hook in (replica.wedge_file, replica.freeze_file, replica.lose_reply_file):
                with contextlib.suppress(OSError):
                    hook.unlink(missing_ok=True)
        groups = {r.pid: group_pids(r.pid) for r in self.replicas}
        everyone = {pid for pids in groups.values() for pid in pids}
        everyone |= {pid for pid in self.extra_pids if pid_alive(pid)}
        for pid in everyone:
            send(pid, signal.SIGCONT)
        mains = [r for r in self.replicas if r.alive()]
        for replica in mains:
            replica.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for replica in mains:
            try:
                replica.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                replica.popen.send_signal(signal.SIGKILL)
                replica.popen.wait(10)
        # Pool children and orphans that outlived their main process.
        leftovers = {pid for pgid in groups for pid in group_pids(pgid)}
        leftovers |= {pid for pid in self.extra_pids if pid_alive(pid)}
        for pid in leftovers:
            send(pid, signal.SIGKILL)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not any(pid_alive(p) for p in leftovers), 10, "leftovers")
        for replica in self.replicas:
            replica.proxy.close()
        self.client.close()

    def logs(self, tail: int = 6000) -> str:
        return "\n".join(f"===== {r.describe()} {r.log_path} =====\n{r.log()[-tail:]}"
                         for r in self.replicas)

    # -- the election as Redis sees it -----------------------------------------

    def key(self, suffix: str) -> str:
        return f"{KEY_PREFIX}:{{{self.election}}}:{suffix}"

    def lease(self) -> dict[str, Any] | None:
        try:
            raw = self.client.get(self.key("lease"))
        except redis.RedisError:
            return None
        return None if raw is None else dict(json.loads(raw))

    def leader(self) -> tuple[Replica, int] | None:
        """The live replica holding the lease, and its term."""
        lease = self.lease()
        if not lease or not lease.get("holderIdentity"):
            return None
        replica = self.by_pid(int(str(lease["holderIdentity"]).rsplit(":", 1)[1]))
        if replica is None or not replica.alive() or replica.stopped:
            return None
        return replica, int(lease["term"])

    def wait_leader(self, timeout: float = 20.0, after_term: int = 0,
                    not_pid: int = 0) -> tuple[Replica, int, float]:
        """A live leader with a term above ``after_term``; (replica, term, seen at)."""

        def found() -> tuple[Replica, int, float] | None:
            current = self.leader()
            if current and current[1] > after_term and current[0].pid != not_pid:
                return current[0], current[1], time.monotonic()
            return None

        return wait_until(found, timeout, f"a leader with a term above {after_term} "
                          f"other than pid {not_pid}", self.describe_state)

    def describe_state(self) -> str:
        return (f"lease: {self.lease()}\nreplicas: "
                + ", ".join(r.describe() for r in self.replicas))

    # -- records -----------------------------------------------------------------

    def dispatches(self, latest: int = 0) -> list[Dispatch]:
        """Tick messages in the broker (the newest ``latest`` only, if given)."""
        raw = self.client.lrange(TICK_QUEUE, 0, latest - 1 if latest else -1)
        return [Dispatch.from_message(item) for item in raw]

    def pending(self) -> int:
        return int(self.client.hlen(self.key("schedule:pending")))

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        events = [json.loads(raw) for raw in self.client.lrange(EVENTS_KEY, 0, -1)]
        return [e for e in events if kind is None or e["kind"] == kind]

    def claims(self, run_id: str | None = None) -> list[Claim]:
        claims = []
        for raw in self.client.lrange(CLAIMS_KEY, 0, -1):
            data = json.loads(raw)
            if run_id is None or data["run_id"] == run_id:
                claims.append(Claim(run_id=data["run_id"], n=data["n"], pid=data["pid"],
                                    ppid=data["ppid"], term=data["term"],
                                    result=data["result"], begin=data["begin"],
                                    end=data["end"], page_term=data["page_term"]))
        return claims


# ---------------------------------------------------------------- leader-only traffic


class LeaderTraffic(threading.Thread):
    """Sends the leader-only ``noop`` task every ``every`` seconds from a plain
    Celery app (no celery_leader.install) for as long as the sequence runs.  A
    publish that fails (Redis down or paused) is sent again with the same task id
    until it succeeds: a message counts as sent once a publish of it returned."""

    def __init__(self, redis_url: str, every: float = 0.1) -> None:
        super().__init__(name="chaos-leader-traffic", daemon=True)
        self.app = Celery("chaos-traffic", broker=redis_url, set_as_current=False)
        self.app.conf.broker_connection_retry_on_startup = True
        self.every = every
        self.sent: dict[str, str] = {}  # task id -> label
        self.at: dict[str, float] = {}  # label -> monotonic time of its first publish
        self.failed_publishes = 0
        self.done = threading.Event()

    def run(self) -> None:
        index = 0
        while not self.done.is_set():
            label, task_id = f"m{index}", str(uuid.uuid4())
            self.at[label] = time.monotonic()
            while True:
                try:
                    self.app.send_task(NOOP_TASK, args=[label], queue=LEADER_QUEUE,
                                       task_id=task_id)
                except Exception:
                    self.failed_publishes += 1
                    if self.done.wait(0.2):
                        break  # given up at the end: it may or may not be in Redis
                    continue
                self.sent[task_id] = label
                break
            index += 1
            self.done.wait(self.every)

    def stop(self) -> dict[str, str]:
        self.done.set()
        self.join(30.0)
        self.app.close()
        return dict(self.sent)

    def runs(self, cluster: ChaosCluster) -> list[dict[str, Any]]:
        return [e for e in cluster.events("leader_run") if e["task_id"] in self.sent]
