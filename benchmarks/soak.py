"""Soak: Redis memory, key count and the leader's RSS over a long run at 200 ticks/s.

What runs.  A throw-away embedded redis-server on loopback, both the broker and
the election's Redis (database 0), and ``--workers`` real ``celery worker``
processes (default 2, ``--pool solo``; ``--pool prefork -c N`` also works) of
benchmarks/_soak_app.py: ``install(app)`` with ``leader_beat`` on, so the
leading worker dispatches ``--entries`` interval entries of 1 s (default 200:
200 ticks/s) and every worker runs ticks (each claims its start, as shipped).
Alongside, a thread of this process sends the app's ``@leader_only`` task at
``--leader-rate`` per second (default 20), taken by the leader from the leader
queue.  Each body does one INCR on a counter key of its own, which is how the
ticks run so far are counted (two keys in all, whatever the number of runs).

What is sampled, every ``--sample`` seconds from the first tick run: ticks run
and leader-only runs, DBSIZE, ``INFO memory`` ``used_memory``, the broker
lists' lengths, the keys and bytes of every key family (a SCAN of every key,
digits and ids replaced by ``<n>`` and ``<id>``, and each key's ``MEMORY
USAGE``), and the RSS of the leading worker's process (VmRSS of
/proc/<pid>/status; the leader is read from the lease record, every worker
having an identity of its own; with prefork, its pool processes' RSS apart).
The work in flight is sampled apart: the broker's queues and kombu's
``unacked`` keys, and celery-leader's records of ticks pushed and not started
and of leader-only messages taken and not finished.  Workers falling behind
grow these with the backlog, not with the ticks run, so the growth is also
given without them.

The report: a table of the samples; the growth per 1,000 ticks run after
``--warmup`` seconds (least-squares slope over the samples after warm-up, and
(last - first) / ticks between them) of Redis ``used_memory`` (also minus
the work in flight), of celery-leader's own keys but the work in flight (also
but the leader-only claims, which are kept for a while after their run),
of the key count and of the leader's RSS (also over the second half alone,
which tells a step from a leak), against the target of at most 2 KB per
1,000 ticks; and the largest key families at the end.

Every process started (redis-server, the workers, their pool processes) is
stopped by PID at the end, also on error, Ctrl-C or SIGTERM; the workers also
end by themselves within a second of this process's death
(benchmarks/_child.py).  Every wait and loop is bounded.

    .venv/bin/python benchmarks/soak.py [--seconds 600] [--warmup 120]
        [--entries 200] [--leader-rate 20] [--workers 2] [--pool solo|prefork]
        [-c 1] [--sample 10] [--json samples.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
APP_MODULE = "_soak_app"
for _path in (str(ROOT), str(BENCH_DIR)):  # benchmark the working tree, installed or not
    if _path not in sys.path:
        sys.path.insert(0, _path)

import redis  # noqa: E402
from leader_queue import BenchmarkError, machine, wait_until  # noqa: E402
from leader_queue import Worker as _Worker  # noqa: E402

from celery_leader.election.redislock import RedisLock, key_of  # noqa: E402
from celery_leader.embedded import EmbeddedRedis  # noqa: E402
from celery_leader.leaderqueue import INFLIGHT_SUFFIX, TASK_CLAIM_SUFFIX  # noqa: E402

ELECTION = "bench-soak"
KEY_PREFIX = "celery-leader"  # the app's leader_key_prefix (the default)
TARGET_BYTES_PER_1K = 2048.0
QUEUES = ("celery", "celery_leader")  # the broker lists: the default and the leader queue
# kombu's own keys holding messages: the queues, and the delivered-not-acked ones.
BROKER_KEYS = (*QUEUES, "unacked", "unacked_index")
# celery-leader's records of work in flight (bounded by it, not by the ticks run):
# ticks pushed and not started yet (tickstart.py), leader-only messages taken
# and not finished (leaderqueue.py).
IN_FLIGHT_KEYS = tuple(key_of(KEY_PREFIX, ELECTION, ELECTION, suffix) for suffix in
                       ("schedule:sent", "schedule:sent-at", INFLIGHT_SUFFIX))
# The family of the leader-only claims (taskruns.py): kept for a while after the
# run, so they grow with the leader-only traffic until the first expire.
TASK_CLAIMS = key_of(KEY_PREFIX, ELECTION, ELECTION, f"{TASK_CLAIM_SUFFIX}<id>")
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                 r"|[0-9a-f]{32}", re.IGNORECASE)
_NUMBER = re.compile(r"\d+")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def family(key: bytes) -> str:
    """The key with its ids and numbers replaced: one name per kind of key."""
    text = key.decode(errors="replace")
    return _NUMBER.sub("<n>", _ID.sub("<id>", text))


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as stream:
            for line in stream:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return 0


# --------------------------------------------------------------------- processes


def trace_dir(log_dir: str) -> str:
    """Where the workers write their tracemalloc snapshots (``--tracemalloc``)."""
    path = os.path.join(log_dir, "tracemalloc")
    os.makedirs(path, exist_ok=True)
    return path


class Worker(_Worker):
    """One ``celery worker`` of benchmarks/_soak_app.py with an identity of its
    own; stopped by PID (benchmarks/leader_queue.py's Worker.stop)."""

    def __init__(self, index: int, args: argparse.Namespace, redis_url: str,
                 log_dir: str) -> None:
        self.pool = f"{args.pool} #{index}"
        self.identity = f"soak-w{index}"
        self.log_path = os.path.join(log_dir, f"worker-{index}.log")
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("CELERY_", "LEADER_"))}
        env.update(SOAK_REDIS_URL=redis_url, SOAK_ELECTION=ELECTION,
                   SOAK_ENTRIES=str(args.entries), SOAK_WORKER="1", PYTHONUNBUFFERED="1",
                   SOAK_TRACEMALLOC_DIR=trace_dir(log_dir) if args.tracemalloc else "",
                   SOAK_TRACEMALLOC_EVERY=str(args.tracemalloc),
                   PYTHONPATH=os.pathsep.join(p for p in (str(BENCH_DIR), str(ROOT),
                                                          os.environ.get("PYTHONPATH", ""))
                                              if p))
        self.command = [sys.executable, "-m", "celery", "-A", APP_MODULE, "worker",
                        "--pool", args.pool, "-c", str(args.concurrency),
                        "-n", f"soak{index}@%h", "--leader-identity", self.identity,
                        "-l", "warning", "--without-gossip", "--without-mingle",
                        "--without-heartbeat"]
        with open(self.log_path, "wb") as out:
            # Own session: a Ctrl-C reaches only this process, which stops it by PID.
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.children = {}

    def rss(self) -> tuple[int | None, int]:
        """(RSS of the main process, summed RSS of its pool processes), kB."""
        return rss_kb(self.pid), sum(rss_kb(pid) or 0 for pid in self.find_children())


