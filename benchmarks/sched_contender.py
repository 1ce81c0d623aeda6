"""One scheduler contender at one size, in its own process, for benchmarks/scheduler.py.

    sched_contender.py '<json config>'

Prints one JSON object on stdout (progress and logs go to stderr).  The
config names the contender (``leader``, ``beat`` or ``redbeat``), the number
of entries, the target dispatch rate, the warm-up and window lengths, and the
contender's dedicated redis-server URL (unused by ``beat``).

The same schedule and the same publish capture for every contender:

- ``active`` entries with distinct interval schedules spread evenly over
  [period, 2 * period], so that together they fire ``rate`` times a second
  with (almost) no two fire times in the same millisecond; the other entries
  (``idle``) never fire in the run: intervals of a day or more, each its own
  (``distinct``), or one of 24 monthly crontabs (``alike``).  The active
  entries come last in ``beat_schedule``, so stock beat and RedBeat (which
  anchor an entry at its creation) anchor them at the end of their start-up.
- ``broker: memory`` (the default): ``app.send_task`` is replaced by a
  recorder that notes ``time.time()``; no task is registered, so stock beat
  and RedBeat publish through ``app.send_task`` too.  The broker is
  ``memory://`` and never used.
- ``broker: redis`` / ``redis-other``: every contender publishes for real,
  through kombu's Redis transport, to the throw-away redis-server (the lease's
  database, or database 1); benchmarks/scheduler.py pops the messages as they
  arrive and measures dispatches and lateness from them (arrival time minus
  the fire time: the message's ``leader_fire_time`` header, or for stock beat
  and RedBeat the one the ``apply_async`` wrapper noted for the task id it
  returned, reported in ``fires``).
- Fire time of a publish: celery-leader puts it in the ``leader_fire_time``
  header; for stock beat and RedBeat it is ``entry.last_run_at +
  run_every`` of the entry being applied (their interval ``is_due`` rule),
  noted by a wrapper around ``Scheduler.apply_async``.

Measured: start-up (construct the scheduler with N entries until it is ready
to dispatch), RSS (``/proc/self/statm``) after start-up and at the end minus
the RSS before construction (imports, app and the ``beat_schedule`` dict are
in the baseline), and over the window: process CPU time (all threads),
dispatches, lateness, ``INFO commandstats``/``INFO cpu`` deltas of the
dedicated redis-server, and client round trips (calls of redis-py's
``send_packed_command``: one per command or per pipeline).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmark the working tree, installed or not
    sys.path.insert(0, str(ROOT))

import redis.connection  # noqa: E402
from _child import exit_with_parent  # noqa: E402
from celery import Celery  # noqa: E402

TASK = "bench.noop"  # never registered: every contender publishes via app.send_task
IDLE_BASE = 86400.0  # idle entries fire after a day or more


def active_periods(rate: float, period: float) -> list[float]:
    """Distinct intervals spread evenly over [period, 2 * period) whose fire
    rates add up to ``rate`` per second (sum of 1/p = k * ln 2 / period)."""
    k = max(1, round(rate * period / math.log(2)))
    return [round(period * (1 + i / k), 3) for i in range(k)]


def idle_schedule(i: int, idle: str) -> Any:
    """Idle entry ``i``'s schedule.  ``distinct``: an interval of its own (a day
    and ``i`` s); ``alike``: one of 24 crontabs (an hour of the 1st of a month
    six months away), a new object per entry as a loop building beat_schedule
    makes them, like per-customer reports sharing a few schedules."""
    if idle == "distinct":
        return IDLE_BASE + i
    from datetime import date

    from celery.schedules import crontab

    month = (date.today().month + 5) % 12 + 1
    return crontab(minute=0, hour=i % 24, day_of_month=1, month_of_year=month)


def build_schedule(entries: int, rate: float, period: float, idle_kind: str = "distinct",
                   idle_too: bool = True) -> tuple[dict[str, Any], float]:
    periods = active_periods(rate, period)[:entries]
    idle = entries - len(periods) if idle_too else 0
    schedule: dict[str, Any] = {}
    for i in range(idle):
        schedule[f"idle-{i:06d}"] = {"task": TASK, "schedule": idle_schedule(i, idle_kind),
                                     "args": (i,)}
    for i, p in enumerate(periods):
        schedule[f"active-{i:06d}"] = {"task": TASK, "schedule": p, "args": (i,)}
    return schedule, sum(1 / p for p in periods)


# --------------------------------------------------------------- measurement

ROUND_TRIPS = [0]
_send_packed = redis.connection.AbstractConnection.send_packed_command


def _counting_send_packed(self: Any, command: Any, check_health: bool = True) -> Any:
    ROUND_TRIPS[0] += 1
    return _send_packed(self, command, check_health)


redis.connection.AbstractConnection.send_packed_command = _counting_send_packed  # type: ignore[method-assign]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def redis_info(url: str | None) -> dict[str, Any]:
    """INFO over a raw socket, so the benchmark's own reads are not counted
    as client round trips (INFO itself is dropped from commandstats)."""
    if not url:
        return {}
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"INFO all\r\n")
        data = b""
        while b"\r\n" not in data:
            data += sock.recv(65536)
        header, rest = data.split(b"\r\n", 1)
        size = int(header[1:])
        while len(rest) < size:
            rest += sock.recv(65536)
    calls: dict[str, int] = {}
    info: dict[str, Any] = {"calls": calls}
    for line in rest[:size].decode().splitlines():
        if line.startswith("cmdstat_"):
            name, fields = line[len("cmdstat_"):].split(":", 1)
            stats = dict(kv.split("=", 1) for kv in fields.split(","))
            if name not in ("info", "command", "config"):
                calls[name] = int(stats["calls"])
        elif line.startswith(("used_cpu_sys:", "used_cpu_user:")):
            info.setdefault("cpu", 0.0)
            info["cpu"] += float(line.split(":", 1)[1])
        elif line.startswith("used_memory:"):
            info["memory"] = int(line.split(":", 1)[1])
    return info


class Recorder:
    """Replaces ``app.send_task``: notes the publish time and the fire time.
    With a real broker (``real``) it records nothing: the harness pops the
    messages, and the apply_async wrapper puts the fire time in a header."""

    def __init__(self, real: bool = False) -> None:
        self.records: list[tuple[float, Any]] = []
        self.pending: Any = None  # fire time noted by the apply_async wrapper
        self.real = real
        self.fires: dict[str, float] = {}  # task id -> fire time (a real broker)

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        headers = options.get("headers") or {}
        fire = headers.get("leader_fire_time", self.pending)
        self.records.append((time.time(), fire))

    def wrap_apply_async(self, scheduler: Any) -> None:
        original = scheduler.apply_async

        def apply_async(entry: Any, *args: Any, **kwargs: Any) -> Any:
            self.pending = (entry.last_run_at, entry.schedule.run_every)
            fire = fire_seconds(self.pending) if self.real else None
            result = original(entry, *args, **kwargs)
            if fire is not None and result is not None:
                self.fires[result.id] = fire
            return result

        scheduler.apply_async = apply_async


def fire_seconds(fire: Any) -> float:
    from datetime import datetime

    if isinstance(fire, str):  # celery-leader's header
        return datetime.fromisoformat(fire).timestamp()
    last_run_at, run_every = fire
    return float((last_run_at + run_every).timestamp())


class Snapshot:
    def __init__(self, recorder: Recorder, redis_url: str | None) -> None:
        self.wall = time.time()
        self.cpu = time.process_time()
        self.records = len(recorder.records)
        self.round_trips = ROUND_TRIPS[0]
        self.redis = redis_info(redis_url)
        self.rss = rss_bytes()


def window_result(start: Snapshot, end: Snapshot, recorder: Recorder) -> dict[str, Any]:
    dispatches = end.records - start.records
    lateness = sorted((t - fire_seconds(fire)) * 1000
                      for t, fire in recorder.records[start.records:end.records])

    def pct(q: float) -> float | None:
        if not lateness:
            return None
        return lateness[min(len(lateness) - 1, max(0, math.ceil(q * len(lateness)) - 1))]

    out: dict[str, Any] = {
        "window_start": start.wall, "window_end": end.wall,
        "window_s": end.wall - start.wall,
        "dispatches": dispatches,
        "cpu_s": end.cpu - start.cpu,
        "client_round_trips": end.round_trips - start.round_trips,
        "lateness_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0)},
    }
    if start.redis:
        before, after = start.redis["calls"], end.redis["calls"]
        out["redis_calls"] = {k: v - before.get(k, 0) for k, v in after.items()
                              if v - before.get(k, 0)}
        out["redis_cpu_s"] = end.redis.get("cpu", 0.0) - start.redis.get("cpu", 0.0)
    return out


# --------------------------------------------------------------- contenders

def make_app(cfg: dict[str, Any], schedule: dict[str, Any]) -> Celery:
    app = Celery("bench", set_as_current=False)
    broker = cfg.get("broker", "memory")
    broker_url = "memory://"
    if broker == "redis":
        broker_url = cfg["redis_url"]
    elif broker == "redis-other":
        broker_url = cfg["redis_url"].rsplit("/", 1)[0] + "/1"
    app.conf.update(
        broker_url=broker_url, timezone="UTC", enable_utc=True, beat_schedule=schedule,
        result_backend=None, leader_name="bench",
        redbeat_redis_url=cfg.get("redis_url"),
    )
    if cfg.get("redis_url"):
        app.conf.leader_redis_url = cfg["redis_url"]
    return app


def store_idle_as_runtime(cfg: dict[str, Any], schedule: dict[str, Any]) -> dict[str, Any]:
    """Write the idle entries to Redis as runtime entries (what
    ``ScheduleStore.add`` writes), before anything is measured; the rest of
    ``schedule`` (the active entries) is returned for beat_schedule."""
    if not cfg["contender"].startswith("leader"):
        raise SystemExit("--idle-in runtime: celery-leader contenders only")
    from celery_leader.schedule.entries import entry_from_config, entry_to_json
    from celery_leader.schedule_api import ScheduleStore

    app = make_app(cfg, {})
    store = ScheduleStore.for_app(app)
    idle = [name for name in schedule if name.startswith("idle-")]
    for start in range(0, len(idle), 5000):
        store.client.hset(store.entries_key, mapping={
            name: entry_to_json(entry_from_config(name, schedule[name], app))
            for name in idle[start:start + 5000]})
    app.close()
    return {name: spec for name, spec in schedule.items() if not name.startswith("idle-")}


def store_runtime_then_exit(cfg: dict[str, Any]) -> None:
    """``--store-runtime``: write the idle entries as runtime entries, in a
    process of their own, so that the contender's RSS baseline holds none of
    the objects made to write them."""
    schedule, _ = build_schedule(cfg["entries"], cfg["rate"], cfg["period"],
                                 cfg.get("idle", "distinct"))
    store_idle_as_runtime(cfg, schedule)


def ms_clock() -> float:
    """time.time() floored to a whole millisecond (see run_leader)."""
    return math.floor(time.time() * 1000) / 1000


def run_leader(app: Celery, cfg: dict[str, Any], recorder: Recorder) -> dict[str, Any]:
    import functools

    import celery_leader.beat
    from celery_leader.beat import LeaderScheduler
    from celery_leader.scheduler import ScheduleRunner

    if cfg["contender"] == "leader-msclock":
        # Work-around for the sub-millisecond livelock of ScheduleRunner._run
        # (heap keys rounded to the nearest ms, due check on exact times with
        # one `now` per pass): with a whole-ms clock, started_at and hence
        # every fire time (intervals are whole ms too) is a whole ms.
        celery_leader.beat.ScheduleRunner = functools.partial(  # type: ignore[misc]
            ScheduleRunner, now=ms_clock)

    ready = threading.Event()
    original_load = ScheduleRunner._load

    def load(self: ScheduleRunner, started_at: Any, previous: Any = None) -> Any:
        result = original_load(self, started_at, previous)
        ready.set()  # first load done: about to dispatch
        return result

    ScheduleRunner._load = load  # type: ignore[method-assign]
    profile = cfg.get("profile")
    if profile:
        original_run = ScheduleRunner.run

        def run(self: ScheduleRunner, term: int, stop: threading.Event) -> None:
            import cProfile

            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            try:
                original_run(self, term, stop)
            finally:
                prof.disable()
                prof.dump_stats(profile)

        ScheduleRunner.run = run  # type: ignore[method-assign]

    rss0 = rss_bytes()
    t0 = time.perf_counter()
    sched = LeaderScheduler(app)
    try:
        if not ready.wait(cfg["startup_timeout"]):
            raise RuntimeError("celery-leader did not become ready in time")
        startup = time.perf_counter() - t0
        rss_ready = rss_bytes()
        time.sleep(cfg["warmup"])
        start = Snapshot(recorder, cfg["redis_url"])
        time.sleep(cfg["seconds"])
        end = Snapshot(recorder, cfg["redis_url"])
    finally:
        sched.close()
    return dict(window_result(start, end, recorder), startup_s=startup,
                rss_ready=rss_ready - rss0, rss_end=end.rss - rss0)


def run_tick_loop(sched: Any, cfg: dict[str, Any], recorder: Recorder,
                  ready_at: float) -> tuple[Snapshot, Snapshot]:
    """celery.beat.Service.start's loop: tick, sleep what it returns."""
    window_at = ready_at + cfg["warmup"]
    end_at = window_at + cfg["seconds"]
    start: Snapshot | None = None
    profiler = None
    while True:
        now = time.time()
        if start is None and now >= window_at:
            start = Snapshot(recorder, cfg.get("redis_url"))
            if cfg.get("profile"):
                import cProfile

                profiler = cProfile.Profile(time.thread_time)
                profiler.enable()
        if now >= end_at:
            break
        interval = sched.tick()
        if interval and interval > 0.0:
            mark = window_at if start is None else end_at
            time.sleep(max(0.0, min(interval, mark - time.time())))
            if sched.should_sync():
                sched._do_sync()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(cfg["profile"])
    end = Snapshot(recorder, cfg.get("redis_url"))
    assert start is not None
    return start, end


