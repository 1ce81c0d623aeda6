"""Fail-over of real ``celery worker`` replicas under the chaos harness's faults.

Starts the chaos suite's cluster (tests/chaos: a redis-server with AOF, three
``celery worker`` replicas of tests/apps/chaos_app.py with lease 2.0 s / renew
1.4 s / retry 0.3 s and a per-second schedule) and injects, in a seeded
shuffled order, ``--events`` SIGKILLs and ``--events`` SIGTERMs of the leading
worker with the harness's own fault methods (tests/chaos/faults.py), which
measure the fail-over, restart a replica after each fault so three stay up,
and wait until ticks flow again before the next fault.

Measured, all with CLOCK_MONOTONIC (one clock for every process of the host):

- crash fail-over: SIGKILL of the leader -> the lease in Redis names a live
  replica with a newer term (the harness polls every 50 ms), and -> that
  replica's ``started_leading`` signal (its own stamp, in ``test:events``);
- graceful hand-over: SIGTERM of the leader -> the same two, and the release
  of the lease (the old leader's ``stopped_leading`` with reason ``released``,
  stamped just before its release call) -> the new ``started_leading``.

Afterwards the dispatch record (the tick queue has no consumer) is checked with
the harness's :func:`check_dispatches`: every fire time once, only under a
valid lease, terms never overlapping, none missing (catch_up="all").

Prints a markdown report on stdout (progress on stderr).  Every process is
stopped by PID in ``finally`` (Ctrl-C and SIGTERM included).

    .venv/bin/python benchmarks/chaos_failover.py [--events 20] [--seed N] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmark the working tree, installed or not
    sys.path.insert(0, str(ROOT))

from tests.chaos.faults import WAIT, Chaos, FaultRecord  # noqa: E402
from tests.chaos.harness import (  # noqa: E402
    LEASE,
    RENEW,
    RETRY,
    ChaosCluster,
    ChaosRedis,
    check_dispatches,
    wait_until,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def event_at(cluster: ChaosCluster, kind: str, timeout: float = 5.0,
             **match: Any) -> float | None:
    """Monotonic stamp of the first ``kind`` event matching ``match`` (the
    replicas flush events asynchronously: wait a little for it)."""

    def found() -> float | None:
        for event in cluster.events(kind):
            if all(event.get(key) == value for key, value in match.items()):
                return float(event["at"])
        return None

    with contextlib.suppress(AssertionError):
        return wait_until(found, timeout, f"{kind} event {match}")
    return None


def measure(chaos: Chaos, record: FaultRecord, began: float) -> dict[str, float | None]:
    """Extra timings of one sigkill/sigterm record from the replicas' own events."""
    cluster = chaos.cluster
    facts = record.facts
    target = next(r for r in cluster.replicas if r.name == facts["target"])
    started = event_at(cluster, "started_leading", term=facts["new_term"])
    out: dict[str, float | None] = {"started_event": None if started is None
                                    else started - began}
    if record.kind == "sigterm":
        released = event_at(cluster, "stopped_leading", pid=target.pid, term=facts["term"],
                            reason="released", timeout=1.0)
        out["drain"] = None if released is None else released - began
        out["from_release"] = (None if released is None or started is None
                               else started - released)
    return out


