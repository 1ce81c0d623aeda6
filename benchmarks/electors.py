"""Redis cost of many electors on one Redis.

For each N in ``--counts`` and each mode in ``--modes``, runs N electors as
threads spread over several processes (benchmarks/_electors_worker.py; each
elector has its own client, RedisLock, LeaderElector and pub/sub
subscription) against one throw-away redis-server (or ``--redis-url``):

- ``shared``: one election name for all, so 1 leader + N-1 followers;
- ``distinct``: N election names, so N leaders.

Once every elector runs, every connection is up and leadership is stable, it
measures over ``--window`` seconds (deltas, never instantaneous values):
``INFO commandstats`` calls (all, and client round trips only), client-side
round trips, redis-server CPU (``used_cpu_user + used_cpu_sys``) and the
client processes' CPU (/proc/PID/stat).  Prints a markdown table on stdout,
progress on stderr.  Every process is stopped by PID on exit, Ctrl-C included.

    .venv/bin/python benchmarks/electors.py [--counts 10,100,1000]
        [--modes shared,distinct] [--window 30] [--per-process 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
WORKER = HERE / "_electors_worker.py"
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import redis  # noqa: E402
from failover import OWN, TOP_LEVEL, machine  # noqa: E402

from celery_leader.config import JITTER_FACTOR  # noqa: E402
from celery_leader.embedded import EmbeddedRedis  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchmarkError(RuntimeError):
    pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Result:
    n: int
    mode: str
    processes: int
    seconds: float
    all_calls: int
    round_trips: int  # server-side, top-level commands only
    evalsha: int
    client_round_trips: int
    redis_cpu: float  # seconds
    client_cpu: float  # seconds, all worker processes
    clients: int
    leaders_before: int
    leaders_after: int
    holders_changed: int
    calls: dict[str, int]


class Worker:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.cond = threading.Condition()
        assert proc.stdout is not None
        self.reader = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self.cond:
                self.lines.append(line.strip())
                self.cond.notify_all()
        with self.cond:
            self.lines.append("EOF")
            self.cond.notify_all()

    def wait_line(self, prefix: str, since: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[since:]:
                    if line.startswith(prefix):
                        return line
                    if line == "EOF":
                        raise BenchmarkError(f"worker {self.proc.pid} exited early")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchmarkError(f"worker {self.proc.pid}: no {prefix} in {timeout}s")
                self.cond.wait(remaining)

    def counts(self, timeout: float = 10.0) -> dict[str, Any]:
        with self.cond:
            since = len(self.lines)
        os.kill(self.proc.pid, signal.SIGUSR1)
        return dict(json.loads(self.wait_line("COUNTS ", since, timeout).split(" ", 1)[1]))

    def cpu(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def stop_workers(workers: list[Worker], grace: float) -> None:
    live = [w for w in workers if w.proc.poll() is None]
    for w in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for w in live:
        try:
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"  worker {w.proc.pid} ignored SIGTERM; killing it")
            w.proc.kill()
            w.proc.wait()
    for w in workers:
        w.reader.join(timeout=2.0)


def holders(client: redis.Redis, keys: list[str]) -> list[tuple[str, int] | None]:
    out: list[tuple[str, int] | None] = []
    for start in range(0, len(keys), 500):
        for raw in client.mget(keys[start:start + 500]):
            if raw is None:
                out.append(None)
                continue
            record = json.loads(raw)
            out.append((record.get("holderIdentity", ""), int(record.get("term", 0))))
    return out


def server_snapshot(client: redis.Redis) -> tuple[dict[str, int], float]:
    stats = client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    cpu = client.info("cpu")
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def run_one(url: str, client: redis.Redis, n: int, mode: str, args: argparse.Namespace,
            log_dir: str) -> Result:
    name = f"bench-many-{uuid.uuid4().hex[:6]}"
    per = max(1, args.per_process)
    chunks = [(first, min(per, n - first)) for first in range(0, n, per)]
    names = [name] if mode == "shared" else [f"{name}-{i}" for i in range(n)]
    keys = [f"celery-leader:{{{nm}}}:lease" for nm in names]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    workers: list[Worker] = []
    baseline_clients = int(client.info("clients")["connected_clients"])
    try:
        for first, count in chunks:
            cmd = [sys.executable, str(WORKER), "--redis-url", url, "--name", name,
                   "--names", mode, "--first", str(first), "--count", str(count),
                   "--lease", repr(args.lease), "--renew", repr(args.renew),
                   "--retry", repr(args.retry), "--spread", repr(args.spread)]
            with open(os.path.join(log_dir, f"{name}-{first}.stderr"), "ab") as stderr:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                        bufsize=1, env=env, start_new_session=True)
            workers.append(Worker(proc))
        for w in workers:
            w.wait_line("READY", 0, 60.0 + args.spread)
        # Every elector connected twice (command + pub/sub), leadership settled.
        expected_clients = baseline_clients + 2 * n
        expected_leaders = 1 if mode == "shared" else n
        deadline = time.monotonic() + 2 * args.lease + 30.0
        while True:
            connected = int(client.info("clients")["connected_clients"])
            held = [h for h in holders(client, keys) if h is not None]
            if connected >= expected_clients and len(held) == expected_leaders:
                break
            if time.monotonic() > deadline:
                raise BenchmarkError(f"N={n} {mode}: {connected}/{expected_clients} clients, "
                                     f"{len(held)}/{expected_leaders} leases held")
            time.sleep(0.5)
        # Past every follower's first (jittered) poll and the leaders' first renews.
        time.sleep(args.retry * (1 + JITTER_FACTOR) + 1.0)
        before = holders(client, keys)
        leaders_before = sum(int(w.counts()["leaders"]) for w in workers)
        cnt0 = [w.counts()["counts"] for w in workers]
        cpu0 = [w.cpu() for w in workers]
        calls0, rcpu0 = server_snapshot(client)
        t0 = time.monotonic()
        log(f"  N={n} {mode}: measuring {args.window:.0f}s "
            f"({len(workers)} processes, {connected} clients)")
        time.sleep(args.window)
        calls1, rcpu1 = server_snapshot(client)
        t1 = time.monotonic()
        cpu1 = [w.cpu() for w in workers]
        cnt1 = [w.counts()["counts"] for w in workers]
        clients_now = int(client.info("clients")["connected_clients"])
        leaders_after = sum(int(w.counts()["leaders"]) for w in workers)
        after = holders(client, keys)
        changed = sum(1 for b, a in zip(before, after, strict=True) if b != a)
        delta = {c: calls1.get(c, 0) - calls0.get(c, 0) for c in set(calls1) | set(calls0)}
        delta = {c: v for c, v in delta.items() if v and c not in OWN}
        client_rt = sum(sum(c1.values()) - sum(c0.values())
                        for c0, c1 in zip(cnt0, cnt1, strict=True))
        return Result(
            n=n, mode=mode, processes=len(workers), seconds=t1 - t0,
            all_calls=sum(delta.values()),
            round_trips=sum(v for c, v in delta.items() if c in TOP_LEVEL),
            evalsha=delta.get("evalsha", 0), client_round_trips=client_rt,
            redis_cpu=rcpu1 - rcpu0,
            client_cpu=sum(b - a for a, b in zip(cpu0, cpu1, strict=True)),
            clients=clients_now - baseline_clients,
            leaders_before=leaders_before, leaders_after=leaders_after,
            holders_changed=changed, calls=delta)
    finally:
        stop_workers(workers, args.renew + 10.0)


def report(results: list[Result], retry: float) -> list[str]:
    lines = [
        "| N | mode | processes | commands/s: all / round trips (server) | client round "
        "trips/s | round trips per retry period per elector | redis CPU, % of one core | "
        "clients' CPU, % of one core | connections | leaders (changes in window) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.seconds
        per = r.round_trips / s / r.n * retry
        client_per = r.client_round_trips / s / r.n * retry
        lines.append(
            f"| {r.n} | {r.mode} | {r.processes} | {r.all_calls / s:.1f} / "
            f"{r.round_trips / s:.1f} | {r.client_round_trips / s:.1f} | "
            f"{per:.3f} (client-side {client_per:.3f}) | {100 * r.redis_cpu / s:.2f} | "
            f"{100 * r.client_cpu / s:.1f} | {r.clients} | "
            f"{r.leaders_after} ({r.holders_changed}) |")
    lines += ["", "Server-side calls per second during each window (`INFO commandstats` "
              "deltas, the benchmark's own INFO excluded; all but the client round trips "
              "run inside Lua scripts):", ""]
    cmds = sorted({c for r in results for c in r.calls})
    lines.append("| N | mode | " + " | ".join(cmds) + " |")
    lines.append("|---|---|" + "---|" * len(cmds))
    for r in results:
        lines.append(f"| {r.n} | {r.mode} | " + " | ".join(
            f"{r.calls.get(c, 0) / r.seconds:.1f}" for c in cmds) + " |")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="10,100,1000", help="comma-separated N values")
    parser.add_argument("--modes", default="shared,distinct",
                        help="comma-separated subset of shared,distinct")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per measurement")
    parser.add_argument("--per-process", type=int, default=100, help="electors per process")
    parser.add_argument("--spread", type=float, default=2.0,
                        help="each process starts its electors over this many seconds")
    parser.add_argument("--lease", type=float, default=15.0)
    parser.add_argument("--renew", type=float, default=10.0)
    parser.add_argument("--retry", type=float, default=2.0)
    parser.add_argument("--redis-url", default=None,
                        help="use this Redis instead of starting one (commandstats and CPU "
                             "are server-wide: other traffic there skews the numbers)")
    args = parser.parse_args(argv)
    args.counts = [int(c) for c in args.counts.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.counts or min(args.counts) < 1:
        parser.error("--counts must be positive integers")
    if not args.modes or set(args.modes) - {"shared", "distinct"}:
        parser.error(f"--modes: unknown mode(s) in {args.modes!r}")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupt)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                          *(sys.argv[1:] if argv is None else argv)])
    log_dir = tempfile.mkdtemp(prefix="celery-leader-electors-")
    server: EmbeddedRedis | None = None
    client: redis.Redis | None = None
    started = time.monotonic()
    try:
        if args.redis_url:
            url = args.redis_url
        else:
            server = EmbeddedRedis(extra_args=["--maxclients", "10000"]).start()
            url = server.url
        client = redis.Redis.from_url(url)
        log(f"redis at {url}; worker stderr in {log_dir}")
        results = []
        for n in args.counts:
            for mode in args.modes:
                results.append(run_one(url, client, n, mode, args, log_dir))
                r = results[-1]
                log(f"  N={n} {mode}: {r.round_trips / r.seconds:.1f} round trips/s, "
                    f"redis CPU {100 * r.redis_cpu / r.seconds:.2f} %")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        print("\n".join([
            f"Command: `{command}`",
            "",
            f"Timings: lease_duration {args.lease:g} s, renew_deadline {args.renew:g} s, "
            f"retry_period {args.retry:g} s; up to {args.per_process} electors (threads) per "
            f"process; window {args.window:g} s per row; Redis on loopback"
            f"{' (' + url + ')' if args.redis_url else ' (embedded redis-server)'}; "
            f"`ulimit -n` {soft} (hard {hard}).",
            "",
            f"Machine: {machine(client)}. Wall time: {time.monotonic() - started:.0f} s.",
            "",
            *report(results, args.retry),
        ]))
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
