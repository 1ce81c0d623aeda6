"""10,000 django-celery-beat rows: celery-leader's source (leader_django_celery_beat)
side by side with django-celery-beat's own DatabaseScheduler, on the same
PostgreSQL database (a throwaway server, as in the tests).

Each scheduler is measured in a fresh process: start-up (reading and converting
every row into a schedule), resident memory that added, and the time from an
admin change (``save()`` of one row, from another process) until the scheduler
holds the changed schedule -- for celery-leader the source's polling thread
(every half ``leader_retry_period``) then wakes the runner; for DatabaseScheduler
the beat loop's next ``schedule`` read (it sleeps up to ``beat_max_loop_interval``,
5 s by default for it, between reads).

    .venv/bin/python benchmarks/django_beat.py [--rows 10000] [--changes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup_django(db: str, redis_url: str) -> Any:
    os.environ.update(LEADER_TEST_DB=db, REDIS_URL=redis_url, LEADER_RETRY="2.0",
                      LEADER_LEASE="15", LEADER_RENEW="10",
                      DJANGO_SETTINGS_MODULE="tests.django_proj.settings")
    import django

    django.setup()
    from celery import Celery

    app = Celery("bench", set_as_current=True)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    return app


def seed(db: str, redis_url: str, rows: int) -> None:
    setup_django(db, redis_url)
    from django.core.management import call_command
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

    call_command("migrate", verbosity=0)
    every = [IntervalSchedule.objects.create(every=n, period="seconds") for n in (30, 60, 300)]
    tabs = [CrontabSchedule.objects.create(minute=str(m), timezone="Europe/Berlin")
            for m in range(0, 60, 5)]
    PeriodicTask.objects.bulk_create([
        PeriodicTask(name=f"task-{i}", task="proj.tick", args=json.dumps([i]),
                     interval=every[i % 3] if i % 2 else None,
                     crontab=None if i % 2 else tabs[i % len(tabs)])
        for i in range(rows)], batch_size=2000)
    from django_celery_beat.models import PeriodicTasks

    PeriodicTasks.update_changed()


def change(db: str, redis_url: str, name: str) -> None:
    setup_django(db, redis_url)
    from django_celery_beat.models import PeriodicTask

    row = PeriodicTask.objects.get(name=name)
    row.args = json.dumps([time.time()])
    row.save()
    print(json.dumps({"saved_at": time.time()}))


def measure(kind: str, db: str, redis_url: str, changes: int) -> dict[str, Any]:
    base = rss_mb()
    app = setup_django(db, redis_url)
    imported = rss_mb()
    started = time.perf_counter()
    if kind == "celery-leader":
        from celery_leader.contrib.django_beat import DjangoBeatSource
        from celery_leader.schedule_api import ScheduleStore

        source = DjangoBeatSource(app, ScheduleStore.for_app(app), poll=1.0)
        count = len(source.entries())  # starts the thread, waits for the first read

        def holds(name: str, marker: float) -> bool:
            return json.dumps([marker]) == json.dumps(list(source.entries()[name].args))
    else:
        from django_celery_beat.schedulers import DatabaseScheduler

        scheduler = DatabaseScheduler(app=app, lazy=False)
        count = len(scheduler.schedule)
        loop = scheduler.max_interval

        def holds(name: str, marker: float) -> bool:
            entry = scheduler.schedule[name]  # what one beat loop iteration reads
            return json.dumps([marker]) == entry.model.args
    startup = time.perf_counter() - started
    memory = rss_mb() - imported
    latencies = []
    for i in range(changes):
        name = f"task-{i * 7 + 1}"
        done = subprocess.run([sys.executable, __file__, "--child", "change", "--db", db,
                               "--redis-url", redis_url, "--name", name],
                              capture_output=True, text=True, check=True, cwd=ROOT)
        saved = json.loads(done.stdout)
        from django_celery_beat.models import PeriodicTask
        marker = json.loads(PeriodicTask.objects.get(name=name).args)[0]
        while not holds(name, marker):
            # DatabaseScheduler is asked once per beat loop (max_interval apart).
            time.sleep(loop if kind != "celery-leader" else 0.01)
        latencies.append(time.time() - saved["saved_at"])
    return {"scheduler": kind, "rows": count, "startup_s": round(startup, 2),
            "rss_added_mb": round(memory, 1), "rss_before_mb": round(base, 1),
            "change_s_median": round(statistics.median(latencies), 2),
            "change_s_max": round(max(latencies), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--child")
    parser.add_argument("--db")
    parser.add_argument("--redis-url")
    parser.add_argument("--name")
    args = parser.parse_args()
    if args.child == "change":
        change(args.db, args.redis_url, args.name)
        return
    if args.child in ("celery-leader", "DatabaseScheduler"):
        print(json.dumps(measure(args.child, args.db, args.redis_url, args.changes)))
        return
    if args.child == "seed":
        seed(args.db, args.redis_url, args.rows)
        return

    from celery_leader.testing import EmbeddedRedis
    from tests.django_db import Postgres, postgres_bin

    bindir = postgres_bin()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install -y postgresql)")
    redis_server = EmbeddedRedis()
    redis_server.start()
    pg = Postgres(bindir)
    try:
        pg.start()
        db = pg.create_database()
        redis_url = f"redis://127.0.0.1:{redis_server.port}/0"
        common = ["--db", db, "--redis-url", redis_url, "--rows", str(args.rows),
                  "--changes", str(args.changes)]
        subprocess.run([sys.executable, __file__, "--child", "seed", *common], check=True,
                       cwd=ROOT)
        for kind in ("celery-leader", "DatabaseScheduler"):
            done = subprocess.run([sys.executable, __file__, "--child", kind, *common],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                continue
            print(done.stdout.strip().splitlines()[-1])
    finally:
        pg.cleanup()
        redis_server.cleanup()


if __name__ == "__main__":
    main()
