"""Herd benchmark: N entries all due at one instant, real Redis broker.

For each schedule kind (``crontab(minute='*')``, ``cron('* * * * *')``, an
interval) and size, a fresh embedded redis-server (lease store and broker, db 0)
and a ScheduleRunner (celery-leader's standalone dispatcher, the same class
``celery beat -S leader`` runs) holding a fresh lease.  The runner's clock is
shifted so that the next whole minute (crontab/cron) or the interval (its
entries all anchored at the start) arrives ``--lead`` s (default 2) after the
runner is ready.
Measured: from the fire instant to the return of the batch script that pushed
the last message (the last message is then in the broker list), the longest
single batch-script call (client side), and afterwards the broker list is
checked: N messages, N distinct task ids, N distinct ticks, one fire time.
``--broker other`` puts the broker in db 1 (claims batched, pushes pipelined).

The runner builds the entries' message templates while idle before the fire
instant (shared by entries alike: one kombu publish per task and options);
``--cold`` turns that off, so the herd builds them itself.  "cold at fire" is
how many entries had no template yet when the herd began.

Also the floor: N pre-built messages LPUSHed in one pipeline.

``--side-by-side`` instead runs each contender (``--contenders``: ``leader``,
``redbeat`` = celery-redbeat's RedBeatScheduler, ``beat`` = stock
PersistentScheduler) in its own process (benchmarks/herd_contender.py) with
the real clock: started at least ``--lead`` s (default max(25, N/1000))
before a whole minute, at which N entries ``crontab(minute='*')``
(``--kinds``; ``cron`` is celery-leader only) fire.  Measured from outside,
by polling the broker list's length every ~2 ms: when the first and the last
of the N messages arrived after the fire instant.  Then each entry's
messages are counted (exactly one each, N distinct task ids; for
celery-leader also one fire time).  Each contender gets at most
``--timeout`` s (< 60: the next minute would fire again) and is stopped by
PID; stock beat is skipped above ``--beat-max`` entries.

    .venv/bin/python benchmarks/herd.py [--entries 10000,50000]
        [--kinds crontab,cron,interval] [--repeat 3] [--broker same|other] [--cold]
        [--lead SECONDS]
    .venv/bin/python benchmarks/herd.py --side-by-side [--contenders leader,redbeat,beat]
        [--entries 10000,50000] [--kinds crontab] [--repeat 3] [--beat-max 10000]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmark the working tree, installed or not
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery  # noqa: E402
from celery.schedules import crontab  # noqa: E402

from celery_leader import cron  # noqa: E402
from celery_leader.election.record import LeaderElectionRecord  # noqa: E402
from celery_leader.election.redislock import RedisLock  # noqa: E402
from celery_leader.schedule.runner import ScheduleRunner  # noqa: E402
from celery_leader.settings import LeaderSettings  # noqa: E402
from celery_leader.testing import EmbeddedRedis  # noqa: E402

NAME = "herd"


def schedule_of(kind: str) -> Any:
    return {"crontab": crontab(minute="*"), "cron": cron("* * * * *"),
            "interval": timedelta(seconds=30)}[kind]


def one_run(url: str, broker_url: str, kind: str, n: int, cold: bool,
            lead: float) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    client.flushall()
    lock = RedisLock(client, name=NAME, identity="bench")
    record = lock.create(LeaderElectionRecord(holder_identity="bench", lease_duration=600.0))
    assert record.record is not None
    term = record.record.term
    app = Celery("herd", broker=broker_url, set_as_current=False)
    sched = schedule_of(kind)
    # The shipped path: beat_schedule, its entries built as they come near.
    app.conf.update(leader_name=NAME, beat_schedule={
        f"e{i:06d}": {"task": "bench.noop", "schedule": sched, "args": [i]} for i in range(n)})
    app.task(name="bench.noop")(lambda *args: None)
    settings = LeaderSettings(redis_url=url, name=NAME, retry_period=5.0)
    # The clock: the fire instant comes ``lead`` s after start.
    real_start = time.time()
    if kind == "interval":
        offset = 0.0
        fire_at = None  # anchored at the runner's start + 30 s: shifted below
    else:
        minute = (int(real_start) // 60 + 1) * 60
        offset = minute - (real_start + lead)
        fire_at = minute
    shift = [offset]
    runner = ScheduleRunner(app, lock, settings, now=lambda: time.time() + shift[0])
    if cold:
        runner._warm_templates = lambda deadline: runner._cold.clear()  # type: ignore
    done = threading.Event()
    marks: dict[str, float] = {}
    real_fire_all = runner._fire_all_due

    def fire_all(*args: Any) -> bool:
        marks.setdefault("first", time.time() + shift[0])
        marks.setdefault("cold", n - len(runner.herd._templates))
        result = real_fire_all(*args)
        marks["last"] = time.time() + shift[0]
        if runner.dispatched >= n:
            done.set()
        return result

    runner._fire_all_due = fire_all  # type: ignore[method-assign]
    stop = threading.Event()
    # Every command's time in Redis: the longest batch script is the bound on blocking.
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 100_000)
    client.slowlog_reset()
    thread = threading.Thread(target=runner.run, args=(term, stop), daemon=True)
    thread.start()
    if kind == "interval":
        # Every entry is anchored where the schedule first saw it (this start).
        while client.hlen(lock.key("schedule:first-seen")) < n:
            time.sleep(0.01)
        seen = {int(v) for v in client.hvals(lock.key("schedule:first-seen"))}
        assert len(seen) == 1, "entries anchored at different instants"
        fire_at = seen.pop() / 1000 + 30
        shift[0] = 30.0 - lead  # the clock jumps: the interval ends in about ``lead`` s
        runner.wake()
    ok = done.wait(120)
    stop.set()
    runner.wake()
    thread.join(30)
    assert ok, f"only {runner.dispatched} of {n} dispatched"
    herd_sha = runner.herd.script.command(term)[1].encode()
    scripts = [entry["duration"] for entry in client.slowlog_get(100_000)
               if entry["command"].startswith(b"EVALSHA " + herd_sha)]
    client.config_set("slowlog-log-slower-than", 10_000)
    broker = redis.Redis.from_url(broker_url)
    raws = broker.lrange("celery", 0, -1)
    ids, ticks, fires = set(), set(), set()
    for raw in raws:
        headers = json.loads(raw)["headers"]
        ids.add(headers["id"])
        ticks.add(headers["leader_tick"])
        fires.add(headers["leader_fire_time"])
    assert len(raws) == len(ids) == len(ticks) == n and len(fires) == 1, (
        len(raws), len(ids), len(ticks), fires)
    broker.close()
    assert fire_at is not None
    result = {"kind": kind, "entries": n, "last_s": marks["last"] - fire_at,
              "first_s": marks["first"] - fire_at,
              "longest_script_ms": runner.herd.longest_call_s * 1000,
              "longest_in_redis_ms": max(scripts, default=0) / 1000,
              "batches_pipelined": runner.herd.pipelined_batches,
              "cold_at_fire": marks["cold"]}
    app.close()
    client.close()
    return result


def floor(url: str, n: int) -> float:
    client = redis.Redis.from_url(url)
    client.flushall()
    payload = "x" * 900
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.lpush("celery", f"{payload}{i}")
    pipe.execute()
    took = time.perf_counter() - started
    client.close()
    return took


def contender_run(url: str, contender: str, kind: str, n: int, timeout: float,
                  lead: float) -> dict[str, Any]:
    """One contender in its own process, started at least ``lead`` s before a
    whole minute, at which its N entries fire.  Measured from outside (the
    broker list)."""
    client = redis.Redis.from_url(url)
    client.flushall()
    now = time.time()
    fire_at = (int(now) // 60 + 1) * 60
    if fire_at - now < lead:  # too close: start just after it, fire at the next one
        time.sleep(fire_at + 0.3 - now)
        fire_at += 60
    cfg = {"contender": contender, "entries": n, "kind": kind, "redis_url": url,
           "deadline": fire_at + timeout + 5}
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "herd_contender.py"),
                             json.dumps(cfg)], stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = {"contender": contender, "kind": kind, "entries": n}
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the child's deadline bounds this wait
        if not line:
            raise RuntimeError(f"{contender} exited before it was ready")
        ready = json.loads(line)
        result["setup_s"] = ready["setup_s"]
        if ready["ready"] > fire_at - 1:
            result["error"] = f"set-up took {ready['setup_s']:.1f} s: past the fire instant"
            return result
        while time.time() < fire_at - 0.2:
            if client.llen("celery"):
                result["error"] = "messages before the fire instant"
                return result
            time.sleep(0.05)
        first = last = None
        seen = 0
        while time.time() < fire_at + timeout:
            count = client.llen("celery")
            if count > seen:  # the last message so far arrived by now
                first, last, seen = first or time.time(), time.time(), count
            if count >= n:
                break
            time.sleep(0.002)
        time.sleep(1.0)  # copies after the last would show up here
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    raws = client.lrange("celery", 0, -1)
    per_entry: dict[int, int] = {}
    ids, fires = set(), set()
    for raw in raws:
        message = json.loads(raw)
        ids.add(message["headers"]["id"])
        fires.add(message["headers"].get("leader_fire_time"))
        index = json.loads(base64.b64decode(message["body"]))[0][0]
        per_entry[index] = per_entry.get(index, 0) + 1
    result.update(
        missing=sorted(set(range(n)) - set(per_entry))[:5],
        copies=sorted(i for i, count in per_entry.items() if count > 1)[:5],
        first_s=None if first is None else first - fire_at,
        last_s=None if last is None else last - fire_at, messages=len(raws),
        exactly_once=(len(raws) == len(ids) == n and len(per_entry) == n
                      and set(per_entry.values()) == {1}
                      and (contender != "leader" or len(fires) == 1)))
    client.close()
    return result


def side_by_side(args: argparse.Namespace) -> None:
    rows = []
    with EmbeddedRedis() as server:
        url = server.url.rsplit("/", 1)[0] + "/0"
        for n in (int(x) for x in args.entries.split(",")):
            floors = [floor(url, n) for _ in range(args.repeat)]
            rows.append(f"| {n:,} | floor (pipelined LPUSH of pre-built messages) | - | "
                        f"{statistics.median(floors):.3f} "
                        f"(runs {', '.join(f'{x:.3f}' for x in floors)}) | - | - |")
            for kind in args.kinds.split(","):
                for contender in args.contenders.split(","):
                    if contender == "beat" and n > args.beat_max:
                        rows.append(f"| {n:,} | stock beat | {kind} | skipped (> --beat-max "
                                    f"{args.beat_max:,}) | | |")
                        continue
                    if kind == "cron" and contender != "leader":
                        continue
                    lead = max(25.0, n / 1000) if args.lead is None else args.lead
                    runs = [contender_run(url, contender, kind, n, args.timeout, lead)
                            for _ in range(args.repeat)]
                    print(json.dumps(runs), file=sys.stderr, flush=True)
                    lasts = [r.get("last_s") for r in runs]
                    done = [x for x in lasts if x is not None]
                    cell = (f"{statistics.median(done):.3f}" if len(done) == len(runs)
                            else f"none in {len(runs) - len(done)} of {len(runs)}")
                    cell += " (runs " + ", ".join(
                        "-" if x is None else f"{x:.3f}" for x in lasts) + ")"
                    short = [r["messages"] for r in runs if r.get("messages", n) < n]
                    if short:  # the time of the last message it sent, not of the N-th
                        cell += (f"; only {', '.join(f'{m:,}' for m in short)} of {n:,} "
                                 f"within {args.timeout:.0f} s")
                    errors = sorted({r["error"] for r in runs if "error" in r})
                    if errors:
                        cell += "; " + "; ".join(errors)
                    firsts = [r["first_s"] for r in runs if r.get("first_s") is not None]
                    name = {"leader": "celery-leader", "redbeat": "celery-redbeat 2.4.2",
                            "beat": "stock beat (PersistentScheduler)"}[contender]
                    rows.append(
                        f"| {n:,} | {name} | {kind} | {cell} | "
                        f"{statistics.median(firsts) * 1000 if firsts else float('nan'):.0f} | "
                        f"{'yes' if all(r.get('exactly_once') for r in runs) else 'NO'} |")
    print(f"load average after: {os.getloadavg()}")
    print("| N | contender | schedule | last message in the broker after the fire "
          "instant, s (median of the runs) | first message, ms after | every entry "
          "exactly once |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", default="10000,50000")
    parser.add_argument("--kinds", default="crontab,cron,interval")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--broker", choices=("same", "other"), default="same")
    parser.add_argument("--lead", type=float, default=None,
                        help="seconds from the runner's start to the fire instant (< 28; "
                             "default 2; --side-by-side: at least, default max(25, N/1000))")
    parser.add_argument("--cold", action="store_true",
                        help="no templates built ahead: the herd builds them")
    parser.add_argument("--side-by-side", action="store_true",
                        help="each contender in its own process, the real clock (see above)")
    parser.add_argument("--contenders", default="leader,redbeat,beat")
    parser.add_argument("--beat-max", type=int, default=10000)
    parser.add_argument("--timeout", type=float, default=50.0)
    args = parser.parse_args()
    print(f"command: `{shlex.join(['.venv/bin/python', 'benchmarks/herd.py', *sys.argv[1:]])}`")
    print(f"load average before: {os.getloadavg()}")
    if args.side_by_side:
        if args.kinds == parser.get_default("kinds"):
            args.kinds = "crontab"
        side_by_side(args)
        return
    if args.lead is None:
        args.lead = 2.0
    rows = []
    with EmbeddedRedis() as server:
        url = server.url.rsplit("/", 1)[0] + "/0"
        broker_url = url if args.broker == "same" else url.rsplit("/", 1)[0] + "/1"
        for n in (int(x) for x in args.entries.split(",")):
            floors = [floor(url, n) for _ in range(args.repeat)]
            rows.append(f"| floor (pipelined LPUSH of pre-built messages) | {n:,} | "
                        f"{statistics.median(floors):.3f} | - | - | - |")
            for kind in args.kinds.split(","):
                runs = [one_run(url, broker_url, kind, n, args.cold, args.lead)
                        for _ in range(args.repeat)]
                print(json.dumps(runs), file=sys.stderr, flush=True)
                lasts = [r["last_s"] for r in runs]
                rows.append(
                    f"| celery-leader {kind} (broker {args.broker}) | {n:,} | "
                    f"{statistics.median(lasts):.3f} (runs {', '.join(f'{x:.3f}' for x in lasts)})"
                    f" | {statistics.median(r['first_s'] for r in runs) * 1000:.1f} | "
                    f"{max(r['longest_in_redis_ms'] for r in runs):.1f} | "
                    f"{max(r['cold_at_fire'] for r in runs):,} |")
    print("| contender | N | last message in the broker after the fire instant, s "
          "(median) | first batch started, ms after | longest script in Redis (SLOWLOG), ms | "
          "cold at fire |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