class LeaderOnlySender:
    """Sends the app's ``@leader_only`` task at ``rate`` per second from a thread
    until stopped (or ``deadline``, monotonic)."""

    def __init__(self, task: Any, rate: float, deadline: float) -> None:
        self.task = task
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.deadline = deadline
        self.sent = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def _run(self) -> None:
        begin = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            delay = begin + self.sent * self.interval - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            try:
                self.task.apply_async()
            except Exception as exc:  # counted and reported
                self.errors += 1
                if self.errors == 1:
                    log(f"  leader-only send failed: {exc!r}")
            self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)


# --------------------------------------------------------------------- samples


@dataclass
class Sample:
    elapsed: float  # seconds since the first tick ran
    ticks: int
    leader_runs: int
    sent: int  # leader-only tasks sent so far
    send_errors: int  # sends that raised
    keys: int  # DBSIZE
    used_memory: int
    broker_bytes: int  # MEMORY USAGE of BROKER_KEYS: messages waiting or unacked
    in_flight_bytes: int  # MEMORY USAGE of IN_FLIGHT_KEYS
    backlog: dict[str, int]  # broker list -> length
    leader: str  # identity holding the lease
    rss_kb: int  # the leader's main process
    pool_rss_kb: int  # its pool processes (prefork), summed
    worker_rss_kb: dict[str, int]  # identity -> RSS of every worker's main process
    families: dict[str, int] = field(default_factory=dict)  # family -> keys
    family_bytes: dict[str, int] = field(default_factory=dict)  # family -> MEMORY USAGE

    def leader_state(self, claims: bool = True) -> int:
        """Bytes of celery-leader's keys but its records of work in flight (and
        but the leader-only claims when ``claims`` is false)."""
        return sum(size for name, size in self.family_bytes.items()
                   if name.startswith(f"{KEY_PREFIX}:") and name not in IN_FLIGHT_KEYS
                   and (claims or name != TASK_CLAIMS))


