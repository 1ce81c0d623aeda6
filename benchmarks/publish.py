"""Fenced publish vs publish-then-clear: the cost of dispatching one tick.

The scheduler's loop dispatches every due tick, even a lone one, through the
herd dispatcher (``runner.herd.dispatch``, herd.py): one fenced
HERD_DISPATCH_LUA call claims the tick, with the message built from the
entry's template (template.py), and publishes it one of two ways:

- ``fenced``: the Celery broker is kombu's Redis transport on the lease's
  server and database, so the claiming script itself LPUSHes the message to
  the broker list (the template's ``same_server``);
- ``publish-then-clear``: the broker is another database of the same server,
  so the script stores a pending copy with the claim, then the message is
  pushed to the broker (one pipeline of kombu's client) and a separate HDEL
  clears the pending copy.

Both modes are asserted (the entry's template, and which database it pushes
to), so the benchmark cannot silently measure the wrong path.  For each mode:
a fresh election (unique name, lease of 600 s), a Celery app, a
ScheduleRunner, one interval entry, and ``--warmup`` ticks.  Then ``--ticks``
ticks per mode with fire times 1 s apart, each dispatched by a direct call of
``runner.herd.dispatch`` with that one tick (a herd of one, as the loop sends
a lone due tick; no scheduler loop, no elector), in ``--rounds`` rounds of one
block per mode, the order reversed every other round, so that slow drift of
the machine does not favour either mode.
Measured over those calls only:

- wall time per call (``time.perf_counter`` around each call: p50, p99, mean);
- client CPU per tick (``time.process_time`` delta / ticks);
- Redis commands per tick: ``INFO commandstats`` deltas of the whole server,
  commands run inside Lua scripts included (the benchmark's own INFO excluded);
- redis-server CPU per tick (``used_cpu_user + used_cpu_sys`` delta / ticks);
- client round trips per tick: calls of redis-py's ``send_packed_command``
  (one per command, pipeline or script call), split into the lease client's
  (a pool the benchmark labels) and all other clients' (kombu's).  The
  counting wrapper costs a few microseconds per round trip, in both modes;
- the p50 of each round's block per mode and their ratio, paired by round
  (summarised; each round with ``--show-rounds``).

Afterwards it checks that the broker list holds exactly ``--ticks`` messages
(distinct task ids, the expected fire times and term), that the pending hash
is empty and that nothing reached the other database, then deletes the list
(its length checked first).  With the default, an embedded throw-away
redis-server on loopback (db 0 = lease, db 1 = second broker), stopped by PID
at the end, also on error.  With ``--redis-url``, that server's db N (from
the URL) and N+1; commandstats are server-wide there, so other traffic skews
them, and the benchmark refuses to start if either db already has a
``celery`` list.  It deletes its election's keys; kombu's own binding sets
(``_kombu.binding.*``) stay, as after any Celery client.

    .venv/bin/python benchmarks/publish.py [--ticks 5000] [--warmup 200]
        [--rounds 50] [--show-rounds] [--modes fenced,publish-then-clear]
        [--redis-url redis://host:6379/0]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmark the working tree, installed or not
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import redis.connection  # noqa: E402
from celery import Celery  # noqa: E402

from celery_leader.embedded import EmbeddedRedis  # noqa: E402
from celery_leader.entries import entry_from_config  # noqa: E402
from celery_leader.record import LeaderElectionRecord  # noqa: E402
from celery_leader.redislock import RedisLock  # noqa: E402
from celery_leader.schedule.herd import Claim  # noqa: E402
from celery_leader.schedule.store import to_ms  # noqa: E402
from celery_leader.scheduler import TASK_ID_NAMESPACE, ScheduleRunner  # noqa: E402
from celery_leader.settings import LeaderSettings  # noqa: E402

UTC = timezone.utc
MODES = ("fenced", "publish-then-clear")
QUEUE = "celery"  # Celery's default queue: kombu's Redis transport pushes to this list
TASK = "bench.noop"  # never registered: send_task sends it anyway
FIRST_FIRE = datetime(2031, 1, 1, tzinfo=UTC)
OWN = {"info"}  # what the benchmark itself sends during a window


class BenchmarkError(RuntimeError):
    pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------ round trips

# Counts by (label, first command name).  A connection made by a pool the
# benchmark labelled carries that label; every other one (kombu's) is "kombu".
ROUND_TRIPS: Counter[tuple[str, str]] = Counter()
_send_packed = redis.connection.AbstractConnection.send_packed_command


def _counting_send_packed(self: Any, command: Any, check_health: bool = True) -> Any:
    head = command if isinstance(command, (bytes, str)) else command[0]
    if isinstance(head, str):
        head = head.encode()
    parts = head.split(b"\r\n", 3)  # *<n>, $<len>, NAME, ...
    name = parts[2].decode(errors="replace").upper() if len(parts) > 2 else "?"
    ROUND_TRIPS[(getattr(self, "bench_label", "kombu"), name)] += 1
    return _send_packed(self, command, check_health)


redis.connection.AbstractConnection.send_packed_command = _counting_send_packed  # type: ignore[method-assign]


def labelled_client(url: str, label: str) -> redis.Redis:
    """A client whose connections count their round trips under ``label``."""
    pool = redis.ConnectionPool.from_url(url)
    make = pool.make_connection

    def make_connection() -> Any:
        connection = make()
        connection.bench_label = label
        return connection

    pool.make_connection = make_connection  # type: ignore[method-assign]
    return redis.Redis(connection_pool=pool)


# ------------------------------------------------------------------ server

def with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        query["db"] = str(db)
        return urlunsplit(parts._replace(query=urlencode(query)))
    if parts.scheme not in ("redis", "rediss"):
        raise BenchmarkError(f"unsupported --redis-url scheme {parts.scheme!r}")
    return urlunsplit(parts._replace(path=f"/{db}"))


def db_of(url: str) -> int:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return int(parse_qs(parts.query).get("db", ["0"])[-1])
    return int(parts.path.strip("/") or 0)


@dataclass
class Snapshot:
    calls: dict[str, int]
    server_cpu: float
    round_trips: Counter[tuple[str, str]]
    cpu: float
    wall: float


def snapshot(admin: redis.Redis, before: bool) -> Snapshot:
    """INFO outside the counted round trips: first when starting, last when ending."""

    def info() -> tuple[dict[str, int], float]:
        stats = admin.info("commandstats")
        cpu = admin.info("cpu")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    if before:
        calls, server_cpu = info()
        return Snapshot(calls, server_cpu, Counter(ROUND_TRIPS), time.process_time(),
                        time.perf_counter())
    trips, cpu, wall = Counter(ROUND_TRIPS), time.process_time(), time.perf_counter()
    calls, server_cpu = info()
    return Snapshot(calls, server_cpu, trips, cpu, wall)


# -------------------------------------------------------------------- runs

@dataclass
class Result:
    mode: str
    push_in_claim: bool | None = None  # the claiming script pushes the message
    ticks: int = 0
    timings: list[float] = field(default_factory=list)  # seconds per call
    cpu: float = 0.0
    wall: float = 0.0
    server_cpu: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)
    round_trips: Counter[tuple[str, str]] = field(default_factory=Counter)
    blocks: list[float] = field(default_factory=list)  # p50 of each block, seconds
    checks: list[str] = field(default_factory=list)


class Contender:
    """One mode: its own election, lease client, Celery app and runner."""

    def __init__(self, mode: str, lease_url: str, other_url: str) -> None:
        self.mode = mode
        self.lease_url = lease_url
        self.broker_url = lease_url if mode == "fenced" else other_url
        self.other_url = other_url if mode == "fenced" else lease_url
        self.name = f"bench-publish-{uuid.uuid4().hex[:8]}"
        self.lease_client = labelled_client(lease_url, "lease")
        self.admin = labelled_client(lease_url, "admin")
        self.broker = labelled_client(self.broker_url, "admin")
        self.app = Celery("bench-publish", broker=self.broker_url, set_as_current=False)
        self.app.conf.update(leader_name=self.name, beat_schedule={})
        self.lock = RedisLock(self.lease_client, name=self.name, identity="bench")
        self.result = Result(mode)
        self.fired: list[datetime] = []

    def start(self, warmup: int) -> None:
        observation = self.lock.create(LeaderElectionRecord(holder_identity="bench",
                                                            lease_duration=600.0))
        assert observation.record is not None
        self.term = observation.record.term
        settings = LeaderSettings(redis_url=self.lease_url, name=self.name)
        self.runner = ScheduleRunner(self.app, self.lock, settings, entries={})
        self.entry = entry_from_config("job", {"task": TASK, "schedule": 1.0, "args": [1]},
                                       self.app)
        self.next_fire = FIRST_FIRE
        for _ in range(warmup):
            self._fire()
        self.check_path()
        clear_list(self.broker, QUEUE, warmup, f"{self.mode} warm-up")

    def push_in_claim(self) -> bool | None:
        """Whether the claiming script pushes the message (None: no template)."""
        template = self.runner.herd.template(self.entry)
        return None if template is None else template.same_server

    def check_path(self) -> None:
        expected = self.mode == "fenced"
        if self.push_in_claim() is not expected or self.runner.atomic_publish is False:
            raise BenchmarkError(f"{self.mode}: the claim pushes: {self.push_in_claim()} "
                                 f"(None: no template), expected {expected}; "
                                 f"runner.atomic_publish {self.runner.atomic_publish}: "
                                 f"this is not the {self.mode} path")

    def _dispatch(self, fire: datetime) -> bool:
        return self.runner.herd.dispatch([Claim(self.entry, to_ms(fire), True)], self.term)

    def _fire(self) -> datetime:
        fire, self.next_fire = self.next_fire, self.next_fire + timedelta(seconds=1)
        if not self._dispatch(fire):
            raise BenchmarkError(f"{self.mode}: fenced out at {fire.isoformat()}")
        return fire

    def block(self, ticks: int) -> None:
        """Dispatch ``ticks`` ticks, measured."""
        fires = [self.next_fire + timedelta(seconds=i) for i in range(ticks)]
        self.next_fire = fires[-1] + timedelta(seconds=1)
        timings: list[float] = []
        perf = time.perf_counter
        dispatch, entry, term = self.runner.herd.dispatch, self.entry, self.term
        start = snapshot(self.admin, before=True)
        for fire in fires:
            t0 = perf()
            ok = dispatch([Claim(entry, to_ms(fire), True)], term)
            timings.append(perf() - t0)
            if not ok:
                raise BenchmarkError(f"{self.mode}: fenced out at {fire.isoformat()}")
        end = snapshot(self.admin, before=False)
        r = self.result
        r.timings += timings
        r.blocks.append(statistics.median(timings))
        r.ticks += ticks
        r.cpu += end.cpu - start.cpu
        r.wall += end.wall - start.wall
        r.server_cpu += end.server_cpu - start.server_cpu
        r.calls.update({c: n - start.calls.get(c, 0) for c, n in end.calls.items()
                        if c not in OWN and n - start.calls.get(c, 0)})
        r.round_trips.update(end.round_trips - start.round_trips)
        self.fired += fires

    def verify(self, warmup: int) -> None:
        """The broker list holds exactly this mode's measured ticks; none pending."""
        self.check_path()
        r, runner = self.result, self.runner
        self.result.push_in_claim = self.push_in_claim()
        n = len(self.fired)
        messages = [json.loads(m) for m in self.broker.lrange(QUEUE, 0, -1)]
        ids = [m["headers"]["id"] for m in messages]
        expected_ids = {task_id(self.name, fire) for fire in self.fired}
        fired = {m["headers"]["leader_fire_time"] for m in messages}
        terms = {m["headers"]["leader_term"] for m in messages}
        args = {json.dumps(json.loads(base64.b64decode(m["body"]))[0]) for m in messages}
        pending = self.lease_client.hlen(self.lock.key("schedule:pending"))
        other = labelled_client(self.other_url, "admin")
        try:
            leaked = sum(json.loads(m)["headers"]["id"] in expected_ids
                         for m in other.lrange(QUEUE, 0, -1))
        finally:
            other.close()
        problems = []
        if len(messages) != n:
            problems.append(f"{len(messages)} messages in the broker list, expected {n}")
        if len(set(ids)) != len(ids) or set(ids) != expected_ids:
            problems.append("task ids differ from those of the ticks dispatched")
        if fired != {f.isoformat() for f in self.fired}:
            problems.append("fire times in the messages differ from those dispatched")
        if terms != {self.term} or args != {"[1]"}:
            problems.append(f"unexpected terms {terms} or args {args}")
        if pending:
            problems.append(f"{pending} ticks still pending")
        if leaked:
            problems.append(f"{leaked} of its messages in db {db_of(self.other_url)}")
        if runner.dispatched != warmup + n:
            problems.append(f"runner.dispatched = {runner.dispatched}, expected {warmup + n}")
        if problems:
            raise BenchmarkError(f"{self.mode}: " + "; ".join(problems))
        r.checks.append(
            f"`{QUEUE}` in db {db_of(self.broker_url)} holds exactly its {n:,} ticks "
            f"(task ids, fire times, term as dispatched), none in db {db_of(self.other_url)}; "
            f"pending hash empty; "
            f"runner.dispatched = {runner.dispatched:,} (incl. {warmup} warm-up)")
        clear_list(self.broker, QUEUE, n, f"{self.mode} measured")

    def close(self) -> None:
        for key in self.lease_client.scan_iter(match=f"{self.lock.key_prefix}:{{{self.name}}}:*"):
            self.lease_client.delete(key)
        self.app.close()
        for client in (self.lease_client, self.admin, self.broker):
            client.close()


