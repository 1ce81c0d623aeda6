"""The example project's ``django-beat`` variant, run for real the way its docs
say: ``python -m example_project.manage migrate`` on a temporary SQLite file, an
every-second PeriodicTask created through the ORM (``manage shell``), two
``celery -A example_project.app worker`` replicas with ``EXAMPLE_SETTINGS=
django-beat`` on the test's Redis.  The row's heartbeat runs once per fire time;
disabled through the ORM it stops within one retry period + 1 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from example_project import audit
from tests.sched_procs import Replicas
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
LEASE, RENEW, RETRY = 2.0, 1.4, 0.3

ADD_ROW = """
from django_celery_beat.models import IntervalSchedule, PeriodicTask
every, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
PeriodicTask.objects.update_or_create(
    name="audit-heartbeat",
    defaults={"task": "example_project.tasks.heartbeat", "interval": every})
"""
DISABLE_ROW = """
from django_celery_beat.models import PeriodicTask
row = PeriodicTask.objects.get(name="audit-heartbeat")
row.enabled = False
row.save()
"""
RUN_COUNT = """
from django_celery_beat.models import PeriodicTask
print(PeriodicTask.objects.get(name="audit-heartbeat").total_run_count)
"""


def example_env(tmp_path: Path, redis_url: str, name: str) -> dict[str, str]:
    # DJANGO_SETTINGS_MODULE explicitly: an in-process Django test of this session
    # may have set another one in os.environ, which the workers would inherit.
    return {"EXAMPLE_SETTINGS": "django-beat", "EXAMPLE_DATABASE": str(tmp_path / "db.sqlite3"),
            "DJANGO_SETTINGS_MODULE": "example_project.django_beat_settings",
            "EXAMPLE_REDIS_URL": redis_url, "EXAMPLE_LEADER_NAME": name,
            "EXAMPLE_LEASE_DURATION": str(LEASE), "EXAMPLE_RENEW_DEADLINE": str(RENEW),
            "EXAMPLE_RETRY_PERIOD": str(RETRY), "EXAMPLE_TASK_QUEUE": f"{name}-tasks",
            "EXAMPLE_LEADER_QUEUE": f"{name}-leader"}


def manage(env: dict[str, str], *args: str) -> str:
    """``python -m example_project.manage <args>`` as the docs run it."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("EXAMPLE_", "CELERY_", "DJANGO_"))}
    full.update(env)
    done = subprocess.run([sys.executable, "-m", "example_project.manage", *args], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str, election_name: str) -> Iterator[Replicas]:
    procs = Replicas(tmp_path, redis_url, election_name, app="example_project.app",
                     env=example_env(tmp_path, redis_url, election_name))
    try:
        yield procs
    finally:
        procs.stop()
        print(procs.logs())  # shown by pytest only when the test failed


def test_django_beat_variant_runs_an_admin_row_once_per_second_and_stops_when_disabled(
        replicas: Replicas, election_name: str) -> None:
    r = replicas
    manage(r.env, "migrate", "--verbosity", "0")
    manage(r.env, "shell", "-c", ADD_ROW)
    r.worker()
    r.worker()
    r.wait_workers_ready()
    r.wait_leader(election_name)

    def heartbeats() -> dict[int, int]:
        return audit.heartbeats(r.client, election_name)

    wait_until(lambda: len(heartbeats()) >= 3, 60, "3 heartbeats from the table's row",
               r.logs)
    manage(r.env, "shell", "-c", DISABLE_ROW)
    disabled_at = time.time()
    time.sleep(RETRY + 2.5)
    runs = heartbeats()
    fired = sorted(runs)
    assert all(n == 1 for n in runs.values()), runs  # none ran twice
    assert fired == list(range(fired[0], fired[-1] + 1, 1000)), fired  # none missing
    assert fired[-1] / 1000 <= disabled_at + RETRY + 1, (fired[-1], disabled_at)
    # The leader wrote its progress back to the row (batched): the admin shows it.
    def run_count() -> int:  # the last line: Django 5.2's shell may say what it imported
        return int(manage(r.env, "shell", "-c", RUN_COUNT).split()[-1])

    wait_until(lambda: run_count() == len(fired), 15,
               f"total_run_count {len(fired)} in the table",
               lambda: str(run_count()))


def test_the_cli_lists_a_row_and_says_it_is_changed_in_the_admin(replicas: Replicas) -> None:
    """`leader schedule` lists a django-celery-beat row; enabling, disabling or
    removing it there says where it is managed, instead of "no entry named"."""
    r = replicas
    manage(r.env, "migrate", "--verbosity", "0")
    manage(r.env, "shell", "-c", ADD_ROW)
    listed = r.celery("leader", "schedule")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert any(line.startswith("audit-heartbeat") and line.endswith("django")
               for line in listed.stdout.splitlines()), listed.stdout
    for command in ("disable", "enable", "remove"):
        done = r.celery("leader", "schedule", command, "audit-heartbeat")
        assert done.returncode != 0, (command, done.stdout)
        assert "'audit-heartbeat' is a django-celery-beat task" in done.stderr, done.stderr
        assert "in the Django admin" in done.stderr and "no entry" not in done.stderr
