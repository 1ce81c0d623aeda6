"""django-celery-beat's tables dispatched by the leader, with three real worker
replicas, a real Redis and a real database (PostgreSQL, and SQLite).

- an every-second interval row with ``leader_catch_up = "all"`` while the leader
  is SIGKILLed, SIGSTOPped past its lease and SIGTERMed, and while PostgreSQL is
  down: every fire second runs exactly once; disabling the row through the ORM
  stops it within one retry period + 1 s;
- a one-off row runs exactly once across a leader killed at its fire time; a
  clocked row runs once; both are then disabled in the table;
- ``last_run_at`` / ``total_run_count`` in the table match what ran, also when
  the leader is SIGKILLed at the worst moment for them: right after the script
  call that claimed (and pushed) its ticks returned (the test app's hold).
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.django_db import Postgres, django_env, rows
from tests.sched_procs import RETRY, Replicas, fire_second, wait_until
from tests.test_scheduler_failover import fail_over

pytestmark = pytest.mark.integration
APP = "tests.apps.django_app"
# The app's hold (tests/apps/django_app.py; not imported: it needs a replica's env).
HOLD_KEY, HOLDS_KEY = "test:hold-after-claim", "test:holds"


def replicas_on(tmp_path: Path, redis_url: str, name: str, db: str) -> Replicas:
    procs = Replicas(tmp_path, redis_url, name, app=APP,
                     env={k: v for k, v in django_env(db).items()
                          if k in ("LEADER_TEST_DB", "DJANGO_SETTINGS_MODULE")})
    for _ in range(3):
        procs.worker()
    return procs


@pytest.fixture
def stopper() -> Iterator[list[Replicas]]:
    started: list[Replicas] = []
    yield started
    for procs in started:
        procs.stop()
        print(procs.logs())  # shown when the test failed


def assert_counts_match(db: str, r: Replicas, name: str, label: str,
                        timeout: float = 10.0) -> None:
    """The row's total_run_count and last_run_at say what ran (written back in batches)."""

    def ran() -> list[float]:
        return [datetime.fromisoformat(t["fire_time"]).timestamp() for t in r.ticks()
                if t["label"] == label]

    def written() -> bool:
        row = rows(db, "dump")[name]
        if row["last_run_at"] is None:
            return False
        # Ticks go on while the rows are written, and a tick is counted at its claim,
        # a moment before it runs: what ran up to the row's last_run_at, read after it.
        upto = [fire for fire in ran() if fire <= row["last_run_at"] + 0.0005]
        return (row["total_run_count"] == len(upto) and bool(upto)
                and abs(row["last_run_at"] - max(upto)) < 0.001)

    wait_until(written, timeout, f"{name}'s total_run_count and last_run_at to match the ticks "
               "that ran", lambda: f"{rows(db, 'dump')[name]}, ran {len(ran())} ticks "
               f"up to {max(ran(), default=None)}")


def fire_ms(r: Replicas, label: str) -> list[int]:
    """Fire times (ms) of ``label``'s ticks, in arrival order.  An interval row is
    anchored where the leader first saw it, so they are not whole seconds."""
    return [round(datetime.fromisoformat(t["fire_time"]).timestamp() * 1000)
            for t in r.ticks() if t["label"] == label]


def wait_quiet(r: Replicas, label: str) -> None:
    """A moment between ticks (the last one recorded 0.25-0.6 s ago, every one
    before it too), so a killed leader, which consumes too, holds no tick message
    (a run lost with a killed consumer is not what these tests measure).  The run
    counts need no quiet moment: the hold test kills at the worst one for them."""

    def quiet() -> bool:
        fired = sorted(set(fire_ms(r, label)))
        if not fired:
            return False
        since = time.time() - fired[-1] / 1000
        return 0.25 <= since <= 0.6 and fired == list(range(fired[0], fired[-1] + 1, 1000))

    wait_until(quiet, 15, "a quiet moment between ticks", r.logs)


def test_every_second_row_exactly_once_across_faults_and_a_database_outage(
        tmp_path: Path, redis_url: str, election_name: str, postgres_server: Postgres,
        postgres_db: str, stopper: list[Replicas]) -> None:
    db = postgres_db
    rows(db, "create", name="every-second", label="every-second", every=1)
    r = replicas_on(tmp_path, redis_url, election_name, db)
    stopper.append(r)
    r.wait_workers_ready()
    r.wait_ticks(3, timeout=60)
    log: list[str] = []
    for fault in ("kill", "stop", "term"):
        time.sleep(1.5)
        wait_quiet(r, "every-second")
        fail_over(r, election_name, fault, log)
    # The database goes away: the leader keeps dispatching what it read.
    before = len(fire_ms(r, "every-second"))
    postgres_server.stop()
    r.wait_ticks(before + 3, timeout=15)
    postgres_server.start()
    time.sleep(1.5)
    wait_quiet(r, "every-second")
    assert_counts_match(db, r, "every-second", "every-second")
    # Disabled in the ORM: no tick fires later than one retry period + 1 s after.
    fired = disable_and_check_every_second(db, r, log)
    leader_logs = "".join(p.log() for p in r.procs)
    assert leader_logs.count("database unavailable") >= 1
    # django-celery-beat clears last_run_at of a row saved disabled; the count stays.
    wait_until(lambda: rows(db, "dump")["every-second"]["total_run_count"] == len(fired), 10,
               f"the final total_run_count {len(fired)}", lambda: str(rows(db, "dump")))


