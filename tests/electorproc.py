"""One elector in its own process, for tests/test_elector_multiprocess.py.

Prints one machine-readable line per event to stdout (flushed), times on the
system-wide monotonic clock so the test can compare them across processes:

    READY <identity> <pid> <t>
    NEWLEADER <identity> <leader> <t>
    STARTED <identity> <term> <t>
    CLAIM <identity> <term> <result> <t_before> <t_after> <kind>
    STOPPED <identity> <term> <t> <reason>
    EXITED <identity> <t>

While leading, the work claims a fresh key every --claim-interval seconds with
its term and never checks ``is_leader()`` itself: fencing alone must stop a
stale leader.  With --claim-after-stop it tries once more with the old term
when leadership ends (kind ``afterstop``), as a paused process would on
waking.  SIGTERM calls ``elector.stop()``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import redis

from celery_leader import LeaderCallbacks, LeaderElectionConfig, LeaderElector, RedisLock

_print_lock = threading.Lock()


def emit(*fields: object) -> None:
    line = " ".join(str(f) for f in fields)
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--renew", type=float, default=0.7)
    parser.add_argument("--retry", type=float, default=0.2)
    parser.add_argument("--claim-interval", type=float, default=0.05)
    parser.add_argument("--release-on-cancel", action="store_true")
    parser.add_argument("--claim-after-stop", action="store_true")
    args = parser.parse_args()
    identity = args.identity

    client = redis.Redis.from_url(args.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    lock = RedisLock(client, name=args.name, identity=identity)
    elector_ref: list[LeaderElector] = []
    terms: list[int] = []
    claims = [0]

    def claim(term: int, kind: str) -> None:
        claims[0] += 1
        key = f"claim:{identity}:{term}:{claims[0]}"
        before = time.monotonic()
        try:
            result = lock.claim(key, term).name
        except Exception as exc:  # Redis down: report, keep going
            result = f"ERROR:{type(exc).__name__}"
        emit("CLAIM", identity, term, result, f"{before:.6f}", f"{time.monotonic():.6f}", kind)

    def on_started_leading(stop: threading.Event) -> None:
        term = elector_ref[0].term
        terms.append(term)
        emit("STARTED", identity, term, f"{time.monotonic():.6f}")
        if term == 0:
            return
        while not stop.is_set():
            claim(term, "work")
            stop.wait(args.claim_interval)

    def on_stopped_leading() -> None:
        elector = elector_ref[0]
        term = terms[-1] if terms else 0
        emit("STOPPED", identity, term, f"{time.monotonic():.6f}",
             elector.last_stop_reason.replace(" ", "_") or "-")
        if term and args.claim_after_stop:
            claim(term, "afterstop")

    def on_new_leader(leader: str) -> None:
        emit("NEWLEADER", identity, leader, f"{time.monotonic():.6f}")

    config = LeaderElectionConfig(
        lock=lock,
        callbacks=LeaderCallbacks(on_started_leading, on_stopped_leading, on_new_leader),
        lease_duration=args.lease, renew_deadline=args.renew, retry_period=args.retry,
        release_on_cancel=args.release_on_cancel, name=args.name,
    )
    elector = LeaderElector(config)
    elector_ref.append(elector)
    stop = threading.Event()

    def on_sigterm(signum: int, frame: object) -> None:
        elector.stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    thread = threading.Thread(target=elector.run, args=(stop,), name="elector", daemon=True)
    thread.start()
    emit("READY", identity, os.getpid(), f"{time.monotonic():.6f}")
    # The main thread only waits (in short joins, so the SIGTERM handler runs promptly).
    while thread.is_alive():
        thread.join(0.05)
    emit("EXITED", identity, f"{time.monotonic():.6f}")
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