def run_beat(app: Celery, cfg: dict[str, Any], recorder: Recorder) -> dict[str, Any]:
    from celery.beat import PersistentScheduler

    workdir = tempfile.mkdtemp(prefix="sched-bench-beat-")
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    sched = PersistentScheduler(app, schedule_filename=os.path.join(workdir, "celerybeat-schedule"))
    try:
        recorder.wrap_apply_async(sched)
        sched.tick()  # the first tick builds the heap (is_due of every entry)
        startup = time.perf_counter() - t0
        rss_ready = rss_bytes()
        start, end = run_tick_loop(sched, cfg, recorder, time.time())
    finally:
        sched.close()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return dict(window_result(start, end, recorder), startup_s=startup,
                rss_ready=rss_ready - rss0, rss_end=end.rss - rss0)


def run_redbeat(app: Celery, cfg: dict[str, Any], recorder: Recorder) -> dict[str, Any]:
    from types import SimpleNamespace

    from redbeat import RedBeatScheduler
    from redbeat.schedulers import acquire_distributed_beat_lock

    rss0 = rss_bytes()
    t0 = time.perf_counter()
    sched = RedBeatScheduler(app)  # setup_schedule stores every entry in Redis
    try:
        # What the beat_init signal does in `celery beat`: take RedBeat's lock.
        acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=sched))
        recorder.wrap_apply_async(sched)
        sched.tick()
        startup = time.perf_counter() - t0
        rss_ready = rss_bytes()
        start, end = run_tick_loop(sched, cfg, recorder, time.time())
    finally:
        sched.close()
    return dict(window_result(start, end, recorder), startup_s=startup,
                rss_ready=rss_ready - rss0, rss_end=end.rss - rss0)