def task_id(name: str, fire: datetime) -> str:
    return str(uuid.uuid5(TASK_ID_NAMESPACE, f"{name}:job@{round(fire.timestamp() * 1000)}"))


def clear_list(client: redis.Redis, key: str, expected: int, what: str) -> None:
    length = client.llen(key)
    if length != expected:
        raise BenchmarkError(f"{what}: {key!r} holds {length} messages, expected {expected}")
    client.delete(key)


def run(modes: list[str], lease_url: str, other_url: str, ticks: int, warmup: int,
        rounds: int) -> list[Result]:
    """Warm every mode up, then ``rounds`` rounds of one block per mode, the
    order reversed every other round, so slow drift of the machine hits both."""
    contenders = [Contender(mode, lease_url, other_url) for mode in modes]
    try:
        for c in contenders:
            c.start(warmup)
        sizes = [ticks // rounds + (i < ticks % rounds) for i in range(rounds)]
        for i, size in enumerate(sizes):
            for c in (contenders if i % 2 == 0 else contenders[::-1]):
                c.block(size)
        for c in contenders:
            c.verify(warmup)
        return [c.result for c in contenders]
    finally:
        for c in contenders:
            c.close()


# ------------------------------------------------------------------ report

def row(r: Result) -> str:
    us = [t * 1e6 for t in r.timings]
    q = statistics.quantiles(us, n=100, method="inclusive")
    n = r.ticks
    lease = sum(v for (label, _), v in r.round_trips.items() if label == "lease")
    kombu = sum(v for (label, _), v in r.round_trips.items() if label == "kombu")
    return (f"| {r.mode} | {r.push_in_claim} | {n:,} | {q[49]:.0f} / {q[98]:.0f} / "
            f"{statistics.fmean(us):.0f} | {r.cpu / n * 1e6:.0f} "
            f"| {sum(r.calls.values()) / n:.2f} | {(lease + kombu) / n:.2f} "
            f"({lease / n:.2f} + {kombu / n:.2f}) | {r.server_cpu / n * 1e6:.0f} "
            f"| {n / r.wall:,.0f} |")


def table(results: list[Result]) -> str:
    head = ("| mode | pushed by the claim | ticks | wall µs / tick p50 / p99 / mean "
            "| client CPU µs / tick | Redis cmds / tick (all, incl. in Lua) "
            "| client round trips / tick (lease + kombu) | redis-server CPU µs / tick "
            "| ticks/s |")
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1), *map(row, results)])


