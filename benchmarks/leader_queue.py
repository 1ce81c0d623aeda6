"""Leader-only tasks vs a plain Celery queue: latency and throughput, one worker.

One real ``celery worker`` process (``--pool prefork`` with ``-c 2``, and/or
``--pool solo``) of benchmarks/_leader_queue_app.py, on a throw-away embedded
redis-server on loopback that is both the broker and the election's Redis (so
the leader queue is taken by celery_leader/leaderqueue.py: doorbell, fenced
TAKE, ``hub.call_soon``).  The worker leads alone.  The same no-op body runs
as two tasks:

- ``plain``: ``bench.plain_noop`` on Celery's default queue (kombu's BRPOP);
- ``leader``: ``bench.leader_noop``, the same body under ``@leader_only``
  (leader queue, start claim TASK_START_LUA, end of run FINISH_RUN_LUA).

Per pool, after a warm-up, ``--rounds`` rounds, each running both variants in
turn (the order reversed every other round, so drift favours neither):

- latency: ``--latency-n`` tasks sent one at a time every ``--interval``
  seconds (so it measures latency, not queueing); latency = the body's first
  line (``time.monotonic()`` in the pool process) - the send (``time.monotonic()``
  in this process, just before ``apply_async``).  CLOCK_MONOTONIC is one clock
  for every process on Linux.  p50 and p99 per round; the stages (send ->
  received in the worker's main process -> ``task_prerun`` in the pool process
  -> body -> ``task_postrun``) over all rounds;
- throughput: ``--throughput-n`` messages published first to a staging list
  nobody consumes, then moved onto the variant's list with one ``RENAME`` (all
  there at once, and the sender's own cost is out of the window); tasks/s =
  N / (last ``task_postrun`` - first body start).  Also per task: CPU of the
  worker's main process, of its pool processes and of redis-server, and Redis
  commands (``INFO commandstats``, commands inside scripts included).

The report gives the median over rounds of each measure, the ratios
leader / plain, and the issue's targets: leader-only throughput >= 0.8 x the
plain queue's, p99 latency <= 2 x.  Tasks run with the worker's defaults
(acks on receipt, prefetch multiplier 4); the worker runs with ``-l warning
--without-gossip --without-mingle --without-heartbeat`` (no per-task log lines,
no background event traffic).  Every process started is stopped by PID at the
end, also on error, Ctrl-C or SIGTERM.

    .venv/bin/python benchmarks/leader_queue.py [--pool prefork,solo] [--rounds 3]
        [--latency-n 500 --interval 0.02] [--throughput-n 5000] [--warmup 50]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
APP_MODULE = "_leader_queue_app"
for _path in (str(ROOT), str(BENCH_DIR)):  # benchmark the working tree, installed or not
    if _path not in sys.path:
        sys.path.insert(0, _path)

import redis  # noqa: E402

from celery_leader.embedded import EmbeddedRedis  # noqa: E402
from celery_leader.leaderqueue import INFLIGHT_SUFFIX  # noqa: E402

VARIANTS = ("plain", "leader")
LISTS = {"plain": "celery", "leader": "celery_leader"}  # kombu's list of each queue
STAGING = "bench_leader_queue_staging"  # a queue no worker consumes
POOLS = ("prefork", "solo")
CONCURRENCY = {"prefork": 2, "solo": 1}
KEY_PREFIX = "celery-leader"  # the app's leader_key_prefix (the default)
OWN = {"info"}  # what the benchmark itself sends to the server during a window
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchmarkError(RuntimeError):
    pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchmarkError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------- stamps


@dataclass(frozen=True)
class Ran:
    name: str
    prerun: float
    start: float
    postrun: float
    delivery: bool  # came through the reliable leader queue
    term: int


class Stamps:
    """What the worker's processes appended to ``<out_dir>/<pid>.log``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.offsets: dict[str, int] = {}
        self.partial: dict[str, bytes] = {}
        self.received: dict[str, float] = {}
        self.ran: dict[str, Ran] = {}
        self.leading: list[tuple[str, int, float]] = []  # ("L" | "S", term, t)
        self.ready = False

    def poll(self) -> None:
        for name in os.listdir(self.out_dir):
            path = os.path.join(self.out_dir, name)
            with open(path, "rb") as stream:
                stream.seek(self.offsets.get(name, 0))
                data = self.partial.pop(name, b"") + stream.read()
                self.offsets[name] = stream.tell()
            lines = data.split(b"\n")
            if lines[-1]:
                self.partial[name] = lines[-1]  # a line still being written
            for line in lines[:-1]:
                self._parse(line.decode().split())

    def _parse(self, parts: list[str]) -> None:
        kind = parts[0]
        if kind == "R":
            self.received[parts[1]] = float(parts[2])
        elif kind == "T":
            self.ran[parts[2]] = Ran(parts[1], float(parts[3]), float(parts[4]),
                                     float(parts[5]), parts[6] == "1", int(parts[7]))
        elif kind in ("L", "S"):
            self.leading.append((kind, int(parts[1]), float(parts[2])))
        elif kind == "W":
            self.ready = True

    def wait_ran(self, ids: Sequence[str], timeout: float, what: str,
                 interval: float = 0.2) -> None:
        def done() -> bool:
            self.poll()
            return all(task_id in self.ran for task_id in ids)

        try:
            wait_until(done, timeout, what, interval)
        except BenchmarkError:
            missing = sum(task_id not in self.ran for task_id in ids)
            raise BenchmarkError(f"{missing} of {len(ids)} tasks did not run: timed out "
                                 f"after {timeout:.0f}s waiting for {what}") from None


