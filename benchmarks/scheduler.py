"""Scheduler benchmark: celery-leader vs stock ``celery beat`` vs celery-redbeat.

For every size (``--entries``) and contender, one fresh process
(benchmarks/sched_contender.py) with, except for stock beat, its own
throw-away redis-server, so RSS and ``INFO commandstats`` are clean:

- ``leader``: celery_leader.beat.LeaderScheduler (what ``celery beat -S
  leader`` runs) in-process: its elector takes the lease and its
  ScheduleRunner dispatches in the leadership thread, exactly as shipped.
- ``leader-msclock``: the same with the runner's clock floored to whole
  milliseconds, a work-around for a livelock of the shipped runner with
  sub-millisecond fire times (see docs/benchmarks.md, "Scheduler").
- ``beat``: celery.beat.PersistentScheduler (stock ``celery beat``), shelve
  file in a temp dir, driven by ``tick()`` and sleeping what it returns, as
  celery.beat.Service does.  Its state is a local file: no Redis.
- ``redbeat``: redbeat.RedBeatScheduler, its lock taken as its beat_init
  handler does, driven by the same tick loop.

Entries: ``--rate`` per second fire from entries with distinct intervals in
[``--period``, 2 * ``--period``]; all other entries are idle (intervals of a
day).  After start-up and ``--warmup`` seconds, a window of ``--seconds``
measures CPU, Redis commands and lateness.  ``--broker memory`` (the
default): the broker is ``memory://`` and unused: every contender publishes
through ``app.send_task``, replaced by a recorder, so broker publishes are not
in any number.  ``--broker redis``: every contender (stock beat too) publishes
for real through kombu's Redis transport to its throw-away redis-server, on
the lease's database (celery-leader then pushes inside its fenced batch
script); ``--broker redis-other``: to database 1 (celery-leader claims, then
pipelines the pushes).  A thread of this harness pops the messages (BRPOP)
as they arrive: dispatches and lateness (arrival minus the fire time the
message carries) come from there, and its BRPOPs are left out of the Redis
command counts.  Every run is bounded:
a contender process still running after ``--startup-timeout`` + warm-up +
window + 60 s is killed and reported as such; ``--cap beat=10000`` skips a
contender above a size.

    .venv/bin/python benchmarks/scheduler.py [--entries 1000,10000,100000]
        [--contenders leader,leader-msclock,beat,redbeat] [--rate 200]
        [--period 2] [--warmup 4] [--seconds 10] [--cap beat=10000]
        [--broker memory|redis|redis-other] [--idle distinct|alike]
        [--idle-in beat_schedule|runtime] [--repeat 1]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve().parent / "sched_contender.py"
if str(ROOT) not in sys.path:  # benchmark the working tree, installed or not
    sys.path.insert(0, str(ROOT))

from celery_leader.embedded import EmbeddedRedis, redis_server_binary  # noqa: E402

CONTENDERS = ("leader", "leader-msclock", "beat", "redbeat")
USES_REDIS = {"leader", "leader-msclock", "redbeat"}
P99_TARGET_MS = 20.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Consumer:
    """Pops the broker's ``celery`` list as messages arrive (a real broker):
    (arrival time, task id, ``leader_fire_time`` or None)."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.arrivals: list[tuple[float, str, float | None]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from datetime import datetime

        while not self._stop.is_set():
            popped = self.client.brpop(["celery"], timeout=0.2)
            if popped is None:
                continue
            now = time.time()
            try:
                headers = json.loads(popped[1])["headers"]
                fire = headers.get("leader_fire_time")
                self.arrivals.append((now, headers["id"], None if fire is None else
                                      datetime.fromisoformat(fire).timestamp()))
            except (ValueError, KeyError, TypeError):
                self.errors += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()

    def window(self, result: dict[str, Any]) -> None:
        """Dispatches and lateness of the contender's window, from the arrivals
        (stock beat and RedBeat: the fire time their scheduler noted per task id)."""
        start, end = result["window_start"], result["window_end"]
        fires = result.pop("fires", {})
        inside = [(t, i, f if f is not None else fires.get(i)) for t, i, f in self.arrivals
                  if start <= t < end]
        lateness = sorted((t - f) * 1000 for t, _, f in inside if f is not None)
        result["fire_unknown"] = sum(1 for _, _, f in inside if f is None)

        def pct(q: float) -> float | None:
            if not lateness:
                return None
            return lateness[min(len(lateness) - 1, max(0, math.ceil(q * len(lateness)) - 1))]

        result["dispatches"] = len(inside)
        result["dispatches_total"] = len(self.arrivals)
        result["duplicates"] = len(self.arrivals) - len({i for _, i, _ in self.arrivals})
        result["lateness_ms"] = {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)}
        calls = result.get("redis_calls", {})
        calls.pop("brpop", None)  # this consumer's, not the contender's


