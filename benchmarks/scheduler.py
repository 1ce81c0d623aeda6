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
measures CPU, Redis commands and lateness.  The broker is ``memory://`` and
unused: every contender publishes through ``app.send_task``, replaced by a
recorder, so broker publishes are not in any number.  Every run is bounded:
a contender process still running after ``--startup-timeout`` + warm-up +
window + 60 s is killed and reported as such; ``--cap beat=10000`` skips a
contender above a size.

    .venv/bin/python benchmarks/scheduler.py [--entries 1000,10000,100000]
        [--contenders leader,leader-msclock,beat,redbeat] [--rate 200]
        [--period 2] [--warmup 4] [--seconds 10] [--cap beat=10000]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
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


def run_one(args: argparse.Namespace, contender: str, entries: int) -> dict[str, Any]:
    server = EmbeddedRedis() if contender in USES_REDIS else None
    cfg: dict[str, Any] = {
        "contender": contender, "entries": entries, "rate": args.rate, "period": args.period,
        "warmup": args.warmup, "seconds": args.seconds, "startup_timeout": args.startup_timeout,
        "redis_url": None,
    }
    if args.profile_dir:
        cfg["profile"] = os.path.join(args.profile_dir, f"{contender}-{entries}.pstats")
    limit = args.startup_timeout + args.warmup + args.seconds + 60
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as errors:
        proc: subprocess.Popen[str] | None = None
        try:
            if server is not None:
                server.start()
                cfg["redis_url"] = server.url
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
    result["wall_s"] = time.monotonic() - started
    result["load1"] = os.getloadavg()[0]
    return result


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
        redis_used = r["contender"] in USES_REDIS
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
            log(f"running {contender} with {entries:,} entries ...")
            result = run_one(args, contender, entries)
            log(f"  -> {json.dumps(result)}")
            results.append(result)
    print(header)
    print(f"{args.rate:g} dispatches/s target from entries with intervals in "
          f"[{args.period:g}, {2 * args.period:g}) s; warm-up {args.warmup:g} s, "
          f"window {args.seconds:g} s.\n")
    print(table(results))
    print("\nRedis commands per dispatch, by command (commandstats, incl. calls from Lua):\n")
    print(breakdown(results))
    print("\nAgainst the targets:\n")
    print(verdict(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