RUNNERS = {"leader": run_leader, "leader-msclock": run_leader, "beat": run_beat,
           "redbeat": run_redbeat}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exit_with_parent()
    runtime = cfg.get("idle_in", "beat_schedule") == "runtime"
    if runtime:
        # Written by a process of its own: none of its objects in this one's baseline.
        subprocess.run([sys.executable, __file__, "--store-runtime", sys.argv[1]], check=True)
    schedule, rate = build_schedule(cfg["entries"], cfg["rate"], cfg["period"],
                                    cfg.get("idle", "distinct"), idle_too=not runtime)
    app = make_app(cfg, schedule)
    real = cfg.get("broker", "memory") != "memory"
    recorder = Recorder(real)
    if not real:
        app.send_task = recorder.send_task  # type: ignore[method-assign]
    redis_before = redis_info(cfg.get("redis_url"))
    result = RUNNERS[cfg["contender"]](app, cfg, recorder)
    redis_after = redis_info(cfg.get("redis_url"))
    if redis_after:
        result["redis_memory"] = redis_after["memory"] - redis_before["memory"]
    if real:
        result["fires"] = recorder.fires
    result.update(contender=cfg["contender"], entries=cfg["entries"], target_rate=rate,
                  broker=cfg.get("broker", "memory"),
                  dispatches_total=len(recorder.records),
                  active=min(cfg["entries"], len(active_periods(cfg["rate"], cfg["period"]))))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--store-runtime":
        store_runtime_then_exit(json.loads(sys.argv[2]))
    else:
        main()