def run_one(args: argparse.Namespace, contender: str, entries: int) -> dict[str, Any]:
    real_broker = args.broker != "memory"
    server = EmbeddedRedis() if contender in USES_REDIS or real_broker else None
    cfg: dict[str, Any] = {
        "contender": contender, "entries": entries, "rate": args.rate, "period": args.period,
        "warmup": args.warmup, "seconds": args.seconds, "startup_timeout": args.startup_timeout,
        "redis_url": None, "broker": args.broker, "idle": args.idle, "idle_in": args.idle_in,
    }
    if args.profile_dir:
        cfg["profile"] = os.path.join(args.profile_dir, f"{contender}-{entries}.pstats")
    limit = args.startup_timeout + args.warmup + args.seconds + 60
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as errors:
        proc: subprocess.Popen[str] | None = None
        consumer: Consumer | None = None
        try:
            if server is not None:
                server.start()
                cfg["redis_url"] = server.url
                if real_broker:
                    broker_db = "1" if args.broker == "redis-other" else "0"
                    consumer = Consumer(server.url.rsplit("/", 1)[0] + "/" + broker_db)
            proc = subprocess.Popen([sys.executable, str(HELPER), json.dumps(cfg)],
                                    stdout=subprocess.PIPE, stderr=errors, text=True)
            try:
                out, _ = proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return {"contender": contender, "entries": entries,
                        "error": f"killed after {limit:.0f}s"}
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if consumer is not None:
                time.sleep(0.5)  # the last messages of the window
                consumer.stop()
            if server is not None:
                server.cleanup()
        errors.seek(0)
        stderr = errors.read()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        log(stderr[-2000:])
        return {"contender": contender, "entries": entries,
                "error": f"exit {proc.returncode}: {stderr.strip().splitlines()[-1:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    if consumer is not None:
        consumer.window(result)
    result["wall_s"] = time.monotonic() - started
    result["load1"] = os.getloadavg()[0]
    return result


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from ``--repeat`` runs: the median of every number (each on
    its own), and the runs' ranges of start-up, CPU per dispatch and p99."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    if len(good) == 1:
        return good[0]
    merged = dict(good[0])
    for key, value in good[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in good)
    merged["lateness_ms"] = {
        q: (statistics.median(v) if (v := [r["lateness_ms"][q] for r in good
                                            if r["lateness_ms"][q] is not None]) else None)
        for q in ("p50", "p99", "max")}
    keys = {k for r in good for k in r.get("redis_calls", {})}
    merged["redis_calls"] = {k: statistics.median(r.get("redis_calls", {}).get(k, 0)
                                                  for r in good) for k in keys}
    merged["runs"] = len(good)
    merged["ranges"] = {
        "startup_s": [min(r["startup_s"] for r in good), max(r["startup_s"] for r in good)],
        "cpu_ms_per_1k": [min(per_dispatch(r).get("cpu_ms_per_1k", 0) for r in good),
                          max(per_dispatch(r).get("cpu_ms_per_1k", 0) for r in good)],
        "p99_ms": [min((r["lateness_ms"]["p99"] or 0) for r in good),
                   max((r["lateness_ms"]["p99"] or 0) for r in good)],
    }
    return merged


# ------------------------------------------------------------------ report

def per_dispatch(result: dict[str, Any]) -> dict[str, float]:
    n = result.get("dispatches") or 0
    if not n:
        return {}
    calls = result.get("redis_calls", {})
    return {
        "cpu_ms_per_1k": result["cpu_s"] / n * 1e6,
        "redis_cmds": sum(calls.values()) / n,
        "redis_cmds_data": sum(v for k, v in calls.items() if k not in ("multi", "exec")) / n,
        "round_trips": result["client_round_trips"] / n,
        "redis_cpu_ms_per_1k": result.get("redis_cpu_s", 0.0) / n * 1e6,
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    head = ("| contender | entries | start-up s | RSS Δ MB ready / end | Redis mem Δ MB "
            "| dispatches/s (target) | CPU ms / 1k dispatches | Redis cmds / dispatch "
            "(all, incl. in Lua) | same, excl. MULTI/EXEC | client round trips / dispatch "
            "| redis-server CPU ms / 1k "
            "| lateness ms p50 / p99 / max | load1 |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    order = {c: i for i, c in enumerate(CONTENDERS)}
    for r in sorted(results, key=lambda r: (order.get(r["contender"], 9), r["entries"])):
        if "error" in r or "skipped" in r:
            note = r.get("error") or r.get("skipped")
            rows.append(f"| {r['contender']} | {r['entries']:,} | {note} |" + " |" * 10)
            continue
        pd = per_dispatch(r)
        redis_used = r["contender"] in USES_REDIS or r.get("broker", "memory") != "memory"
        lat = r["lateness_ms"]
        rate = r["dispatches"] / r["window_s"]
        stalled = ""
        if r["dispatches"] < 0.1 * r["target_rate"] * r["window_s"]:
            stalled = f" **stalled** after {r['dispatches_total']} dispatches"
        elif r["dispatches"] < 0.5 * r["target_rate"] * r["window_s"]:
            stalled = " (behind)"
        rows.append(
            f"| {r['contender']} | {r['entries']:,} | {r['startup_s']:.2f} "
            f"| {r['rss_ready'] / 2**20:.1f} / {r['rss_end'] / 2**20:.1f} "
            f"| {fmt(r['redis_memory'] / 2**20) if redis_used else 'n/a (file)'} "
            f"| {rate:.0f} ({r['target_rate']:.0f}){stalled} "
            f"| {fmt(pd.get('cpu_ms_per_1k'), 0) if pd else fmt(r['cpu_s'] * 1000, 0) + ' total'} "
            f"| {fmt(pd.get('redis_cmds'), 2) if redis_used else '0'} "
            f"| {fmt(pd.get('redis_cmds_data'), 2) if redis_used else '0'} "
            f"| {fmt(pd.get('round_trips'), 2) if redis_used else '0'} "
            f"| {fmt(pd.get('redis_cpu_ms_per_1k'), 0) if redis_used else '-'} "
            f"| {fmt(lat['p50'])} / {fmt(lat['p99'])} / {fmt(lat['max'])} "
            f"| {r['load1']:.2f} |")
    return "\n".join(rows)


def breakdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        n = r.get("dispatches") or 0
        if not n or not r.get("redis_calls"):
            continue
        parts = ", ".join(f"{k} {v / n:.2f}" for k, v in
                          sorted(r["redis_calls"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {r['contender']} @ {r['entries']:,}: {parts}")
    return "\n".join(lines)


def spread(results: list[dict[str, Any]]) -> str:
    """Ranges over the repeated runs, and messages popped twice (real broker)."""
    lines = []
    for r in results:
        parts = []
        ranges = r.get("ranges")
        if ranges:
            parts.append(f"{r['runs']} runs: start-up {ranges['startup_s'][0]:.2f}-"
                         f"{ranges['startup_s'][1]:.2f} s, CPU ms/1k "
                         f"{ranges['cpu_ms_per_1k'][0]:.0f}-{ranges['cpu_ms_per_1k'][1]:.0f}, "
                         f"p99 {ranges['p99_ms'][0]:.1f}-{ranges['p99_ms'][1]:.1f} ms")
        if "duplicates" in r:
            parts.append(f"task ids popped twice: {r['duplicates']}")
        if parts:
            lines.append(f"- {r['contender']} @ {r['entries']:,}: " + "; ".join(parts))
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> str:
    lines = []
    by = {(r["contender"], r["entries"]): r for r in results if "dispatches" in r}
    for (contender, entries), r in sorted(by.items()):
        if not contender.startswith("leader"):
            continue
        rate = r["dispatches"] / r["window_s"]
        if rate < 0.5 * r["target_rate"]:
            lines.append(f"- {contender} @ {entries:,}: did not keep up ({rate:.0f} of "
                         f"{r['target_rate']:.0f} dispatches/s; {r['cpu_s'] / r['window_s']:.0%}"
                         " of a core busy): no per-dispatch comparison")
            continue
        p99 = r["lateness_ms"]["p99"]
        parts = [f"p99 {fmt(p99)} ms {'<=' if p99 is not None and p99 <= P99_TARGET_MS else '>'}"
                 f" {P99_TARGET_MS:g} ms"]
        other = by.get(("redbeat", entries))
        if other and other["dispatches"]:
            mine, theirs = per_dispatch(r), per_dispatch(other)
            for key, label in (("cpu_ms_per_1k", "CPU ms/1k dispatches"),
                               ("redis_cmds", "Redis cmds/dispatch"),
                               ("redis_cmds_data", "same excl. MULTI/EXEC"),
                               ("round_trips", "round trips/dispatch")):
                ok = mine[key] < theirs[key]
                parts.append(f"{label} {mine[key]:.2f} {'<' if ok else '>='} "
                             f"redbeat {theirs[key]:.2f}")
        lines.append(f"- {contender} @ {entries:,}: " + "; ".join(parts))
    return "\n".join(lines)


def versions() -> str:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    server = subprocess.run([redis_server_binary(), "--version"], capture_output=True,
                            text=True, check=False).stdout.strip()
    return "\n".join([
        f"- machine: {platform.machine()}, nproc {os.cpu_count()}, "
        f"{platform.system()} {platform.release()}, load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- python {platform.python_version()}; celery {version('celery')}, "
        f"kombu {version('kombu')}, redis-py {version('redis')}, "
        f"celery-redbeat {version('celery-redbeat')}, "
        f"celery-leader {version('celery-leader')} (working tree)",
        f"- {server}",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", default="1000,10000,100000",
                        help="comma-separated sizes (default %(default)s)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--rate", type=float, default=200.0,
                        help="target dispatches per second (default %(default)s)")
    parser.add_argument("--period", type=float, default=2.0,
                        help="shortest interval of a firing entry, s (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--cap", action="append", default=[], metavar="CONTENDER=N",
                        help="skip CONTENDER for sizes above N (repeatable)")
    parser.add_argument("--broker", choices=("memory", "redis", "redis-other"),
                        default="memory", help="where the contenders publish (default "
                        "%(default)s: a recorder; redis: kombu to the lease's Redis db; "
                        "redis-other: to its db 1)")
    parser.add_argument("--idle-in", choices=("beat_schedule", "runtime"),
                        default="beat_schedule",
                        help="where the idle entries are defined: beat_schedule (default) or "
                             "runtime entries in Redis (celery-leader contenders only)")
    parser.add_argument("--idle", choices=("distinct", "alike"), default="distinct",
                        help="idle entries' schedules: an interval each (default) or one of "
                        "24 crontabs (entries alike)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per contender and size; the table shows medians")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--profile-dir", help="cProfile the window (dispatch thread) into "
                        "DIR/<contender>-<entries>.pstats; numbers then include the profiler")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.entries.split(",") if s]
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
    caps = {}
    for cap in args.cap:
        name, _, size = cap.partition("=")
        caps[name] = int(size)
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)

    command = shlex.join([".venv/bin/python", "benchmarks/scheduler.py", *sys.argv[1:]]) \
        if argv is None else shlex.join(["benchmarks/scheduler.py", *argv])
    header = f"command: `{command}`\n\n{versions()}\n"
    log(header)
    results: list[dict[str, Any]] = []
    for entries in sizes:
        for contender in contenders:
            if entries > caps.get(contender, entries):
                results.append({"contender": contender, "entries": entries,
                                "skipped": f"skipped (--cap {contender}={caps[contender]})"})
                continue
            runs = []
            for attempt in range(args.repeat):
                log(f"running {contender} with {entries:,} entries ({attempt + 1}/"
                    f"{args.repeat}) ...")
                runs.append(run_one(args, contender, entries))
                log(f"  -> {json.dumps(runs[-1])}")
            results.append(median_result(runs))
    print(header)
    print(f"{args.rate:g} dispatches/s target from entries with intervals in "
          f"[{args.period:g}, {2 * args.period:g}) s; warm-up {args.warmup:g} s, "
          f"window {args.seconds:g} s; broker {args.broker}; idle entries {args.idle} "
          f"in {args.idle_in}; "
          f"{'medians of ' + str(args.repeat) + ' runs' if args.repeat > 1 else '1 run'}.\n")
    print(table(results))
    print("\nRedis commands per dispatch, by command (commandstats, incl. calls from Lua):\n")
    print(breakdown(results))
    spreads = spread(results)
    if spreads:
        print("\nSpread and duplicates:\n")
        print(spreads)
    print("\nAgainst the targets:\n")
    print(verdict(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