def run_fault(chaos: Chaos, kind: str, index: int) -> FaultRecord:
    """One fault, the way Chaos.run() does it, keeping the signal's instant."""
    chaos.steady()
    record = FaultRecord(index, kind, time.monotonic())
    chaos.records.append(record)
    # The fault methods take their own stamp right before the signal; recover it
    # from their measured interval and the moment the new leader was seen.
    original = chaos.cluster.wait_leader
    seen_at: list[float] = []

    def wait_leader(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        seen_at.append(result[2])
        return result

    chaos.cluster.wait_leader = wait_leader  # type: ignore[method-assign]
    try:
        getattr(chaos, kind)(record)
    finally:
        chaos.cluster.wait_leader = original  # type: ignore[method-assign]
        record.ended = time.monotonic()
    interval = record.facts["failover" if kind == "sigkill" else "handover"]
    signalled = seen_at[1] - interval  # [0]: the leader before, [1]: the new one
    record.facts.update(measure(chaos, record, signalled))
    return record


def row(name: str, values: Sequence[float], wanted: int) -> str:
    if not values:
        return f"| {name} | 0/{wanted} | n/a | n/a | n/a | n/a |"
    return (f"| {name} | {len(values)}/{wanted} | {percentile(values, 50):.3f} | "
            f"{percentile(values, 99):.3f} | {max(values):.3f} | {min(values):.3f} |")


def settle_and_check(cluster: ChaosCluster) -> tuple[str, list[str]]:
    """Wait until the schedule has caught up, then check every dispatch."""
    end = int(time.time())
    wait_until(lambda: max((d.fire for d in cluster.dispatches(latest=5)), default=0) > end
               and cluster.pending() == 0, WAIT, f"dispatch of the tick after {end}",
               cluster.describe_state)
    dispatches = [d for d in cluster.dispatches() if d.fire <= end]
    result = check_dispatches(dispatches, contiguous=True)
    return result.summary(), result.problems


def redis_version() -> str:
    from celery_leader.embedded import redis_server_binary

    with contextlib.suppress(Exception):
        out = subprocess.run([redis_server_binary(), "--version"], capture_output=True,
                             text=True, timeout=10).stdout
        for part in out.split():
            if part.startswith("v="):
                return part[2:]
    return "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20,
                        help="SIGKILLs and SIGTERMs of the leader, each (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="order and phases (random)")
    parser.add_argument("--keep", action="store_true", help="keep the logs' temp dir")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    order = ["sigkill"] * args.events + ["sigterm"] * args.events
    rng.shuffle(order)
    command = " ".join([".venv/bin/python", "benchmarks/chaos_failover.py",
                         *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    log(f"seed {seed}: {len(order)} faults")

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored
    tmp = Path(tempfile.mkdtemp(prefix="chaos-failover-"))
    server = ChaosRedis(tmp / "redis")
    cluster: ChaosCluster | None = None
    chaos: Chaos | None = None
    records: list[FaultRecord] = []
    check: tuple[str, list[str]] | None = None
    began = time.monotonic()
    try:
        server.start()
        cluster = ChaosCluster(tmp, server, f"bench-{uuid.uuid4().hex[:8]}",
                               {"LEADER_CATCH_UP": "all"})
        cluster.wait_ready([cluster.start_replica() for _ in range(3)])
        cluster.wait_leader(WAIT)
        chaos = Chaos(cluster, rng, first_outlive=False)
        for index, kind in enumerate(order, 1):
            record = run_fault(chaos, kind, index)
            records.append(record)
            log(record.line())
        chaos.steady()
        assert len(cluster.live()) == 3, cluster.describe_state()
        check = settle_and_check(cluster)
        log(f"dispatch check: {check[0]}; problems: {len(check[1])}")
    except BaseException as exc:
        log(f"aborted after {len(records)} faults: {exc!r}")
        if cluster is not None:
            log(cluster.logs(1500))
        raise
    finally:
        try:
            if chaos is not None:
                chaos.close()
            if cluster is not None:
                cluster.stop()
        finally:
            server.stop()
            if args.keep:
                log(f"logs kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    took = time.monotonic() - began
    report(records, args.events, check, seed, command, took)
    return 0 if check is not None and not check[1] else 1


def report(records: list[FaultRecord], wanted: int, check: tuple[str, list[str]] | None,
           seed: int, command: str, took: float) -> None:
    kills = [r.facts for r in records if r.kind == "sigkill"]
    terms = [r.facts for r in records if r.kind == "sigterm"]

    def values(facts: list[dict[str, Any]], key: str) -> list[float]:
        return [float(f[key]) for f in facts if f.get(key) is not None]

    lines = [
        f"Command: `{command}` (seed {seed}, {took:.0f} s)",
        "",
        f"Machine: nproc {len(os.sched_getaffinity(0))}, Python "
        f"{platform.python_version()}, redis-server {redis_version()}, "
        f"{platform.system()} {platform.release()}",
        "",
        f"Timings: lease {LEASE} s, renew deadline {RENEW} s, retry period {RETRY} s; "
        "3 `celery worker` replicas (prefork, -c 1), one restarted after each fault.",
        "",
        "| interval (s) | n | p50 | p99 | max | min |",
        "|---|---|---|---|---|---|",
        row("crash: SIGKILL → new term seen in Redis (harness)", values(kills, "failover"),
            wanted),
        row("crash: SIGKILL → `started_leading`", values(kills, "started_event"), wanted),
        row("graceful: SIGTERM → new term seen in Redis (harness)",
            values(terms, "handover"), wanted),
        row("graceful: SIGTERM → `started_leading`", values(terms, "started_event"), wanted),
        row("graceful: SIGTERM → release (warm shutdown drain)", values(terms, "drain"),
            wanted),
        row("graceful: release → `started_leading`", values(terms, "from_release"), wanted),
        "",
    ]
    if check is None:
        lines.append("Dispatch check: not run (the sequence was aborted).")
    else:
        summary, problems = check
        verdict = "no fire time dispatched twice, no problem" if not problems else (
            f"{len(problems)} problem(s)")
        lines.append(f"Dispatch check (`check_dispatches`, contiguous): {summary} — "
                     f"**{verdict}**")
        lines.extend(f"- {problem}" for problem in problems)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
