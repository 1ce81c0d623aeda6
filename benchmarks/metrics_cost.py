"""The cost of the metrics with a schedule of 10k entries (docs/benchmarks.md#metrics).

In-process, no Redis: what the runner's hook costs per tick sent
(``ScheduleStats.sent``), the memory the counters hold after every entry sent
once, and what a scrape of /metrics costs (CPU time, bytes), with per-entry
labels off (the default) and on (``leader_metrics_per_entry``).

    .venv/bin/python benchmarks/metrics_cost.py [--entries 10000]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery_leader.election.metrics import render
from celery_leader.schedule.metrics import ScheduleStats


def measure(entries: int, per_entry: bool, rounds: int) -> dict[str, float]:
    ticks = [f"entry-{i:05d}@{1_700_000_000_000 + i}" for i in range(entries)]
    tracemalloc.start()
    stats = ScheduleStats(per_entry=per_entry)
    base = tracemalloc.get_traced_memory()[0]
    for tick in ticks:  # every entry sent once: its series exist
        stats.sent(tick, term=1)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    started = time.process_time()
    for _ in range(rounds):
        for tick in ticks:
            stats.sent(tick, term=1)
    per_tick = (time.process_time() - started) / (rounds * entries)
    scrapes, size = 5, 0
    started = time.process_time()
    for _ in range(scrapes):
        size = len(render([lambda: stats.families("bench", lambda: 0)]))
    per_scrape = (time.process_time() - started) / scrapes
    return {"per_tick_us": per_tick * 1e6, "held_mib": held / 2**20,
            "scrape_ms": per_scrape * 1e3, "scrape_kib": size / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.entries} entries, CPU time (process_time), Python {sys.version.split()[0]}")
    print(f"{'labels':<10} {'hook/tick':>10} {'memory':>10} {'scrape CPU':>11} {'scrape size':>12}")
    for per_entry in (False, True):
        r = measure(args.entries, per_entry, args.rounds)
        print(f"{'per entry' if per_entry else 'default':<10} {r['per_tick_us']:>8.2f}us "
              f"{r['held_mib']:>7.2f}MiB {r['scrape_ms']:>9.1f}ms {r['scrape_kib']:>9.0f}KiB")


if __name__ == "__main__":
    main()
