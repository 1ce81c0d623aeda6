"""What a new user gets from ``pip install`` of the wheel, with no extras.

The dev extras bring packages the runtime may silently rely on (kombu's Redis
transport imports ``packaging``, which kombu only pulls through its ``redis``
extra), so the rest of the suite cannot see a missing runtime dependency.
Here the wheel is built from a copy of the checkout, installed into a bare
venv with no extras, and one real ``celery worker`` of a tiny app written the
way the README says (a Redis broker and ``celery_leader.install(app)``) must
lead, as ``celery leader status --json`` run in that venv reports.

Needs the package index (or pip's cache): pip resolves the dependencies
exactly as a user's pip would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
# pip steps may download on a cold cache; bounded all the same.
PIP_TIMEOUT = 300.0
LEAD_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                    "dist", ".*_cache")

# What a new user writes (README "Install it into the app"), nothing more.
TINY_APP = '''\
import os

from celery import Celery

import celery_leader

app = Celery("plainapp", broker=os.environ["PLAIN_BROKER_URL"])
celery_leader.install(app)
'''


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = PIP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (f"{' '.join(command)} exited {result.returncode}:\n"
                                    f"{result.stdout}\n{result.stderr}")
    return result


def outside_the_checkout() -> dict[str, str]:
    """The environment without anything that would put the checkout or the dev
    venv on the path."""
    return {key: value for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
            and not key.startswith(("CELERY_", "LEADER_", "EXAMPLE_"))}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the checkout so the build leaves nothing
    (build/, *.egg-info) in the working tree."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir",
         str(base / "dist"), str(source)], cwd=base, env=outside_the_checkout())
    (built,) = (base / "dist").glob("celery_leader-*.whl")
    return built


def test_the_wheel_holds_the_library_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(name.split("/")[0] for name in names if ".dist-info/" in name)
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    top_level = sorted({name.split("/")[0] for name in names})
    assert top_level == ["celery_leader", dist_info], top_level  # no example_project
    assert "celery_leader/py.typed" in names
    assert "console_scripts" not in entry_points, entry_points  # no celery-leader-demo
    assert "[celery.commands]" in entry_points and "leader = celery_leader.cli:leader" \
        in entry_points


@pytest.fixture
def plain_venv(wheel: Path, tmp_path: Path) -> Path:
    """A bare venv with the wheel installed, no extras."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=outside_the_checkout(),
        timeout=120)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        cwd=tmp_path, env=outside_the_checkout())
    return venv


@pytest.fixture
def stopped_by_pid() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes appended here are stopped by PID (and their process group) at teardown."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        # Pool children that outlived their parent share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def test_a_plain_install_runs_a_worker_that_leads(
        plain_venv: Path, tmp_path: Path, redis_url: str,
        stopped_by_pid: list[subprocess.Popen[bytes]]) -> None:
    python, celery = plain_venv / "bin" / "python", plain_venv / "bin" / "celery"
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "plainapp.py").write_text(TINY_APP)
    env = outside_the_checkout()
    env.update(PLAIN_BROKER_URL=redis_url, PYTHONUNBUFFERED="1")

    # The library comes from the venv, and the example project is not installed.
    where = run([str(python), "-c", "import importlib.util as u, celery_leader; "
                 "print(celery_leader.__file__); "
                 "print(u.find_spec('example_project') is None)"], cwd=app_dir, env=env)
    location, example_absent = where.stdout.split()
    assert Path(location).is_relative_to(plain_venv), location
    assert example_absent == "True"

    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [str(celery), "-A", "plainapp", "worker", "-l", "info", "-c", "1",
             "-n", "plain@%h"], cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    stopped_by_pid.append(worker)

    def worker_log() -> str:
        return log_path.read_text(errors="replace")

    def leads() -> dict[str, object] | None:
        if worker.poll() is not None:
            raise AssertionError(f"the worker exited with {worker.returncode}:\n{worker_log()}")
        status = subprocess.run([str(celery), "-A", "plainapp", "leader", "status", "--json"],
                                cwd=app_dir, env=env, capture_output=True, text=True,
                                timeout=30, stdin=subprocess.DEVNULL)
        if status.returncode != 0:
            return None  # nobody leads yet
        info: dict[str, object] = json.loads(status.stdout)
        return info if str(info["leader"]).endswith(f":{worker.pid}") else None

    info = wait_until(leads, LEAD_TIMEOUT, "the plain-install worker to lead", worker_log,
                      interval=0.5)
    assert str(info["leader"]).startswith("plain@"), info
    assert isinstance(info["term"], int) and info["term"] >= 1, info