# --------------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[int, int, float] | None:
    """(ppid, start time in ticks, user + system CPU seconds), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            text = stream.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Worker:
    """One ``celery worker`` process and its pool children, stopped by PID."""

    def __init__(self, pool: str, redis_url: str, out_dir: str, log_dir: str) -> None:
        self.pool = pool
        self.election = f"bench-lq-{pool}-{uuid.uuid4().hex[:6]}"
        self.log_path = os.path.join(log_dir, f"worker-{pool}.log")
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("CELERY_", "LEADER_"))}
        env.update(BENCH_REDIS_URL=redis_url, BENCH_OUT_DIR=out_dir,
                   BENCH_ELECTION=self.election, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(BENCH_DIR), str(ROOT),
                                                          os.environ.get("PYTHONPATH", ""))
                                              if p))
        self.command = [sys.executable, "-m", "celery", "-A", APP_MODULE, "worker",
                        "--pool", pool, "-c", str(CONCURRENCY[pool]), "-n", f"bench-{pool}@%h",
                        "-l", "warning", "--without-gossip", "--without-mingle",
                        "--without-heartbeat"]
        with open(self.log_path, "wb") as out:
            # Own session: a Ctrl-C reaches only this process, which stops it by PID.
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.children: dict[int, int] = {}  # pid -> start time (ticks), to kill only them

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchmarkError(f"the {self.pool} worker (pid {self.pid}) exited with "
                                 f"{self.process.returncode}; log: {self.log_path}")

    def find_children(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            stat = proc_stat(int(entry))
            if stat is not None and stat[0] == self.pid:
                found.append(int(entry))
                self.children.setdefault(int(entry), stat[1])
        return found

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (the main process, its live pool processes)."""
        main = proc_stat(self.pid)
        children = [proc_stat(pid) for pid in self.find_children()]
        return (main[2] if main else 0.0), sum(s[2] for s in children if s is not None)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (warm shutdown: releases the lease), then SIGKILL by PID."""
        self.find_children()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"  worker pid {self.pid} ignored SIGTERM for {timeout:.0f}s; killing it")
                self.process.kill()
                self.process.wait()
        deadline = time.monotonic() + 5.0
        for pid, started in self.children.items():
            while time.monotonic() < deadline:
                stat = proc_stat(pid)
                if stat is None or stat[1] != started:
                    break  # gone (or the PID was reused: not ours)
                time.sleep(0.05)
            else:
                stat = proc_stat(pid)
                if stat is not None and stat[1] == started:
                    log(f"  pool process {pid} outlived its worker; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------- measurements


@dataclass
class LatencyRun:
    variant: str
    latencies: list[float]  # send -> body start, seconds
    stages: dict[str, list[float]]


@dataclass
class ThroughputRun:
    variant: str
    n: int
    seconds: float  # first body start -> last postrun
    push_to_first: float  # RENAME -> first body start
    cpu_main: float  # seconds, whole window
    cpu_pool: float
    cpu_redis: float
    cpu_machine_other: float  # every other process on the machine
    redis_calls: int  # commands (inside scripts too), the benchmark's own excluded
    redis_top_level: dict[str, int]
    idle_total: float  # time in the window with no task between task_prerun and postrun
    idle_max: float  # the longest such stretch
    out_of_order: float  # adjacent pairs (in publish order) whose bodies started inverted

    @property
    def rate(self) -> float:
        return self.n / self.seconds


STAGES = ("send → received (main process)", "received → task_prerun (pool)",
          "task_prerun → body start", "body start → task_postrun")


def stages_of(stamps: Stamps, sent: dict[str, float]) -> dict[str, list[float]]:
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    for task_id, at in sent.items():
        ran, received = stamps.ran[task_id], stamps.received.get(task_id)
        if received is None:
            continue
        values = (received - at, ran.prerun - received, ran.start - ran.prerun,
                  ran.postrun - ran.start)
        for name, value in zip(STAGES, values, strict=True):
            stages[name].append(value)
    return stages


class Bench:
    def __init__(self, client: redis.Redis, stamps: Stamps, worker: Worker,
                 tasks: dict[str, Any], args: argparse.Namespace) -> None:
        self.client = client
        self.stamps = stamps
        self.worker = worker
        self.tasks = tasks
        self.args = args
        self.term = 0

    def check_ran(self, variant: str, ids: Sequence[str]) -> None:
        """Each task ran as the variant says: through the reliable leader queue
        under this worker's term, or through kombu without a term."""
        for task_id in ids:
            ran = self.stamps.ran[task_id]
            if variant == "leader" and not (ran.delivery and ran.term == self.term):
                raise BenchmarkError(f"leader-only task {task_id} ran with delivery="
                                     f"{ran.delivery} term={ran.term}, expected the reliable "
                                     f"leader queue under term {self.term}")
            if variant == "plain" and (ran.delivery or ran.term):
                raise BenchmarkError(f"plain task {task_id} ran as a leader-only one")
            if ran.start <= 0 or ran.prerun <= 0:
                raise BenchmarkError(f"task {task_id} has no body/prerun stamp")

    def send_spaced(self, variant: str, n: int, interval: float) -> dict[str, float]:
        task = self.tasks[variant]
        sent: dict[str, float] = {}
        begin = time.monotonic()
        for index in range(n):
            delay = begin + index * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            task_id = str(uuid.uuid4())
            sent[task_id] = time.monotonic()
            task.apply_async(task_id=task_id)
        return sent

    def latency(self, variant: str, n: int) -> LatencyRun:
        sent = self.send_spaced(variant, n, self.args.interval)
        self.stamps.wait_ran(list(sent), 60.0 + n * 0.01, f"{n} {variant} tasks (latency)")
        self.check_ran(variant, list(sent))
        latencies = [self.stamps.ran[task_id].start - at for task_id, at in sent.items()]
        return LatencyRun(variant, latencies, stages_of(self.stamps, sent))

    def throughput(self, variant: str, n: int) -> ThroughputRun:
        task = self.tasks[variant]
        target = LISTS[variant]
        inflight = f"{KEY_PREFIX}:{self.worker.election}:{INFLIGHT_SUFFIX}"
        if self.client.exists(STAGING, target) or self.client.hlen(inflight):
            raise BenchmarkError(f"{STAGING!r} or {target!r} or the in-flight hash is not "
                                 f"empty before a throughput run")
        ids = [str(uuid.uuid4()) for _ in range(n)]
        for task_id in ids:
            # An explicit queue wins over the leader-only route.
            task.apply_async(task_id=task_id, queue=STAGING)
        staged = self.client.llen(STAGING)
        if staged != n:
            raise BenchmarkError(f"staging list holds {staged} messages, expected {n}")
        self.stamps.poll()
        before = self.snapshot()
        pushed = time.monotonic()
        self.client.rename(STAGING, target)  # every message there at once
        self.stamps.wait_ran(ids, 120.0 + n * 0.05, f"{n} {variant} tasks (throughput)",
                             interval=0.5)
        after = self.snapshot()
        self.check_ran(variant, ids)
        runs = [self.stamps.ran[task_id] for task_id in ids]
        first = min(ran.start for ran in runs)
        last = max(ran.postrun for ran in runs)
        calls = {cmd: after["calls"].get(cmd, 0) - before["calls"].get(cmd, 0)
                 for cmd in set(after["calls"]) | set(before["calls"])}
        ours = after["main"] + after["pool"] + after["redis"] + after["self"] - (
            before["main"] + before["pool"] + before["redis"] + before["self"])
        top = {cmd: count for cmd, count in calls.items()
               if count and cmd in ("evalsha", "eval", "brpop", "blmove", "multi", "exec",
                                    "zadd", "hset", "hdel", "zrem", "lpush", "rpush",
                                    "publish")}
        idle_total, idle_max = idle_stretches(runs)
        starts = [ran.start for ran in runs]  # publish order
        inverted = sum(later < earlier for earlier, later in itertools.pairwise(starts))
        return ThroughputRun(
            variant, n, last - first, first - pushed,
            cpu_main=after["main"] - before["main"], cpu_pool=after["pool"] - before["pool"],
            cpu_redis=after["redis"] - before["redis"],
            cpu_machine_other=max(0.0, after["machine"] - before["machine"] - ours),
            redis_calls=sum(count for cmd, count in calls.items() if cmd not in OWN),
            redis_top_level=top, idle_total=idle_total, idle_max=idle_max,
            out_of_order=inverted / max(1, n - 1))

    def snapshot(self) -> dict[str, Any]:
        main, pool = self.worker.cpu()
        info_cpu = self.client.info("cpu")
        stats = self.client.info("commandstats")
        return {
            "main": main, "pool": pool,
            "redis": float(info_cpu["used_cpu_user"]) + float(info_cpu["used_cpu_sys"]),
            "self": time.process_time(),
            "machine": machine_busy(),
            "calls": {key.removeprefix("cmdstat_"): int(value["calls"])
                      for key, value in stats.items()},
        }


