"""Deterministic reproduction of the sub-millisecond fire-time bugs in
ScheduleRunner._run / _fire_due, found by benchmarks/scheduler.py.

The heap is keyed by ``_ms(fire)`` (rounded to the nearest ms) and popped
when ``key <= _ms(now)``, but ``_fire_due`` compares exact datetimes.  When
the fire time's sub-ms part is below .5 ms, the runner wakes (or is already
awake) up to 0.5 ms before the fire time, pops the entry and finds nothing due:

1. entry never fired (``slot.last is None``): ``slot.next`` becomes
   ``now + interval`` -- the tick is silently skipped;
2. entry fired before: ``slot.next`` is recomputed to the same instant, pushed
   back with the same key and popped again by the same pass (``now`` is read
   once per pass) -- a busy loop that never ends, ignores ``stop`` and
   dispatches nothing more.

A fake clock drives the runner against a throw-away redis-server:

    .venv/bin/python benchmarks/sched_livelock_repro.py
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery  # noqa: E402

from celery_leader.embedded import EmbeddedRedis  # noqa: E402
from celery_leader.entries import entry_from_config  # noqa: E402
from celery_leader.record import LeaderElectionRecord  # noqa: E402
from celery_leader.redislock import RedisLock  # noqa: E402
from celery_leader.scheduler import ScheduleRunner  # noqa: E402
from celery_leader.settings import LeaderSettings  # noqa: E402


def main() -> int:
    server = EmbeddedRedis().start()
    stop = threading.Event()
    thread = None
    try:
        client = redis.Redis.from_url(server.url)
        lock = RedisLock(client, name="repro", identity="repro")
        term = lock.create(LeaderElectionRecord("repro", lease_duration=600)).record.term
        app = Celery("repro", set_as_current=False)
        sent: list[str] = []
        app.send_task = lambda name, **kw: sent.append(kw["headers"]["leader_fire_time"])
        t0 = 1_800_000_000.0003  # started_at with a 0.3 ms fraction
        clock = [t0]
        entries = {"every-1s": entry_from_config("every-1s", {"task": "t", "schedule": 1.0},
                                                 app)}
        runner = ScheduleRunner(app, lock, LeaderSettings(redis_url=server.url),
                                entries=entries, now=lambda: clock[0])
        thread = threading.Thread(target=runner.run, args=(term, stop), daemon=True)
        thread.start()

        def at(offset: float, label: str) -> None:
            clock[0] = t0 + offset
            runner.wake()
            time.sleep(0.3)
            print(f"clock = started_at + {offset * 1000:8.3f} ms ({label}): "
                  f"{len(sent)} sent {sent[-1:] or ''}")

        print(f"started_at = {datetime.fromtimestamp(t0, timezone.utc).isoformat()}")
        at(0.9998, "0.2 ms before the 1st fire time (+1000.000 ms), same rounded ms")
        at(1.9999, "after now+1s, where the skipped tick re-anchored the entry")
        at(2.9997, "0.1 ms before the next fire time (+2999.800 ms), same rounded ms")
        at(3.5, "0.5 s later")
        stop.set()
        thread.join(2.0)
        alive = thread.is_alive()
        print(f"stop set; runner thread still running after 2 s: {alive} "
              "(busy loop in ScheduleRunner._run)" if alive else "")
        return 1 if alive else 0
    finally:
        stop.set()
        server.cleanup()  # the spinning daemon thread dies with the process


if __name__ == "__main__":
    sys.exit(main())