class Sampler:
    def __init__(self, client: redis.Redis, workers: Sequence[Worker],
                 counters: Any, sender: LeaderOnlySender) -> None:
        self.client = client
        self.workers = {worker.identity: worker for worker in workers}
        self.counters = counters
        self.sender = sender
        self.lock = RedisLock(client, name=ELECTION, identity="soak-observer")

    def leader(self) -> str:
        observation = self.lock.get()
        record = observation.record
        return record.holder_identity if record is not None else ""

    def families(self) -> tuple[Counter[str], Counter[str]]:
        """(keys, bytes) of every key family: a SCAN of every key and its
        ``MEMORY USAGE`` (every element counted), pipelined by the thousand."""
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        batch: list[bytes] = []

        def measure() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key in batch:
                pipe.memory_usage(key, samples=0)
            for key, size in zip(batch, pipe.execute(), strict=True):
                name = family(key)
                counts[name] += 1
                sizes[name] += int(size or 0)  # None: expired since the SCAN
            batch.clear()

        for key in self.client.scan_iter(count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                measure()
        measure()
        return counts, sizes

    def take(self, elapsed: float) -> Sample:
        for worker in self.workers.values():
            worker.check_alive()
        ticks, leader_runs = self.counters(self.client)
        leader = self.leader()
        worker = self.workers.get(leader)
        rss, pool_rss = worker.rss() if worker is not None else (None, 0)
        every = {identity: rss_kb(w.pid) or 0 for identity, w in self.workers.items()}
        pipe = self.client.pipeline(transaction=False)
        pipe.dbsize()
        pipe.info("memory")
        for name in QUEUES:
            pipe.llen(name)
        for name in (*BROKER_KEYS, *IN_FLIGHT_KEYS):
            pipe.memory_usage(name, samples=0)
        keys, memory, *rest = pipe.execute()
        lengths = rest[:len(QUEUES)]
        broker = rest[len(QUEUES):len(QUEUES) + len(BROKER_KEYS)]
        in_flight = rest[len(QUEUES) + len(BROKER_KEYS):]
        families, family_bytes = self.families()
        return Sample(elapsed=elapsed, ticks=ticks, leader_runs=leader_runs,
                      sent=self.sender.sent, send_errors=self.sender.errors, keys=int(keys),
                      used_memory=int(memory["used_memory"]),
                      broker_bytes=sum(int(size or 0) for size in broker),
                      in_flight_bytes=sum(int(size or 0) for size in in_flight),
                      backlog=dict(zip(QUEUES, map(int, lengths), strict=True)),
                      leader=leader, rss_kb=rss or 0, pool_rss_kb=pool_rss,
                      worker_rss_kb=every,
                      families=dict(families), family_bytes=dict(family_bytes))


# --------------------------------------------------------------------- report


@dataclass
class Growth:
    measure: str
    slope_per_1k: float  # least squares over the samples after warm-up
    delta_per_1k: float  # (last - first) after warm-up, per 1,000 ticks
    first: float
    last: float
    unit: str


def growth(samples: Sequence[Sample], warmup: float) -> tuple[list[Growth], int]:
    after = [s for s in samples if s.elapsed >= warmup]
    if len(after) < 2 or after[-1].ticks <= after[0].ticks:
        raise BenchmarkError(f"fewer than two samples with ticks after the {warmup:g} s "
                             "warm-up: run longer or warm up less")
    ticks = [float(s.ticks) for s in after]
    span = after[-1].ticks - after[0].ticks
    measures = (("Redis used_memory", "B", [float(s.used_memory) for s in after]),
                ("Redis used_memory minus the work in flight", "B",
                 [float(s.used_memory - s.broker_bytes - s.in_flight_bytes) for s in after]),
                ("celery-leader's keys but the work in flight (MEMORY USAGE)", "B",
                 [float(s.leader_state()) for s in after]),
                ("the same but the leader-only claims", "B",
                 [float(s.leader_state(claims=False)) for s in after]),
                ("Redis keys (DBSIZE)", "keys", [float(s.keys) for s in after]),
                ("leader RSS", "B", [s.rss_kb * 1024.0 for s in after]))
    results = []
    for name, unit, values in measures:
        results.append(fit(name, unit, ticks, values))
    # A step (e.g. when a backlog peaked) and a steady leak have the same slope
    # over the window: the second half alone tells them apart.
    half = [s for s in after if s.elapsed >= (after[0].elapsed + after[-1].elapsed) / 2]
    if len(half) >= 2 and half[-1].ticks > half[0].ticks:
        results.append(fit(f"leader RSS, second half (t ≥ {half[0].elapsed:.0f} s)", "B",
                           [float(s.ticks) for s in half], [s.rss_kb * 1024.0 for s in half]))
    # A worker that never led runs ticks only: what grows in it too is not the leader's.
    leaders = {s.leader for s in samples}
    for identity in sorted(set(after[0].worker_rss_kb) - leaders):
        results.append(fit(f"RSS of {identity}, never leading", "B", ticks,
                           [s.worker_rss_kb.get(identity, 0) * 1024.0 for s in after]))
    return results, span


def fit(name: str, unit: str, ticks: Sequence[float], values: Sequence[float]) -> Growth:
    slope = statistics.linear_regression(ticks, values).slope * 1000
    return Growth(name, slope, (values[-1] - values[0]) / (ticks[-1] - ticks[0]) * 1000,
                  values[0], values[-1], unit)


def family_slope(samples: Sequence[Sample], name: str) -> float:
    """Keys of family ``name`` per 1,000 ticks run (least squares); 0 when the
    samples do not span any ticks."""
    ticks = [float(s.ticks) for s in samples]
    if len(samples) < 2 or ticks[-1] <= ticks[0]:
        return 0.0
    counts = [float(s.families.get(name, 0)) for s in samples]
    if len(set(counts)) == 1:
        return 0.0
    return statistics.linear_regression(ticks, counts).slope * 1000


def fmt_bytes(value: float) -> str:
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, size in (("MB", 2**20), ("KB", 2**10)):
        if value >= size:
            return f"{sign}{value / size:,.2f} {unit}"
    return f"{sign}{value:,.0f} B"


def report(args: argparse.Namespace, command: str, header: str,
           samples: Sequence[Sample], traced: Sequence[str] = ()) -> str:
    prefork = args.pool == "prefork"
    lines = [f"Command: `{command}`", "", header, "",
             f"{args.workers} `celery worker --pool {args.pool} -c {args.concurrency}` "
             f"processes (`install(app)`, `leader_beat` on), {args.entries} interval entries "
             f"of 1 s ({args.entries} ticks/s), `@leader_only` sent at {args.leader_rate:g}/s; "
             "embedded redis-server on loopback, broker and election alike (db 0). "
             f"Sampled every {args.sample:g} s from the first tick run; warm-up "
             f"{args.warmup:g} s.", ""]
    head = ("| t (s) | ticks run | leader-only run | keys | used_memory "
            "| of which work in flight: broker / records | leader RSS "
            + ("| pool RSS " if prefork else "") + "| RSS of the others "
            "| backlog celery / leader queue "
            "| leader |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for s in samples:
        lines.append(
            f"| {s.elapsed:.0f} | {s.ticks:,} | {s.leader_runs:,} | {s.keys:,} "
            f"| {fmt_bytes(s.used_memory)} | {fmt_bytes(s.broker_bytes)} / "
            f"{fmt_bytes(s.in_flight_bytes)} "
            f"| {fmt_bytes(s.rss_kb * 1024)} "
            + (f"| {fmt_bytes(s.pool_rss_kb * 1024)} " if prefork else "")
            + "| " + ", ".join(fmt_bytes(kb * 1024) for identity, kb
                               in sorted(s.worker_rss_kb.items()) if identity != s.leader)
            + " "
            + f"| {s.backlog['celery']:,} / {s.backlog['celery_leader']:,} | {s.leader} |")
    last = samples[-1]
    elapsed = last.elapsed or 1.0
    lines += ["", f"Ticks run: {last.ticks:,} in {last.elapsed:.0f} s "
              f"({last.ticks / elapsed:.1f}/s, target {args.entries}/s); leader-only: "
              f"{last.leader_runs:,} run of {last.sent:,} sent"
              + (f" ({last.send_errors:,} sends failed)" if last.send_errors else "")
              + "; leaders seen: "
              f"{', '.join(sorted({s.leader for s in samples}))}."]
    if last.ticks / elapsed < 0.95 * args.entries:
        lines.append(f"The workers fell behind the schedule (backlog at the end: "
                     f"{last.backlog['celery']:,} messages): the work in flight grew with the "
                     "backlog, hence the growth also given without it.")
    lines.append("")
    try:
        results, span = growth(samples, args.warmup)
    except BenchmarkError as exc:
        lines.append(f"No growth figures: {exc}.")
    else:
        lines += [f"Growth per 1,000 ticks run after the {args.warmup:g} s warm-up "
                  f"({span:,} ticks; target ≤ {fmt_bytes(TARGET_BYTES_PER_1K)} per 1,000 "
                  "ticks for Redis and RSS):", "",
                  "| measure | after warm-up → end | per 1,000 ticks, least squares "
                  "| per 1,000 ticks, (last - first) | target |",
                  "|---|---|---|---|---|"]
        for g in results:
            if g.unit == "B":
                ok = g.slope_per_1k <= TARGET_BYTES_PER_1K
                lines.append(f"| {g.measure} | {fmt_bytes(g.first)} → {fmt_bytes(g.last)} "
                             f"| {fmt_bytes(g.slope_per_1k)} | {fmt_bytes(g.delta_per_1k)} "
                             f"| {'meets' if ok else '**misses**'} ≤ 2 KB |")
            else:
                lines.append(f"| {g.measure} | {g.first:,.0f} → {g.last:,.0f} "
                             f"| {g.slope_per_1k:,.2f} | {g.delta_per_1k:,.2f} "
                             "| flat (does not grow with ticks) |")
    after = [s for s in samples if s.elapsed >= args.warmup] or list(samples)
    first_after = after[0]
    family_bytes = last.family_bytes
    lines += ["", f"Key families at the end (top {args.top} by bytes; change since "
              f"t = {first_after.elapsed:.0f} s, and keys per 1,000 ticks run after the "
              "warm-up, least squares; bytes: `MEMORY USAGE` summed):", "",
              "| key family | keys | change | keys per 1,000 ticks | bytes |",
              "|---|---|---|---|---|"]
    top = sorted(last.families.items(),
                 key=lambda kv: (-family_bytes.get(kv[0], 0), -kv[1], kv[0]))[:args.top]
    for name, count in top:
        change = count - first_after.families.get(name, 0)
        lines.append(f"| `{name}` | {count:,} | {change:+,} "
                     f"| {family_slope(after, name):,.2f} "
                     f"| {fmt_bytes(family_bytes.get(name, 0))} |")
    if traced:
        lines += ["", *traced]
    return "\n".join(lines)


# --------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="run length from the first tick run (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=120.0,
                        help="seconds at the start left out of the growth (default "
                             "%(default)s)")
    parser.add_argument("--entries", type=int, default=200,
                        help="interval entries of 1 s = ticks per second (default "
                             "%(default)s)")
    parser.add_argument("--leader-rate", type=float, default=20.0,
                        help="@leader_only tasks sent per second (default %(default)s; "
                             "0: none)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pool", choices=("solo", "prefork"), default="solo")
    parser.add_argument("-c", "--concurrency", type=int, default=1,
                        help="pool processes per worker (prefork; solo: 1)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--top", type=int, default=20, help="key families listed at the end")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--json", help="also write the samples here")
    parser.add_argument("--tracemalloc", type=float, default=0.0, metavar="SECONDS",
                        help="trace the workers' Python allocations, a snapshot every "
                             "SECONDS, and report what grew in the leader after the warm-up "
                             "(slows the workers down; default: off)")
    args = parser.parse_args(argv)
    for name in ("seconds", "entries", "workers", "concurrency", "sample", "top"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.pool == "solo" and args.concurrency != 1:
        parser.error("-c: the solo pool runs one task at a time (use -c 1)")
    if not 0 <= args.warmup < args.seconds:
        parser.error(f"--warmup must be in [0, --seconds), got {args.warmup:g}")
    if args.tracemalloc < 0:
        parser.error(f"--tracemalloc must be >= 0, got {args.tracemalloc:g}")
    if args.leader_rate < 0:
        parser.error(f"--leader-rate must be >= 0, got {args.leader_rate:g}")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, soak_app: Any, server: EmbeddedRedis, client: redis.Redis,
        workers: list[Worker], log_dir: str) -> tuple[list[Sample], float]:
    for index in range(args.workers):
        workers.append(Worker(index, args, server.url, log_dir))
        log(f"worker {index}: pid {workers[-1].pid} ({shlex.join(workers[-1].command[1:])})")

    def ticking() -> bool:
        for worker in workers:
            worker.check_alive()
        return bool(soak_app.counters(client)[0] > 0)

    wait_until(ticking, args.startup_timeout, "the first tick to run", interval=0.1)
    t0 = time.monotonic()
    t0_wall = time.time()
    sender = LeaderOnlySender(soak_app.leader_task, args.leader_rate, t0 + args.seconds + 5)
    sender.start()
    sampler = Sampler(client, workers, soak_app.counters, sender)
    samples: list[Sample] = []
    try:
        for index in range(int(args.seconds // args.sample) + 1):  # bounded
            delay = t0 + index * args.sample - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sample = sampler.take(time.monotonic() - t0)
            samples.append(sample)
            log(f"  t={sample.elapsed:5.0f}s ticks {sample.ticks:,} leader-only "
                f"{sample.leader_runs:,}/{sample.sent:,} keys {sample.keys:,} used_memory "
                f"{fmt_bytes(sample.used_memory)} (in flight: broker "
                f"{fmt_bytes(sample.broker_bytes)}, records {fmt_bytes(sample.in_flight_bytes)}) "
                f"leader {sample.leader} RSS "
                f"{fmt_bytes(sample.rss_kb * 1024)} backlog {sample.backlog}")
        return samples, t0_wall
    finally:
        sender.stop()


def allocations(args: argparse.Namespace, samples: Sequence[Sample], workers: Sequence[Worker],
                log_dir: str, t0_wall: float) -> list[str]:
    """What grew in the leader's Python heap after the warm-up: its first and
    last tracemalloc snapshots written after it, compared by line."""
    leaders = {s.leader for s in samples}
    if len(leaders) != 1:
        return [f"No allocation report: the lease changed hands ({', '.join(sorted(leaders))})."]
    pid = next(w.pid for w in workers if w.identity == samples[-1].leader)
    folder = trace_dir(log_dir)
    snaps = sorted((os.path.getmtime(os.path.join(folder, name)), os.path.join(folder, name))
                   for name in os.listdir(folder)
                   if name.startswith(f"{pid}-") and name.endswith(".snap"))
    snaps = [(at - t0_wall, path) for at, path in snaps if at - t0_wall >= args.warmup]
    if len(snaps) < 2:
        return ["No allocation report: fewer than two snapshots after the warm-up."]
    (first_at, first), (last_at, last) = snaps[0], snaps[-1]
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
    old = tracemalloc.Snapshot.load(first).filter_traces(ignore)
    new = tracemalloc.Snapshot.load(last).filter_traces(ignore)
    diff = new.compare_to(old, "lineno")
    total = sum(d.size_diff for d in diff)
    lines = [f"Python allocations of the leader (pid {pid}, tracemalloc) from t = "
             f"{first_at:.0f} s to t = {last_at:.0f} s: {fmt_bytes(total)} in all; the "
             f"lines that grew most:", "",
             "| grew by | blocks | now | allocated at |", "|---|---|---|---|"]
    for stat in sorted(diff, key=lambda d: -d.size_diff)[:args.top]:
        frame = stat.traceback[0]
        where = frame.filename
        for marker in ("site-packages/", str(ROOT) + "/"):
            where = where.split(marker, 1)[-1]
        lines.append(f"| {fmt_bytes(stat.size_diff)} | {stat.count_diff:+,} "
                     f"| {fmt_bytes(stat.size)} | `{where}:{frame.lineno}` |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background
        signal.signal(signal.SIGINT, _interrupt)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                          *(sys.argv[1:] if argv is None else argv)])
    log_dir = tempfile.mkdtemp(prefix="celery-leader-bench-soak-")
    server: EmbeddedRedis | None = None
    client: redis.Redis | None = None
    workers: list[Worker] = []
    app: Any = None
    load_before = os.getloadavg()
    try:
        server = EmbeddedRedis().start()
        client = redis.Redis.from_url(server.url)
        log(f"redis at {server.url} (pid {server.pid}); logs in {log_dir}")
        os.environ.update(SOAK_REDIS_URL=server.url, SOAK_ELECTION=ELECTION,
                          SOAK_ENTRIES=str(args.entries))
        import _soak_app as soak_app  # the sender: the same app, its routes included

        app = soak_app.app
        samples, t0_wall = run(args, soak_app, server, client, workers, log_dir)
        traced = allocations(args, samples, workers, log_dir, t0_wall) \
            if args.tracemalloc else []
        header = (f"Machine: {machine(client)}. Load average (1/5/15 min) "
                  f"{'/'.join(f'{x:.2f}' for x in load_before)} at the start, "
                  f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} at the end.")
        print(report(args, command, header, samples, traced), flush=True)
        if args.json:
            with open(args.json, "w") as stream:
                json.dump({"command": command, "samples": [asdict(s) for s in samples]},
                          stream, indent=1)
        shutil.rmtree(log_dir, ignore_errors=True)  # kept only when something failed
        return 0
    except KeyboardInterrupt:
        log(f"interrupted; stopping every process started (logs in {log_dir})")
        return 130
    except BenchmarkError as exc:
        log(f"benchmark failed: {exc} (logs in {log_dir})")
        return 1
    finally:
        for worker in workers:
            worker.stop()
        if app is not None:
            app.close()
        if client is not None:
            client.close()
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
