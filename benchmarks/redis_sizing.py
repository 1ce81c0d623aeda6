"""How many bytes of Redis each key family takes, per entry and per tick.

For each size (``--entries``), a fresh embedded redis-server (lease store and
broker, db 0) and a ScheduleRunner holding a lease, with that many interval
entries in ``beat_schedule``.  The runner loads them (first-seen times), one
herd claims and pushes a tick of every entry (state, start tokens, the broker
list), a consumer takes every message and starts every tick through the same
START_TICK script a worker runs (tokens consumed, attempts remembered).  After
each step the MEMORY USAGE of every key is summed by family.  Then leader-only
``done`` claims and replica heartbeats, a thousand of each, for their per-item
cost.  Prints a table of bytes per entry / per item, and the sizing at a rate
of ``--rate`` ticks per second.

    .venv/bin/python benchmarks/redis_sizing.py [--entries 10000,100000] [--rate 200]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmark the working tree, installed or not
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery  # noqa: E402

from celery_leader.election.record import LeaderElectionRecord  # noqa: E402
from celery_leader.election.redislock import RedisLock  # noqa: E402
from celery_leader.schedule.herd import Claim  # noqa: E402
from celery_leader.schedule.runner import ScheduleRunner  # noqa: E402
from celery_leader.schedule.store import to_ms  # noqa: E402
from celery_leader.schedule.tickstart import ATTEMPT_TTL_MS, TickStartClaim  # noqa: E402
from celery_leader.settings import LeaderSettings  # noqa: E402
from celery_leader.status import ReplicaRegistry  # noqa: E402
from celery_leader.taskruns import done_ttl_ms  # noqa: E402
from celery_leader.testing import EmbeddedRedis  # noqa: E402

NAME = "sizing"
ITEMS = 1000


def families(client: redis.Redis) -> dict[str, int]:
    """MEMORY USAGE summed per key family (ids and numbers folded)."""
    sizes: dict[str, int] = defaultdict(int)
    for key in client.scan_iter(count=1000):
        text = key.decode()
        family = re.sub(r"task:[^:]+$", "task:<id>", text.replace(f"{{{NAME}}}", "{name}"))
        sizes[family] += client.memory_usage(key, samples=0) or 0
    return dict(sizes)


def measure(url: str, n: int) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    client.flushall()
    lock = RedisLock(client, name=NAME, identity="bench")
    created = lock.create(LeaderElectionRecord(holder_identity="bench", lease_duration=600.0))
    assert created.record is not None
    term = created.record.term
    app = Celery("sizing", broker=url, set_as_current=False)
    app.conf.update(leader_name=NAME, beat_schedule={
        f"customer-{i:06d}-report": {"task": "proj.reports.send", "schedule": 60.0,
                                     "args": [i]} for i in range(n)})
    app.task(name="proj.reports.send")(lambda *args: None)
    settings = LeaderSettings(redis_url=url, name=NAME, retry_period=5.0)
    runner = ScheduleRunner(app, lock, settings)
    assert runner._take_schedule(term, threading.Event()) is not None
    now = datetime.now(UTC)
    runner._load(now)  # first-seen times
    fire_ms = to_ms(now + timedelta(seconds=1))
    claims = [Claim(runner.config_entries[name], fire_ms, True)
              for name in runner.config_entries]
    assert runner.herd.dispatch(claims, term)
    in_flight = families(client)
    claim = TickStartClaim(lambda: client)
    keys = runner.ticks.headers("x")["leader_tick_keys"]
    while client.rpop("celery") is not None:
        pass
    for name in runner.config_entries:
        assert claim.claim(f"{name}@{fire_ms}", keys)
    started = families(client)
    for i in range(ITEMS):
        client.set(lock.key(f"task:{i:036d}"), "done", px=done_ttl_ms({}))
    registry = ReplicaRegistry(lock, "x", 1.0)
    for i in range(ITEMS):
        registry.identity = f"celery@worker-{i:04d}-7d9f8b6c5d-abcde:1234"
        registry.beat(False, 0)
    extra = families(client)
    app.close()
    client.close()

    def family(sizes: dict[str, int], suffix: str) -> int:
        return sum(size for key, size in sizes.items() if key.endswith(suffix))

    return {
        "state": family(started, ":schedule:state") / n,
        "first-seen": family(started, ":schedule:first-seen") / n,
        "in flight (sent + sent-at)": (family(in_flight, ":schedule:sent")
                                       + family(in_flight, ":schedule:sent-at")) / n,
        "broker message": family(in_flight, "celery") / n,
        "after start (sent + sent-at)": (family(started, ":schedule:sent")
                                         + family(started, ":schedule:sent-at")) / n,
        "attempt (started)": family(started, ":schedule:started") / n,
        "done claim": family(extra, ":task:<id>") / ITEMS,
        "replica": family(extra, ":replicas") / ITEMS,
        "keys after start": float(len(started)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="10000,100000")
    parser.add_argument("--rate", type=float, default=200.0, help="ticks per second")
    parser.add_argument("--leader-only-rate", type=float, default=20.0)
    options = parser.parse_args()
    sizes = [int(n) for n in options.entries.split(",")]
    results = {}
    with EmbeddedRedis() as server:
        for n in sizes:
            results[n] = measure(server.url, n)
    rows = list(results[sizes[0]])
    print(f"{'bytes per entry / item':<32}" + "".join(f"{n:>12,}" for n in sizes))
    for row in rows:
        print(f"{row:<32}" + "".join(f"{results[n][row]:>12.1f}" for n in sizes))
    print()
    attempts_s = ATTEMPT_TTL_MS / 1000
    done_s = done_ttl_ms({}) / 1000
    print(f"Sizing at {options.rate:g} ticks/s (1 s of ticks in flight), "
          f"{options.leader_only_rate:g} leader-only messages/s, 10 replicas:")
    for n in sizes:
        r = results[n]
        per_schedule = n * (r["state"] + r["first-seen"])
        attempts = options.rate * attempts_s * r["attempt (started)"]
        flight = options.rate * (r["in flight (sent + sent-at)"] + r["broker message"])
        done = options.leader_only_rate * done_s * r["done claim"]
        total = per_schedule + attempts + flight + done + 10 * r["replica"]
        print(f"  {n:>7,} entries: schedule {per_schedule / 1e6:.1f} MB + attempts "
              f"{attempts / 1e6:.1f} MB + in flight {flight / 1e6:.2f} MB + done claims "
              f"{done / 1e6:.1f} MB = {total / 1e6:.1f} MB, whatever the uptime")
    print(json.dumps({str(n): results[n] for n in sizes}))


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print(f"Wall time: {time.monotonic() - start:.0f} s.")
