"""django-celery-beat's tables dispatched by a standalone ``celery beat -S leader``
(the other mode of ``leader_django_celery_beat``): two beat replicas, a worker
with ``--no-leader-beat`` that only consumes, a real Redis and a real SQLite
database.

An every-second interval row with ``leader_catch_up = "all"``: the leading beat
is SIGKILLed, the other takes over, and every fire second runs exactly once;
``last_run_at`` / ``total_run_count`` in the table match what ran; disabling the
row through the ORM stops it within one retry period + 1 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.django_db import django_env, rows
from tests.sched_procs import Replicas
from tests.test_django_beat_procs import (
    APP,
    assert_counts_match,
    disable_and_check_every_second,
    fire_ms,
    wait_quiet,
)
from tests.test_scheduler_failover import fail_over
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str, election_name: str) -> Iterator[Replicas]:
    procs = Replicas(tmp_path, redis_url, election_name, app=APP)
    try:
        yield procs
    finally:
        procs.stop()
        print(procs.logs())  # shown by pytest only when the test failed


def test_standalone_beat_replicas_dispatch_an_every_second_row_exactly_once_across_a_kill(
        replicas: Replicas, election_name: str, sqlite_db: str) -> None:
    db = sqlite_db
    r = replicas
    r.env.update({k: v for k, v in django_env(db).items()
                  if k in ("LEADER_TEST_DB", "DJANGO_SETTINGS_MODULE")})
    r.env.update(LEADER_CATCH_UP="all")
    rows(db, "create", name="every-second", label="every-second", every=1)
    consumer = r.worker("--no-leader-beat")
    r.beat()
    r.beat()
    r.wait_workers_ready()
    beat_election = f"{election_name}-beat"
    r.wait_leader(beat_election)
    r.wait_ticks(3, timeout=60)
    log: list[str] = []
    wait_quiet(r, "every-second")
    fail_over(r, beat_election, "kill", log)
    r.wait_ticks(len(fire_ms(r, "every-second")) + 2, timeout=15)
    wait_quiet(r, "every-second")
    assert_counts_match(db, r, "every-second", "every-second")
    # Disabled in the ORM: the beat that leads now stops sending it in time.
    fired = disable_and_check_every_second(db, r, log)
    # Only the beats dispatched; the worker consumed and never led the beat election.
    assert consumer.alive()
    assert {int(t["pid"]) for t in r.ticks()} == {consumer.pid}
    assert len({int(t["term"]) for t in r.ticks()}) >= 2, log
    wait_until(lambda: rows(db, "dump")["every-second"]["total_run_count"] == len(fired),
               10, "the final total_run_count", lambda: str(rows(db, "dump")))
