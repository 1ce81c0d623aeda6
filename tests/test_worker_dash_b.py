"""``celery worker -B`` with ``install(app)``: never two dispatchers.

Real ``celery worker -B`` replicas of tests.apps.beat_app (a one-second entry,
leader_beat on): each stops at start with one line and exit status 2, and no
tick is sent.  Before, each -B worker's stock beat sent every entry beside the
leader's dispatcher (three runs per fire time with two replicas).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sched_procs import Replicas
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

BOOT = 45.0  # two interpreters importing Celery on a loaded 2-core machine
EXPECTED = ("celery-leader: configuration error: celery worker -B starts Celery's own beat "
            "beside celery-leader's dispatcher (leader_beat is on)")



def test_worker_dash_b_with_the_leader_dispatcher_refuses_to_start(
        replicas: Replicas, tmp_path: Path) -> None:
    workers = [replicas.worker("-B", "-s", str(tmp_path / f"beat-{n}")) for n in range(2)]
    wait_until(lambda: not any(w.alive() for w in workers), BOOT,
               "both -B workers to stop at start", replicas.logs)
    for worker in workers:
        assert worker.popen.returncode == 2, worker.describe()
        log = worker.log()
        lines = [line for line in log.splitlines() if line.startswith("celery-leader:")]
        assert len(lines) == 1 and lines[0].startswith(EXPECTED), log
        assert "leader_beat = False" in lines[0]
        assert "Traceback" not in log
    assert replicas.ticks() == []


@pytest.mark.parametrize(("scheduler", "warned"), [
    ([], True), (["--scheduler", "leader"], False)])
def test_worker_dash_b_with_leader_beat_off_warns_unless_the_scheduler_is_the_leaders(
        replicas: Replicas, tmp_path: Path, scheduler: list[str], warned: bool) -> None:
    """leader_beat off: -B is the user's beat.  Celery's own would send every entry
    from every replica started with it: one WARNING line says so."""
    worker = replicas.worker("-B", "-s", str(tmp_path / "beat"), *scheduler,
                             env={"LEADER_BEAT": "0"})
    replicas.wait_workers_ready(BOOT)
    warning = ("celery-leader: celery worker -B runs Celery's own beat in this worker "
               "(leader_beat is off): every replica started with -B sends every entry; "
               "add --scheduler leader so that only the leading one sends")
    assert worker.log().count(warning) == (1 if warned else 0), worker.log()
