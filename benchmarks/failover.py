"""Elector fail-over benchmark: crash fail-over, graceful hand-over, Redis load.

Runs ``--replicas`` electors, one per process (benchmarks/_elector_process.py),
against its own throw-away redis-server (or ``--redis-url``), and prints a
markdown report on stdout (progress goes to stderr):

- crash fail-over: SIGKILL of the leader process -> another process's
  ``on_started_leading``;
- graceful hand-over: SIGTERM of the leader (``elector.stop()``,
  ``release_on_cancel=True``) -> another process's ``on_started_leading``,
  also measured from the release request;
- Redis round trips per second and per retry period for a leader and for a
  follower, from ``INFO commandstats`` deltas (a window with the leader alone,
  then one with leader + followers) and from client-side counts per process.

Every time is a ``time.monotonic()`` stamp (CLOCK_MONOTONIC, one clock for all
processes on Linux) taken in the process where the event happened.  Every
process is stopped by PID on exit, Ctrl-C included.

    .venv/bin/python benchmarks/failover.py [--runs 20] [--replicas 3]
        [--lease 3.0 --renew 2.0 --retry 0.5] [--redis-url redis://...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve().parent / "_elector_process.py"
if str(ROOT) not in sys.path:  # benchmark the working tree, installed or not
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from celery_leader.config import JITTER_FACTOR  # noqa: E402
from celery_leader.embedded import EmbeddedRedis  # noqa: E402

# Commands a client sends itself (one each = one round trip).  Everything else
# in commandstats was called from inside a Lua script (TYPE, GET, PTTL, SET,
# HINCRBY, TIME, PUBLISH, DEL), except what this benchmark sends (INFO).
TOP_LEVEL = {"evalsha", "eval", "evalsha_ro", "eval_ro", "script", "subscribe",
             "unsubscribe", "psubscribe", "punsubscribe", "ping", "hello", "client",
             "select", "auth", "readonly"}
OWN = {"info"}


class BenchmarkError(RuntimeError):
    pass


@dataclass(frozen=True)
class Timings:
    lease: float
    renew: float
    retry: float


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    t: float
    ident: str
    details: tuple[str, ...]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------- processes


class Fleet:
    """Elector processes of one election, and every event they printed."""

    def __init__(self, redis_url: str, name: str, timings: Timings, log_dir: str) -> None:
        self.redis_url = redis_url
        self.name = name
        self.timings = timings
        self.log_dir = log_dir
        self.events: list[Event] = []
        self.cond = threading.Condition()
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self._readers: list[threading.Thread] = []
        self._spawned = 0

    def spawn(self) -> str:
        ident = f"{self.name}-r{self._spawned}"
        self._spawned += 1
        t = self.timings
        cmd = [sys.executable, str(HELPER), "--redis-url", self.redis_url, "--name", self.name,
               "--identity", ident, "--lease", repr(t.lease), "--renew", repr(t.renew),
               "--retry", repr(t.retry)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        with open(os.path.join(self.log_dir, f"{ident}.stderr"), "ab") as stderr:
            # Own session: a Ctrl-C reaches only this process, which then
            # stops the children by PID.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                    bufsize=1, env=env, start_new_session=True)
        self.procs[ident] = proc
        assert proc.stdout is not None
        reader = threading.Thread(target=self._read, args=(ident, proc.stdout), daemon=True)
        reader.start()
        self._readers.append(reader)
        return ident

    def _read(self, ident: str, stream: IO[str]) -> None:
        for line in stream:
            parts = line.split()
            if len(parts) < 4 or parts[0] != "EV":
                continue
            self._append(parts[1], float(parts[2]), parts[3], tuple(parts[4:]))
        self._append("EOF", time.monotonic(), ident, ())

    def _append(self, kind: str, t: float, ident: str, details: tuple[str, ...]) -> None:
        with self.cond:
            self.events.append(Event(len(self.events), kind, t, ident, details))
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.events)

    def wait_for(self, pred: Callable[[Event], bool], timeout: float, what: str,
                 since: int = 0) -> Event:
        deadline = time.monotonic() + timeout
        index = since
        with self.cond:
            while True:
                while index < len(self.events):
                    event = self.events[index]
                    index += 1
                    if pred(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchmarkError(f"timed out after {timeout:.1f}s waiting for {what} "
                                         f"(logs in {self.log_dir})")
                self.cond.wait(remaining)

    def find(self, pred: Callable[[Event], bool], since: int = 0) -> list[Event]:
        with self.cond:
            return [e for e in self.events[since:] if pred(e)]

    def alive(self) -> list[str]:
        return [ident for ident, proc in self.procs.items() if proc.poll() is None]

    def send(self, ident: str, sig: int) -> float:
        """Signal one process by PID; returns the monotonic time just before."""
        proc = self.procs[ident]
        sent = time.monotonic()
        os.kill(proc.pid, sig)
        return sent

    def reap(self, ident: str, timeout: float) -> None:
        proc = self.procs[ident]
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"  {ident} (pid {proc.pid}) did not exit in {timeout:.1f}s; killing it")
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        """SIGTERM every live process by PID, then SIGKILL what is left after a deadline."""
        live = [(ident, proc) for ident, proc in self.procs.items() if proc.poll() is None]
        for _, proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.timings.renew + 5.0
        for ident, proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"  {ident} (pid {proc.pid}) ignored SIGTERM; killing it")
                proc.kill()
                proc.wait()
        for reader in self._readers:
            reader.join(timeout=2.0)


@contextlib.contextmanager
def fleet_of(redis_url: str, phase: str, timings: Timings, log_dir: str) -> Iterator[Fleet]:
    fleet = Fleet(redis_url, f"bench-{phase}-{uuid.uuid4().hex[:6]}", timings, log_dir)
    try:
        yield fleet
    finally:
        fleet.stop_all()


def wait_leader(fleet: Fleet, timings: Timings, since: int = 0,
                not_ident: str | None = None) -> Event:
    timeout = 2 * timings.lease + 2 * (1 + JITTER_FACTOR) * timings.retry + 10.0
    return fleet.wait_for(lambda e: e.kind == "STARTED" and e.ident != not_ident, timeout,
                          "a new leader", since)


def settle(fleet: Fleet, leader: str, since: int, timings: Timings, rng: random.Random) -> None:
    """Wait until every live follower is subscribed and has seen ``leader``,
    then for a random part of a renew cycle so kills hit a random phase."""
    timeout = 2 * (1 + JITTER_FACTOR) * timings.retry + 10.0
    for ident in fleet.alive():
        if ident == leader:
            continue
        fleet.wait_for(lambda e, i=ident: e.ident == i and e.kind == "WAKE", timeout,
                       f"{ident} to subscribe")
        fleet.wait_for(lambda e, i=ident: (e.ident == i and e.kind == "NEWLEADER"
                                           and e.details[:1] == (leader,)),
                       timeout, f"{ident} to observe {leader}", since)
    time.sleep(rng.uniform(timings.retry, 2 * timings.retry))


# --------------------------------------------------------------------- phases


@dataclass
class CrashResults:
    failover: list[float] = field(default_factory=list)  # kill -> started
    from_renew: list[float] = field(default_factory=list)  # last renew -> started
    phase: list[float] = field(default_factory=list)  # last renew -> kill


def run_crash(fleet: Fleet, replicas: int, runs: int, timings: Timings,
              rng: random.Random) -> CrashResults:
    results = CrashResults()
    for _ in range(replicas):
        fleet.spawn()
    leader = wait_leader(fleet, timings).ident
    since = 0
    for run in range(runs):
        settle(fleet, leader, since, timings, rng)
        since = fleet.mark()
        killed_at = fleet.send(leader, signal.SIGKILL)
        new = wait_leader(fleet, timings, since, not_ident=leader)
        renews = fleet.find(lambda e, i=leader, k=killed_at: e.ident == i
                            and e.kind == "WRITE" and e.t < k)
        last_renew = renews[-1].t
        results.failover.append(new.t - killed_at)
        results.from_renew.append(new.t - last_renew)
        results.phase.append(killed_at - last_renew)
        log(f"  crash {run + 1}/{runs}: {leader} killed {killed_at - last_renew:.3f}s after "
            f"its last renew; {new.ident} leads {new.t - killed_at:.3f}s later")
        fleet.reap(leader, 5.0)
        fleet.spawn()
        leader = new.ident
    return results


@dataclass
class GracefulResults:
    total: list[float] = field(default_factory=list)  # SIGTERM sent -> started
    from_signal: list[float] = field(default_factory=list)  # SIGTERM received -> started
    stop_to_release: list[float] = field(default_factory=list)  # received -> release sent
    release_rtt: list[float] = field(default_factory=list)  # release sent -> answered
    release_to_wake: list[float] = field(default_factory=list)  # release sent -> follower woke
    wake_to_started: list[float] = field(default_factory=list)
    wake_to_write: list[float] = field(default_factory=list)  # woke -> CREATE sent
    write_to_started: list[float] = field(default_factory=list)  # CREATE sent -> started
    from_release: list[float] = field(default_factory=list)  # release sent -> started
    not_released: int = 0
    overlaps: int = 0


def run_graceful(fleet: Fleet, replicas: int, runs: int, timings: Timings,
                 rng: random.Random) -> GracefulResults:
    results = GracefulResults()
    for _ in range(replicas):
        fleet.spawn()
    leader = wait_leader(fleet, timings).ident
    since = 0
    for run in range(runs):
        settle(fleet, leader, since, timings, rng)
        since = fleet.mark()
        sent = fleet.send(leader, signal.SIGTERM)
        new = wait_leader(fleet, timings, since, not_ident=leader)
        fleet.wait_for(lambda e, i=leader: e.ident == i and e.kind == "EOF",
                       timings.renew + timings.lease + 10.0, f"{leader} to exit", since)
        fleet.reap(leader, 5.0)

        def first(kind: str, ident: str = leader, after: float = 0.0,
                  since: int = since) -> Event | None:
            found = fleet.find(lambda e: e.ident == ident and e.kind == kind and e.t >= after,
                               since)
            return found[0] if found else None

        received = first("SIGNAL")
        stopped = first("STOPPED")
        begin = first("RELEASE_BEGIN")
        end = first("RELEASE_END")
        results.total.append(new.t - sent)
        if stopped is not None and new.t < stopped.t:
            results.overlaps += 1
        if received is not None:
            results.from_signal.append(new.t - received.t)
        note = ""
        if begin is None or end is None or end.details[:1] != ("1",):
            results.not_released += 1
            note = " (no release: lease expired)"
        else:
            results.from_release.append(new.t - begin.t)
            results.release_rtt.append(end.t - begin.t)
            if received is not None:
                results.stop_to_release.append(begin.t - received.t)
            wake = first("WAKE", new.ident, after=begin.t)
            if wake is not None and wake.t <= new.t:
                results.release_to_wake.append(wake.t - begin.t)
                results.wake_to_started.append(new.t - wake.t)
                write = first("WRITE", new.ident, after=wake.t)
                if write is not None and write.t <= new.t:
                    results.wake_to_write.append(write.t - wake.t)
                    results.write_to_started.append(new.t - write.t)
        log(f"  hand-over {run + 1}/{runs}: {leader} -> {new.ident} in "
            f"{(new.t - sent) * 1000:.1f} ms{note}")
        fleet.spawn()
        leader = new.ident
    return results


@dataclass
class Window:
    seconds: float
    server: dict[str, int]  # command -> calls during the window
    client: dict[str, tuple[int, float]]  # ident -> (round trips, seconds)
    leader_changes: int

    def top_level(self) -> int:
        return sum(n for cmd, n in self.server.items() if cmd in TOP_LEVEL)

    def in_scripts(self) -> int:
        return sum(n for cmd, n in self.server.items() if cmd not in TOP_LEVEL | OWN)


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in stats.items()}


def client_counts(fleet: Fleet, idents: Sequence[str]) -> dict[str, tuple[int, float]]:
    since = fleet.mark()
    for ident in idents:
        fleet.send(ident, signal.SIGUSR1)
    counts = {}
    for ident in idents:
        event = fleet.wait_for(lambda e, i=ident: e.ident == i and e.kind == "COUNTS", 10.0,
                               f"round-trip counts from {ident}", since)
        counts[ident] = (sum(json.loads(event.details[0]).values()), event.t)
    return counts


def measure(fleet: Fleet, client: redis.Redis, idents: Sequence[str], seconds: float) -> Window:
    since = fleet.mark()
    before_client = client_counts(fleet, idents)
    before = commandstats(client)
    started = time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    after = commandstats(client)
    elapsed = time.monotonic() - started
    after_client = client_counts(fleet, idents)
    server = {cmd: after.get(cmd, 0) - before.get(cmd, 0) for cmd in set(before) | set(after)}
    server = {cmd: n for cmd, n in server.items() if n}
    per_client = {ident: (after_client[ident][0] - before_client[ident][0],
                          after_client[ident][1] - before_client[ident][1])
                  for ident in idents}
    changes = len(fleet.find(lambda e: e.kind in ("STARTED", "STOPPED"), since))
    return Window(elapsed, server, per_client, changes)


@dataclass
class LoadResults:
    alone: Window
    together: Window
    leader: str
    followers: list[str]


def run_load(fleet: Fleet, client: redis.Redis, replicas: int, window: float,
             timings: Timings, rng: random.Random) -> LoadResults:
    leader = fleet.spawn()
    wait_leader(fleet, timings)
    time.sleep(2 * timings.retry)  # let the first SCRIPT LOADs and connects pass
    log(f"  measuring the leader alone for {window:.1f}s")
    alone = measure(fleet, client, [leader], window)
    followers = [fleet.spawn() for _ in range(replicas - 1)]
    settle(fleet, leader, 0, timings, rng)
    time.sleep(2 * (1 + JITTER_FACTOR) * timings.retry)  # past every follower's first poll
    log(f"  measuring the leader with {len(followers)} follower(s) for {window:.1f}s")
    together = measure(fleet, client, [leader, *followers], window)
    return LoadResults(alone, together, leader, followers)


# --------------------------------------------------------------------- report


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def fmt(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "n/a"
    if abs(seconds) < 1.0:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.3f} s"


def stats_row(label: str, values: Sequence[float], target: str = "",
              ok: bool | None = None) -> str:
    verdict = "" if ok is None else ("meets" if ok else "**misses**")
    return (f"| {label} | {len(values)} | {fmt(percentile(values, 50))} | "
            f"{fmt(percentile(values, 99))} | {fmt(max(values) if values else float('nan'))} | "
            f"{target} | {verdict} |")


def report_crash(r: CrashResults, t: Timings) -> list[str]:
    target = 1.1 * t.lease
    p99 = percentile(r.failover, 99)
    overhead = [x - t.lease for x in r.from_renew]
    return [
        "### Crash fail-over (SIGKILL of the leader process)",
        "",
        "| measurement | n | p50 | p99 | max | target | verdict |",
        "|---|---|---|---|---|---|---|",
        stats_row("SIGKILL → another process's on_started_leading", r.failover,
                  f"p99 ≤ 1.1 x lease = {fmt(target)}", p99 <= target),
        stats_row("leader's last renew request → kill (random phase)", r.phase),
        stats_row("last renew request → new on_started_leading", r.from_renew),
        stats_row("  of which beyond one lease (detection delay)", overhead),
        "",
    ]


def report_graceful(r: GracefulResults) -> list[str]:
    target = 0.050
    p99 = percentile(r.total, 99)
    lines = [
        "### Graceful hand-over (SIGTERM → `elector.stop()`, release_on_cancel=True)",
        "",
        "| measurement | n | p50 | p99 | max | target | verdict |",
        "|---|---|---|---|---|---|---|",
        stats_row("SIGTERM sent → another process's on_started_leading", r.total,
                  f"p99 ≤ {fmt(target)}", p99 <= target),
        stats_row("release request sent → new on_started_leading", r.from_release),
        stats_row("  SIGTERM received → release request sent", r.stop_to_release),
        stats_row("  release round trip (DEL + PUBLISH script)", r.release_rtt),
        stats_row("  release sent → new leader's pub/sub wake-up", r.release_to_wake),
        stats_row("  wake-up → on_started_leading (GET + CREATE scripts)", r.wake_to_started),
        stats_row("    wake-up → CREATE request sent (incl. GET script)", r.wake_to_write),
        stats_row("    CREATE request sent → on_started_leading", r.write_to_started),
        stats_row("SIGTERM received → new on_started_leading", r.from_signal),
        "",
        f"Hand-overs without a successful release (fell back to lease expiry): "
        f"{r.not_released}; new leader started before the old one stopped: {r.overlaps}.",
        "",
    ]
    return lines


def report_load(r: LoadResults, t: Timings) -> list[str]:
    k = len(r.followers)
    alone, together = r.alone, r.together
    leader_rate = alone.top_level() / alone.seconds
    total_rate = together.top_level() / together.seconds
    follower_rate = (total_rate - leader_rate) / k if k else float("nan")
    lua_leader = alone.in_scripts() / alone.seconds
    lua_followers = ((together.in_scripts() / together.seconds - lua_leader) / k
                     if k else float("nan"))

    def rt_row(label: str, rate: float, seconds: float, lua: float | None = None) -> str:
        per_period = rate * t.retry
        lua_text = f"{lua:.2f}" if lua is not None else ""
        # One count more or less is where the window's edges fall, not a cost.
        slack = t.retry / seconds
        verdict = "meets" if per_period <= 1.0 + slack else "**misses**"
        return f"| {label} | {rate:.2f} | {per_period:.2f} | {lua_text} | ≤ 1 | {verdict} |"

    lines = [
        "### Redis round trips",
        "",
        f"Windows of {alone.seconds:.1f} s (leader alone) and {together.seconds:.1f} s "
        f"(leader + {k} follower(s)); leadership changes during the windows: "
        f"{alone.leader_changes + together.leader_changes}.",
        "",
        "| replica | round trips / s | round trips / retry period | commands inside "
        "scripts / s | target (per retry period) | verdict |",
        "|---|---|---|---|---|---|",
        rt_row("leader (server: commandstats, leader alone)", leader_rate, alone.seconds,
               lua_leader),
        rt_row("follower, each (server: (together - alone) / followers)", follower_rate,
               together.seconds, lua_followers),
    ]
    for ident, (count, seconds) in together.client.items():
        role = "leader" if ident == r.leader else "follower"
        lines.append(rt_row(f"{role} {ident} (client-side count)", count / seconds, seconds))
    lines += [
        "",
        f"A verdict allows one count of window-edge quantization "
        f"(+{t.retry / together.seconds:.3f} per retry period). Expected: a leader renews "
        f"once per retry period plus a round trip (just under 1); a follower polls once per "
        f"jittered period, on average {1 + JITTER_FACTOR / 2:.1f} retry periods "
        f"({1 / (1 + JITTER_FACTOR / 2):.3f} per retry period).",
        "",
        "Server-side calls during the windows (`INFO commandstats` deltas; the "
        "benchmark's own INFO excluded):",
        "",
        "| command | leader alone | leader + followers | sent by |",
        "|---|---|---|---|",
    ]
    for cmd in sorted((set(alone.server) | set(together.server)) - OWN):
        origin = "client (1 round trip each)" if cmd in TOP_LEVEL else "inside a Lua script"
        lines.append(f"| {cmd} | {alone.server.get(cmd, 0)} | {together.server.get(cmd, 0)} "
                     f"| {origin} |")
    idle = sum(together.server.get(c, 0) for c in ("subscribe", "ping", "psubscribe"))
    lines += ["", f"Pub/sub traffic of idle subscriptions during the windows: {idle} commands.",
              ""]
    return lines


def machine(client: redis.Redis) -> str:
    server: dict[str, Any] = client.info("server")
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} CPUs (`nproc`: {len(os.sched_getaffinity(0))})"
            f"{', ' + cpu if cpu else ''}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; redis-py {redis.__version__}; "
            f"redis-server {server.get('redis_version')}")


# --------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per fail-over kind")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--lease", type=float, default=3.0, help="lease_duration, seconds")
    parser.add_argument("--renew", type=float, default=2.0, help="renew_deadline, seconds")
    parser.add_argument("--retry", type=float, default=0.5, help="retry_period, seconds")
    parser.add_argument("--window", type=float, default=None,
                        help="load measurement window, seconds (default 30 retry periods)")
    parser.add_argument("--phases", default="crash,graceful,load",
                        help="comma-separated subset of crash,graceful,load")
    parser.add_argument("--redis-url", default=None,
                        help="use this Redis instead of starting one (commandstats are "
                             "server-wide: other traffic there skews the load numbers)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (someone has to take over)")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not phases or phases - {"crash", "graceful", "load"}:
        parser.error(f"--phases: unknown phase(s) in {args.phases!r}")
    args.phases = phases
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM cleans up like Ctrl-C: every process started is stopped by PID.
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background
        signal.signal(signal.SIGINT, _interrupt)
    timings = Timings(args.lease, args.renew, args.retry)
    # Reject bad timings here, before any process starts.
    if not (timings.lease > timings.renew > JITTER_FACTOR * timings.retry > 0):
        raise SystemExit(f"need lease > renew > {JITTER_FACTOR} x retry > 0, got {timings}")
    window = args.window if args.window is not None else 30 * timings.retry
    rng = random.Random(args.seed)
    log_dir = tempfile.mkdtemp(prefix="celery-leader-bench-")
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                          *(sys.argv[1:] if argv is None else argv)])
    server: EmbeddedRedis | None = None
    client: redis.Redis | None = None
    sections: list[str] = []
    started = time.monotonic()
    try:
        if args.redis_url:
            url = args.redis_url
        else:
            server = EmbeddedRedis().start()
            url = server.url
        client = redis.Redis.from_url(url)
        log(f"redis at {url}; child stderr in {log_dir}")
        if "crash" in args.phases:
            log(f"crash fail-over: {args.runs} runs, {args.replicas} replicas")
            with fleet_of(url, "crash", timings, log_dir) as fleet:
                crash = run_crash(fleet, args.replicas, args.runs, timings, rng)
            sections += report_crash(crash, timings)
        if "graceful" in args.phases:
            log(f"graceful hand-over: {args.runs} runs, {args.replicas} replicas")
            with fleet_of(url, "graceful", timings, log_dir) as fleet:
                graceful = run_graceful(fleet, args.replicas, args.runs, timings, rng)
            sections += report_graceful(graceful)
        if "load" in args.phases:
            log("redis load")
            with fleet_of(url, "load", timings, log_dir) as fleet:
                load = run_load(fleet, client, args.replicas, window, timings, rng)
            sections += report_load(load, timings)
        header = [
            f"Command: `{command}`",
            "",
            f"Timings: lease_duration {timings.lease:g} s, renew_deadline {timings.renew:g} s, "
            f"retry_period {timings.retry:g} s; {args.replicas} replicas, one process each; "
            f"{args.runs} runs per fail-over kind; Redis on loopback"
            f"{' (' + url + ')' if args.redis_url else ' (embedded redis-server)'}.",
            "",
            f"Machine: {machine(client)}. Wall time: {time.monotonic() - started:.0f} s.",
            "",
        ]
        print("\n".join(header + sections))
        shutil.rmtree(log_dir, ignore_errors=True)  # kept only when something failed
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping every process started")
        return 130
    except BenchmarkError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