def paired(results: list[Result], show_rounds: bool) -> str:
    """The first mode's block p50 over the second's, round by round: paired within
    a round, so drift of the machine between rounds cancels out."""
    first, second = results[0], results[1]
    ratios = [a / b for a, b in zip(first.blocks, second.blocks, strict=True)]
    lines = []
    if show_rounds:
        head = (f"| round | {' | '.join(f'{r.mode} p50 µs' for r in results)} "
                f"| {first.mode} / {second.mode} |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for i, ratio in enumerate(ratios):
            cells = " | ".join(f"{r.blocks[i] * 1e6:.0f}" for r in results)
            lines.append(f"| {i + 1} | {cells} | {ratio:.2f} |")
        lines.append("")
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") \
        if len(ratios) > 1 else ratios * 3
    lower = sum(ratio < 1 for ratio in ratios)
    lines.append(f"{first.mode} / {second.mode}, p50 of each round's block (paired by round, "
                 f"order reversed every other round): median {quartiles[1]:.2f}, quartiles "
                 f"{quartiles[0]:.2f} to {quartiles[2]:.2f}, min {min(ratios):.2f}, "
                 f"max {max(ratios):.2f}; {first.mode} lower in {lower} of {len(ratios)} rounds.")
    return "\n".join(lines)


def breakdown(results: list[Result]) -> str:
    lines = []
    for r in results:
        n = r.ticks
        calls = ", ".join(f"{c} {v / n:.2f}" for c, v in
                          sorted(r.calls.items(), key=lambda kv: (-kv[1], kv[0])))
        trips = ", ".join(f"{label} {cmd} {v / n:.2f}" for (label, cmd), v in
                          sorted(r.round_trips.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"- {r.mode}: commandstats {calls}; round trips {trips or 'none'}")
    return "\n".join(lines)


def versions(admin: redis.Redis) -> str:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    server = admin.info("server")
    return (f"- machine: {platform.machine()}, nproc {os.cpu_count()}, "
            f"{platform.system()} {platform.release()}, load average at start "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
            f"- python {platform.python_version()}; celery {version('celery')}, "
            f"kombu {version('kombu')}, redis-py {version('redis')}, "
            f"celery-leader {version('celery-leader')} (working tree); "
            f"redis-server {server.get('redis_version')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=5000,
                        help="measured ticks per mode (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="ticks dispatched before measuring (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=50,
                        help="blocks per mode, interleaved, order reversed every other "
                             "round (default %(default)s)")
    parser.add_argument("--show-rounds", action="store_true",
                        help="also print each round's block p50 per mode")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated, first round in this order (default %(default)s)")
    parser.add_argument("--redis-url", default=None,
                        help="use this server's db N (from the URL) and N+1 instead of an "
                             "embedded redis-server (commandstats are server-wide)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES) or not modes:
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.ticks < 2 or args.warmup < 1 or args.rounds < 1:
        parser.error("--ticks must be at least 2, --warmup and --rounds at least 1")
    args.rounds = min(args.rounds, args.ticks // 2)  # at least 2 ticks per block
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    command = shlex.join([".venv/bin/python", "benchmarks/publish.py", *sys.argv[1:]]) \
        if argv is None else shlex.join(["benchmarks/publish.py", *argv])

    server = None
    try:
        if args.redis_url:
            lease_url = args.redis_url
            other_url = with_db(lease_url, db_of(lease_url) + 1)
        else:
            server = EmbeddedRedis().start()
            lease_url, other_url = server.url, with_db(server.url, 1)
        admin = labelled_client(lease_url, "admin")
        try:
            for url in (lease_url, other_url):
                client = labelled_client(url, "admin")
                try:
                    if client.llen(QUEUE):
                        raise BenchmarkError(f"{url} already has a {QUEUE!r} list; "
                                             "use other databases")
                finally:
                    client.close()
            header = f"command: `{command}`\n\n{versions(admin)}\n"
        finally:
            admin.close()
        log(header)
        log(f"running {', '.join(modes)}: {args.warmup} warm-up + {args.ticks} ticks each, "
            f"in {args.rounds} interleaved rounds ...")
        results = run(modes, lease_url, other_url, args.ticks, args.warmup, args.rounds)
    except BenchmarkError as error:
        log(f"error: {error}")
        return 1
    finally:
        if server is not None:
            server.cleanup()

    where = "the --redis-url server" if args.redis_url else "an embedded redis-server on loopback"
    print(header)
    print(f"{args.ticks:,} ticks per mode after {args.warmup:,} warm-up ticks, measured in "
          f"{args.rounds} interleaved rounds; lease and broker on {where}; one entry per "
          "mode, fire times 1 s apart; direct calls of `runner.herd.dispatch` with one "
          "tick each, in one thread.\n")
    print(table(results))
    if len(results) == 2:
        print()
        print(paired(results, args.show_rounds))
    print("\nPer tick, by command (commandstats, incl. commands run inside Lua; client "
          "round trips by client and first command):\n")
    print(breakdown(results))
    print("\nChecks:\n")
    for r in results:
        for check in r.checks:
            print(f"- {r.mode}: {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
