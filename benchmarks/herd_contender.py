"""One herd contender in its own process, for ``benchmarks/herd.py --side-by-side``.

    herd_contender.py '<json config>'

The config names the contender (``leader``: celery-leader's ScheduleRunner,
the dispatcher ``celery beat -S leader`` runs; ``redbeat``: celery-redbeat's
RedBeatScheduler; ``beat``: stock celery.beat.PersistentScheduler), the
number of entries, the schedule kind (``crontab``: ``crontab(minute='*')``
for all three; ``cron``: celery-leader's ``cron('* * * * *')``), and the Redis
URL, which is the broker (a real one: kombu's Redis transport) and RedBeat's
or celery-leader's store.  Every entry sends ``bench.noop`` with its index as
the one argument, so the parent can count each entry's messages.

The process sets up, prints one JSON line (``{"ready": <epoch s>, "setup_s":
...}``) and then runs the scheduler's own loop (celery beat's: ``tick()`` and
sleep what it returns; celery-leader's: ``ScheduleRunner.run``) until the
parent stops it (by PID) or ``deadline`` (epoch s) passes.  The parent
measures from outside: when the broker list holds all N messages.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmark the working tree, installed or not
    sys.path.insert(0, str(ROOT))

from _child import exit_with_parent  # noqa: E402
from celery import Celery  # noqa: E402
from celery.schedules import crontab  # noqa: E402

TASK = "bench.noop"


def schedule_of(kind: str) -> Any:
    if kind == "cron":
        from celery_leader import cron

        return cron("* * * * *")
    if kind == "crontab":
        return crontab(minute="*")
    raise SystemExit(f"kind must be crontab or cron, got {kind!r}")


def make_app(cfg: dict[str, Any]) -> Celery:
    schedule = schedule_of(cfg["kind"])
    app = Celery("herd", broker=cfg["redis_url"], set_as_current=False)
    app.conf.update(
        timezone="UTC", enable_utc=True, result_backend=None, leader_name="herd",
        redbeat_redis_url=cfg["redis_url"],
        beat_schedule={f"e{i:06d}": {"task": TASK, "schedule": schedule, "args": [i]}
                       for i in range(cfg["entries"])})
    app.task(name=TASK)(lambda *args: None)
    return app


def ready(started: float) -> None:
    print(json.dumps({"ready": time.time(), "setup_s": time.perf_counter() - started}),
          flush=True)


def beat_loop(sched: Any, deadline: float) -> None:
    """celery.beat.Service.start's loop: tick, sleep what it returns."""
    while time.time() < deadline:
        interval = sched.tick()
        if interval and interval > 0.0:
            time.sleep(max(0.0, min(interval, deadline - time.time())))


def run_leader(app: Celery, cfg: dict[str, Any], started: float) -> None:
    import redis

    from celery_leader.election.record import LeaderElectionRecord
    from celery_leader.election.redislock import RedisLock
    from celery_leader.schedule.runner import ScheduleRunner
    from celery_leader.settings import LeaderSettings

    client = redis.Redis.from_url(cfg["redis_url"])
    lock = RedisLock(client, name="herd", identity="bench")
    record = lock.create(LeaderElectionRecord(holder_identity="bench", lease_duration=600.0))
    assert record.record is not None
    # The shipped path: beat_schedule, its entries built as they come near.
    runner = ScheduleRunner(app, lock, LeaderSettings(redis_url=cfg["redis_url"], name="herd",
                                                      retry_period=5.0))
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(record.record.term, stop), daemon=True)
    thread.start()
    ready(started)  # the runner loads its entries and builds templates while idle
    while time.time() < cfg["deadline"] and thread.is_alive():
        time.sleep(0.2)
    stop.set()


def run_redbeat(app: Celery, cfg: dict[str, Any], started: float) -> None:
    from types import SimpleNamespace

    from redbeat import RedBeatScheduler
    from redbeat.schedulers import acquire_distributed_beat_lock

    sched = RedBeatScheduler(app)  # setup_schedule stores every entry in Redis
    try:
        # What the beat_init signal does in `celery beat`: take RedBeat's lock.
        acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=sched))
        ready(started)
        beat_loop(sched, cfg["deadline"])
    finally:
        sched.close()


def run_beat(app: Celery, cfg: dict[str, Any], started: float) -> None:
    from celery.beat import PersistentScheduler

    workdir = tempfile.mkdtemp(prefix="herd-bench-beat-")
    sched = PersistentScheduler(app, schedule_filename=os.path.join(workdir, "schedule"))
    try:
        ready(started)
        beat_loop(sched, cfg["deadline"])
    finally:
        sched.close()


RUNNERS = {"leader": run_leader, "redbeat": run_redbeat, "beat": run_beat}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    exit_with_parent()
    started = time.perf_counter()
    app = make_app(cfg)
    RUNNERS[cfg["contender"]](app, cfg, started)


if __name__ == "__main__":
    main()
