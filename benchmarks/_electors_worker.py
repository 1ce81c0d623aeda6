"""Many electors as threads of one process, for benchmarks/electors.py.

Each elector has its own ``redis.Redis`` client (so its own command
connection), its own ``RedisLock`` and ``LeaderElector``, and hence its own
pub/sub connection and listener thread.  Electors number ``--first`` ..
``--first + --count - 1``; with ``--names shared`` they all contend for one
election ``--name``, with ``--names distinct`` elector ``i`` is alone on
``--name-i`` (so it leads).

Prints ``READY <count>`` once every elector thread is started and then, on
SIGUSR1, ``COUNTS <json>``: client-side commands sent so far (one count = one
round trip; an EVALSHA counts once), and how many electors lead.  SIGTERM
stops every elector (bounded), then the process exits; it also exits if its
parent goes away.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from celery_leader import (  # noqa: E402
    LeaderCallbacks,
    LeaderElectionConfig,
    LeaderElector,
    RedisLock,
)


class CountingRedis(redis.Redis):
    """Counts every command sent on the command connection (not pub/sub)."""

    counts: collections.Counter[str] = collections.Counter()
    counts_lock = threading.Lock()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        with CountingRedis.counts_lock:
            CountingRedis.counts[str(args[0]).upper()] += 1
        return super().execute_command(*args, **options)


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--names", choices=("shared", "distinct"), required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--lease", type=float, required=True)
    parser.add_argument("--renew", type=float, required=True)
    parser.add_argument("--retry", type=float, required=True)
    parser.add_argument("--spread", type=float, default=1.0,
                        help="start the electors evenly over this many seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    # Two connections per elector, plus slack.
    raise_nofile(2 * args.count + 256)
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)  # inherited by every thread below
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    threading.stack_size(256 * 1024)  # hundreds of threads per process

    stop = threading.Event()
    electors: list[LeaderElector] = []
    clients: list[redis.Redis] = []
    runners: list[threading.Thread] = []

    def on_started_leading(leader_stop: threading.Event) -> None:
        leader_stop.wait()

    for index in range(args.first, args.first + args.count):
        identity = f"e{index}"
        name = args.name if args.names == "shared" else f"{args.name}-{index}"
        client = CountingRedis.from_url(args.redis_url, client_name=identity,
                                        socket_timeout=max(1.0, args.renew),
                                        socket_connect_timeout=max(1.0, args.renew))
        lock = RedisLock(client, name=name, identity=identity)
        config = LeaderElectionConfig(
            lock=lock, callbacks=LeaderCallbacks(on_started_leading=on_started_leading,
                                                 on_stopped_leading=lambda: None),
            lease_duration=args.lease, renew_deadline=args.renew, retry_period=args.retry,
            release_on_cancel=True, name=name)
        elector = LeaderElector(config)
        runner = threading.Thread(target=elector.run, args=(stop,), name=identity, daemon=True)
        runner.start()
        electors.append(elector)
        clients.append(client)
        runners.append(runner)
        time.sleep(args.spread / max(1, args.count))
    print(f"READY {len(runners)}", flush=True)

    while True:
        sig = signal.sigwait(handled)
        if sig == signal.SIGUSR1:
            with CountingRedis.counts_lock:
                counts = dict(CountingRedis.counts)
            leaders = sum(1 for e in electors if e.is_leader())
            print("COUNTS " + json.dumps({"counts": counts, "leaders": leaders},
                                         separators=(",", ":")), flush=True)
            continue
        break
    stop.set()
    for elector in electors:
        elector.stop()
    deadline = time.monotonic() + args.renew + 5.0
    for runner in runners:
        runner.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = sum(1 for r in runners if r.is_alive())
    for client in clients:
        client.close()
    print(f"EXIT {alive}", flush=True)
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main())