def idle_stretches(runs: Sequence[Ran]) -> tuple[float, float]:
    """(total, longest) time between the first task_prerun and the last postrun
    during which no task was between its task_prerun and its task_postrun."""
    spans = sorted((ran.prerun, ran.postrun) for ran in runs)
    total = longest = 0.0
    covered_to = spans[0][1]
    for begin, end in spans[1:]:
        if begin > covered_to:
            total += begin - covered_to
            longest = max(longest, begin - covered_to)
        covered_to = max(covered_to, end)
    return total, longest


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (/proc/stat, all CPUs)."""
    with open("/proc/stat") as stream:
        fields = [int(x) for x in stream.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass
class PoolResults:
    pool: str
    latency: dict[str, list[LatencyRun]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    throughput: dict[str, list[ThroughputRun]] = field(
        default_factory=lambda: {v: [] for v in VARIANTS})
    term: int = 0
    leadership_changes: int = 0
    load: tuple[float, float] = (0.0, 0.0)  # 1-min load average before, after
    wall: float = 0.0


def run_pool(pool: str, url: str, client: redis.Redis, tasks: dict[str, Any],
             args: argparse.Namespace, log_dir: str) -> PoolResults:
    out_dir = tempfile.mkdtemp(prefix=f"stamps-{pool}-", dir=log_dir)
    stamps = Stamps(out_dir)
    results = PoolResults(pool)
    started = time.monotonic()
    results.load = (os.getloadavg()[0], 0.0)
    worker = Worker(pool, url, out_dir, log_dir)
    log(f"{pool}: worker pid {worker.pid} ({shlex.join(worker.command[1:])})")
    try:
        def ready_and_leading() -> bool:
            worker.check_alive()
            stamps.poll()
            return stamps.ready and any(kind == "L" for kind, _, _ in stamps.leading)

        wait_until(ready_and_leading, 90.0, f"the {pool} worker to be ready and lead")
        bench = Bench(client, stamps, worker, tasks, args)
        bench.term = results.term = next(t for kind, t, _ in stamps.leading if kind == "L")
        log(f"  leading under term {bench.term}; warming up")
        for variant in VARIANTS:
            bench.latency(variant, args.warmup)
            bench.throughput(variant, max(args.warmup, args.throughput_n // 10))
        for round_index in range(args.rounds):
            order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                run = bench.latency(variant, args.latency_n)
                results.latency[variant].append(run)
                log(f"  round {round_index + 1}/{args.rounds} latency {variant}: "
                    f"p50 {fmt_ms(percentile(run.latencies, 50))} "
                    f"p99 {fmt_ms(percentile(run.latencies, 99))}")
            for variant in order:
                worker.check_alive()
                thr = bench.throughput(variant, args.throughput_n)
                results.throughput[variant].append(thr)
                log(f"  round {round_index + 1}/{args.rounds} throughput {variant}: "
                    f"{thr.rate:.0f} tasks/s ({thr.n} in {thr.seconds:.2f} s; longest gap "
                    f"{fmt_ms(thr.idle_max)})")
        stamps.poll()
        results.leadership_changes = len(stamps.leading) - 1
        return results
    finally:
        worker.stop()
        results.load = (results.load[0], os.getloadavg()[0])
        results.wall = time.monotonic() - started


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


def fmt_ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:.2f} ms"


def median_of(runs: Sequence[Any], measure: Callable[[Any], float]) -> float:
    return statistics.median(measure(run) for run in runs)


def report_pool(r: PoolResults, args: argparse.Namespace) -> list[str]:
    lat, thr = r.latency, r.throughput

    def lat_q(variant: str, q: float) -> float:
        return median_of(lat[variant], lambda run: percentile(run.latencies, q))

    rate = {v: median_of(thr[v], lambda run: run.rate) for v in VARIANTS}
    p50 = {v: lat_q(v, 50) for v in VARIANTS}
    p99 = {v: lat_q(v, 99) for v in VARIANTS}
    ratio_rate = rate["leader"] / rate["plain"]
    ratio_p50 = p50["leader"] / p50["plain"]
    ratio_p99 = p99["leader"] / p99["plain"]

    def verdict(ok: bool) -> str:
        return "meets" if ok else "**misses**"

    title = f"`--pool {r.pool} -c {CONCURRENCY[r.pool]}`"
    lines = [
        f"### {title}",
        "",
        f"Leader term {r.term}, leadership changes during the run: {r.leadership_changes}; "
        f"1-min load average {r.load[0]:.2f} before, {r.load[1]:.2f} after; "
        f"{r.wall:.0f} s.",
        "",
        f"Median over {args.rounds} rounds (each round: one latency run of "
        f"{args.latency_n} tasks sent every {args.interval * 1000:g} ms and one throughput "
        f"run of {args.throughput_n} tasks, per variant).",
        "",
        "| measurement | plain queue | leader-only | leader / plain | target | verdict |",
        "|---|---|---|---|---|---|",
        f"| latency send → body start, p50 | {fmt_ms(p50['plain'])} | "
        f"{fmt_ms(p50['leader'])} | {ratio_p50:.2f} |  |  |",
        f"| latency send → body start, p99 | {fmt_ms(p99['plain'])} | "
        f"{fmt_ms(p99['leader'])} | {ratio_p99:.2f} | ≤ 2 | {verdict(ratio_p99 <= 2.0)} |",
        f"| throughput, tasks/s (first start → last finish) | {rate['plain']:.0f} | "
        f"{rate['leader']:.0f} | {ratio_rate:.2f} | ≥ 0.8 | {verdict(ratio_rate >= 0.8)} |",
        "",
        "Per round (latency p50 / p99; throughput tasks/s, and the longest gap between "
        "tasks in the throughput window: no task between `task_prerun` and `task_postrun`):",
        "",
        "| round | plain p50 | plain p99 | leader p50 | leader p99 | plain tasks/s | "
        "leader tasks/s | plain longest gap | leader longest gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for index in range(args.rounds):
        pl, ld = lat["plain"][index], lat["leader"][index]
        lines.append(
            f"| {index + 1} | {fmt_ms(percentile(pl.latencies, 50))} | "
            f"{fmt_ms(percentile(pl.latencies, 99))} | {fmt_ms(percentile(ld.latencies, 50))} | "
            f"{fmt_ms(percentile(ld.latencies, 99))} | {thr['plain'][index].rate:.0f} | "
            f"{thr['leader'][index].rate:.0f} | {fmt_ms(thr['plain'][index].idle_max)} | "
            f"{fmt_ms(thr['leader'][index].idle_max)} |")
    lines += [
        "",
        "Latency by stage, all rounds pooled (p50 / p99):",
        "",
        "| stage | plain p50 | plain p99 | leader p50 | leader p99 |",
        "|---|---|---|---|---|",
    ]
    pooled = {v: {s: [x for run in lat[v] for x in run.stages[s]] for s in STAGES}
              for v in VARIANTS}
    for stage in STAGES:
        lines.append(
            f"| {stage} | {fmt_ms(percentile(pooled['plain'][stage], 50))} | "
            f"{fmt_ms(percentile(pooled['plain'][stage], 99))} | "
            f"{fmt_ms(percentile(pooled['leader'][stage], 50))} | "
            f"{fmt_ms(percentile(pooled['leader'][stage], 99))} |")

    def per_task(variant: str, measure: Callable[[ThroughputRun], float]) -> float:
        return median_of(thr[variant], lambda run: measure(run) / run.n)

    lines += [
        "",
        "Throughput runs, per task (median over rounds):",
        "",
        "| per task | plain queue | leader-only |",
        "|---|---|---|",
        f"| wall time (1 / rate) | {1000 / rate['plain']:.3f} ms | "
        f"{1000 / rate['leader']:.3f} ms |",
    ]
    for label, measure in (
            ("CPU, worker main process", lambda run: run.cpu_main),
            ("CPU, pool processes", lambda run: run.cpu_pool),
            ("CPU, redis-server", lambda run: run.cpu_redis),
            ("CPU, every other process on the machine", lambda run: run.cpu_machine_other),
            ("between tasks (outside task_prerun → postrun), summed", lambda run: run.idle_total)):
        lines.append(f"| {label} | {per_task('plain', measure) * 1000:.3f} ms | "
                     f"{per_task('leader', measure) * 1000:.3f} ms |")
    lines.append(f"| Redis commands (inside scripts too) | "
                 f"{per_task('plain', lambda run: run.redis_calls):.2f} | "
                 f"{per_task('leader', lambda run: run.redis_calls):.2f} |")
    lines.append(f"| adjacent pairs started out of publish order | "
                 f"{median_of(thr['plain'], lambda run: run.out_of_order):.1%} | "
                 f"{median_of(thr['leader'], lambda run: run.out_of_order):.1%} |")
    commands = sorted({cmd for v in VARIANTS for run in thr[v] for cmd in run.redis_top_level})
    for cmd in commands:
        lines.append(f"| &nbsp;&nbsp;{cmd} | "
                     f"{per_task('plain', lambda run, c=cmd: run.redis_top_level.get(c, 0)):.2f}"
                     f" | "
                     f"{per_task('leader', lambda run, c=cmd: run.redis_top_level.get(c, 0)):.2f}"
                     f" |")
    lines.append("")
    return lines


def machine(client: redis.Redis) -> str:
    server: dict[str, Any] = client.info("server")
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import celery
    import kombu

    return (f"{os.cpu_count()} CPUs (`nproc`: {len(os.sched_getaffinity(0))})"
            f"{', ' + cpu if cpu else ''}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; Celery {celery.__version__}; "
            f"kombu {kombu.__version__}; redis-py {redis.__version__}; "
            f"redis-server {server.get('redis_version')}")


# --------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", default="prefork,solo",
                        help="comma-separated pools to run, one worker each: prefork (-c 2), "
                             "solo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-n", type=int, default=500, help="tasks per latency run")
    parser.add_argument("--interval", type=float, default=0.020,
                        help="seconds between sends in a latency run")
    parser.add_argument("--throughput-n", type=int, default=5000,
                        help="tasks per throughput run")
    parser.add_argument("--warmup", type=int, default=50,
                        help="latency-style tasks per variant before the rounds (a "
                             "throughput warm-up of max(this, throughput-n / 10) follows)")
    args = parser.parse_args(argv)
    pools = [p.strip() for p in args.pool.split(",") if p.strip()]
    if not pools or set(pools) - set(POOLS):
        parser.error(f"--pool: expected a comma-separated subset of {','.join(POOLS)}, "
                     f"got {args.pool!r}")
    args.pools = pools
    for name in ("rounds", "latency_n", "throughput_n", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.interval > 0:
        parser.error("--interval must be > 0")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background
        signal.signal(signal.SIGINT, _interrupt)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                          *(sys.argv[1:] if argv is None else argv)])
    log_dir = tempfile.mkdtemp(prefix="celery-leader-bench-lq-")
    server: EmbeddedRedis | None = None
    client: redis.Redis | None = None
    app: Any = None
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        server = EmbeddedRedis().start()
        client = redis.Redis.from_url(server.url)
        log(f"redis at {server.url} (pid {server.pid}); logs in {log_dir}")
        os.environ.update(BENCH_REDIS_URL=server.url, BENCH_OUT_DIR=log_dir)
        import _leader_queue_app as bench_app  # the sender: the same app, routes included

        app = bench_app.app
        tasks = {"plain": bench_app.plain_noop, "leader": bench_app.leader_noop}
        sections: list[str] = []
        for pool in args.pools:
            sections += report_pool(run_pool(pool, server.url, client, tasks, args, log_dir),
                                    args)
        load_after = os.getloadavg()
        header = [
            f"Command: `{command}`",
            "",
            f"Machine: {machine(client)}. Load average (1/5/15 min) "
            f"{'/'.join(f'{x:.2f}' for x in load_before)} at the start, "
            f"{'/'.join(f'{x:.2f}' for x in load_after)} at the end. "
            f"Wall time: {time.monotonic() - started:.0f} s.",
            "",
            "One `celery worker` process per pool, leading alone; embedded redis-server on "
            "loopback, broker and election alike. Latency: the body's first line minus the "
            "send, `time.monotonic()` in each process. Throughput: N messages moved onto the "
            "list at once; N / (last `task_postrun` - first body start).",
            "",
        ]
        print("\n".join(header + sections))
        shutil.rmtree(log_dir, ignore_errors=True)  # kept only when something failed
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping every process started")
        return 130
    except BenchmarkError as exc:
        log(f"benchmark failed: {exc} (logs in {log_dir})")
        return 1
    finally:
        if app is not None:
            app.close()
        if client is not None:
            client.close()
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
