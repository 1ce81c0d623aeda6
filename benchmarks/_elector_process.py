"""One elector in its own process, for benchmarks/failover.py.

Prints one line per event on stdout, all stamped with ``time.monotonic()``
(CLOCK_MONOTONIC, system-wide on Linux, so the parent can compare stamps from
different processes with its own)::

    EV <kind> <monotonic seconds> <identity> [details...]

Kinds: READY (elector thread started), WRITE (a successful create/update of
the lease, stamped with the start of its request), WAKE (pub/sub message or subscribe
confirmation), NEWLEADER <holder>, STARTED <term> (first thing in
on_started_leading), STOPPED <reason> (on_stopped_leading), RELEASE_BEGIN
<term> / RELEASE_END <ok> (around RedisLock.release), SIGNAL <name>, COUNTS
<json> (client-side Redis round trips so far, printed on SIGUSR1), EXIT.

SIGTERM / SIGINT call ``elector.stop()`` (release_on_cancel=True by default),
then the process exits once ``run()`` returned.  SIGKILL is the crash case.
The process also exits if its parent goes away, so it never outlives the
benchmark.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from celery_leader import (
    LeaderCallbacks,
    LeaderElectionConfig,
    LeaderElectionRecord,
    LeaderElector,
    Observation,
    RedisLock,
)

_print_lock = threading.Lock()
_identity = "?"


def emit(kind: str, *details: object, stamp: float | None = None) -> None:
    now = time.monotonic() if stamp is None else stamp
    line = " ".join(["EV", kind, f"{now:.6f}", _identity, *map(str, details)])
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class CountingRedis(redis.Redis):
    """Counts every command this client sends: one count = one round trip
    (an EVALSHA is one, whatever the script does inside)."""

    counts: collections.Counter[str] = collections.Counter()
    counts_lock = threading.Lock()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        with CountingRedis.counts_lock:
            CountingRedis.counts[str(args[0]).upper()] += 1
        return super().execute_command(*args, **options)


class TimedRedisLock(RedisLock):
    """RedisLock that reports every successful write (stamped with the start of
    its request, as the elector stamps a renew), when a release is sent and
    answered, and every pub/sub wake-up the elector gets."""

    def create(self, record: LeaderElectionRecord) -> Observation:
        started = time.monotonic()
        written = super().create(record)
        emit("WRITE", "create", stamp=started)
        return written

    def update(self, record: LeaderElectionRecord, expected_raw: bytes) -> Observation:
        started = time.monotonic()
        written = super().update(record, expected_raw)
        emit("WRITE", "update", stamp=started)
        return written

    def release(self, term: int) -> bool:
        emit("RELEASE_BEGIN", term)
        ok = False
        try:
            ok = super().release(term)
        finally:
            emit("RELEASE_END", int(ok))
        return ok

    def subscribe(self, on_change: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            emit("WAKE")
            on_change()

        return super().subscribe(wrapped)


def watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    global _identity
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--name", required=True, help="election name")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--lease", type=float, required=True)
    parser.add_argument("--renew", type=float, required=True)
    parser.add_argument("--retry", type=float, required=True)
    parser.add_argument("--no-release-on-cancel", action="store_true")
    args = parser.parse_args(argv)
    _identity = args.identity

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.identity} %(name)s %(levelname)s %(message)s")
    # Signals are taken synchronously by the main thread (sigwait); every
    # thread started below inherits the mask, so no handler ever runs inside
    # the elector's own code.
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()

    client = CountingRedis.from_url(args.redis_url, client_name=args.identity,
                                    socket_timeout=max(1.0, args.renew),
                                    socket_connect_timeout=max(1.0, args.renew))
    lock = TimedRedisLock(client, name=args.name, identity=args.identity)

    def on_started_leading(stop: threading.Event) -> None:
        started = time.monotonic()  # before anything else, even reading the term
        emit("STARTED", elector.term, stamp=started)
        stop.wait()

    def on_stopped_leading() -> None:
        emit("STOPPED", elector.last_stop_reason.replace(" ", "_") or "-")

    def on_new_leader(holder: str) -> None:
        emit("NEWLEADER", holder)

    config = LeaderElectionConfig(
        lock=lock,
        callbacks=LeaderCallbacks(on_started_leading=on_started_leading,
                                  on_stopped_leading=on_stopped_leading,
                                  on_new_leader=on_new_leader),
        lease_duration=args.lease,
        renew_deadline=args.renew,
        retry_period=args.retry,
        release_on_cancel=not args.no_release_on_cancel,
        name=args.name,
    )
    elector = LeaderElector(config)
    stop = threading.Event()
    runner = threading.Thread(target=elector.run, args=(stop,), name="elector", daemon=True)
    runner.start()
    emit("READY")
    while True:
        sig = signal.sigwait(handled)
        if sig == signal.SIGUSR1:
            with CountingRedis.counts_lock:
                counts = dict(CountingRedis.counts)
            emit("COUNTS", json.dumps(counts, separators=(",", ":"), sort_keys=True))
            continue
        emit("SIGNAL", signal.Signals(sig).name)
        elector.stop()
        break
    # Bounded: a hand-over waits at most renew_deadline for on_started_leading.
    runner.join(timeout=args.renew + args.lease + 5.0)
    emit("EXIT", int(runner.is_alive()))
    client.close()
    return 1 if runner.is_alive() else 0


if __name__ == "__main__":
    sys.exit(main())