def test_one_off_row_runs_once_across_a_leader_kill_and_a_clocked_row_runs_once(
        tmp_path: Path, redis_url: str, election_name: str, sqlite_db: str,
        stopper: list[Replicas]) -> None:
    db = sqlite_db
    rows(db, "create", name="heartbeat", label="heartbeat", every=1)
    r = replicas_on(tmp_path, redis_url, election_name, db)
    stopper.append(r)
    r.wait_workers_ready()
    r.wait_ticks(2, label="heartbeat", timeout=60)
    # Saved while running: each fires at its own single tick, a few seconds from now.
    at = int(time.time()) + 4
    rows(db, "create", name="clocked", label="clocked", clocked_at=at)
    rows(db, "create", name="one-off", label="one-off", every=4, one_off=True)
    leader, term = r.wait_leader(election_name)
    # Kill the leader at the clocked row's fire time (the one-off fires about then too).
    wait_until(lambda: time.time() >= at - 0.05, 10, "the clocked row's fire time")
    leader.signal(signal.SIGKILL)
    r.wait_leader(election_name, timeout=20, not_pid=leader.pid, after_term=term)
    r.wait_ticks(2, label="heartbeat", term=term, timeout=15)
    wait_until(lambda: {t["label"] for t in r.ticks()} >= {"clocked", "one-off"}, 15,
               "the clocked and one-off rows to run", r.logs)
    time.sleep(5)  # long enough for either to have run again, if it would
    counts = Counter(t["label"] for t in r.ticks())
    assert counts["clocked"] == 1 and counts["one-off"] == 1, counts
    clocked = [fire_second(t) for t in r.ticks() if t["label"] == "clocked"]
    assert clocked == [at]
    wait_until(lambda: not any(rows(db, "dump")[n]["enabled"] for n in ("clocked", "one-off")),
               10, "both single-tick rows disabled in the table", lambda: str(rows(db, "dump")))
    for name in ("clocked", "one-off"):
        assert_counts_match(db, r, name, name)


def disable_and_check_every_second(db: str, r: Replicas, log: list[str]) -> list[int]:
    """Disable the every-second row in the ORM; every fire second ran exactly once,
    none missing, and none later than one retry period + 1 s after.  Its fire ms."""
    rows(db, "enable", name="every-second", enabled=False)
    disabled_at = time.time()
    time.sleep(RETRY + 2.5)  # a tick sent past the bound would show up in this window
    fired = fire_ms(r, "every-second")
    expected = list(range(min(fired), max(fired) + 1, 1000))
    duplicated = sorted(ms for ms, n in Counter(fired).items() if n > 1)
    missing = sorted(set(expected) - set(fired))
    assert not duplicated and not missing and sorted(fired) == expected, (
        f"{len(fired)} ticks, duplicated {duplicated}, missing {missing}", log)
    assert max(fired) / 1000 <= disabled_at + RETRY + 1, (max(fired), disabled_at)
    return fired


def test_a_leader_killed_right_after_its_claim_loses_no_run_count(
        tmp_path: Path, redis_url: str, election_name: str, sqlite_db: str,
        stopper: list[Replicas]) -> None:
    """The worst moment for the rows' run counts, twice: the leader is SIGKILLed
    right after the script call that claimed and pushed its django ticks returned,
    before anything after that call ran (tests.apps.django_app's hold).  Every
    row's total_run_count and last_run_at still say exactly what ran, and every
    fire time ran once.  The leaders are standalone beats and a worker that never
    leads consumes: a killed leader holds no message, so a run that is missing
    cannot be the consumer's (a worker killed in a task loses that run)."""
    db = sqlite_db
    names = [f"row-{i}" for i in range(4)]
    for name in names:
        rows(db, "create", name=name, label=name, every=1)
    r = Replicas(tmp_path, redis_url, election_name, app=APP, env={
        **{k: v for k, v in django_env(db).items()
           if k in ("LEADER_TEST_DB", "DJANGO_SETTINGS_MODULE")},
        "LEADER_TEST_HOLDS": "1"})
    stopper.append(r)
    consumer = r.worker("--no-leader-beat")
    for _ in range(3):
        r.beat()
    r.wait_workers_ready()
    beat_election = f"{election_name}-beat"
    r.wait_ticks(3, label=names[0], timeout=60)
    held: list[dict[str, Any]] = []
    for attempt in range(2):
        r.client.set(HOLD_KEY, 1)
        raw = wait_until(lambda n=attempt: r.client.lindex(HOLDS_KEY, n), 15,
                         "the leader to hold right after a claim", r.logs)
        hold = json.loads(raw)
        leader = r.by_pid(int(hold["pid"]))
        leader.signal(signal.SIGKILL)
        held.append(hold)
        r.wait_leader(beat_election, timeout=20, not_pid=leader.pid, after_term=hold["term"])
        r.wait_ticks(2, label=names[0], term=int(hold["term"]), timeout=20)

    def once_each() -> bool:
        return all(sorted(fire_ms(r, name)) == list(range(
            min(fire_ms(r, name)), max(fire_ms(r, name)) + 1, 1000)) for name in names)

    def gaps() -> str:
        fired = {name: fire_ms(r, name) for name in names}
        return str({name: (len(ms), "duplicated", sorted(t for t, n in Counter(ms).items()
                                                         if n > 1),
                           "missing", sorted(set(range(min(ms), max(ms) + 1, 1000)) - set(ms)))
                    for name, ms in fired.items()}) + f" holds {held}\n{r.logs()}"

    wait_until(once_each, 15, "every fire time of every row run exactly once", gaps)
    for name in names:
        assert_counts_match(db, r, name, name, timeout=15)
    assert consumer.alive() and {int(t["pid"]) for t in r.ticks()} == {consumer.pid}
    print(f"held and killed: {held}")
