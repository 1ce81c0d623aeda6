"""Real databases for the django-celery-beat tests, started by fixtures: a SQLite
file per test, and one PostgreSQL server per session (Debian's ``postgresql``
binaries, on a free loopback port in a temporary directory, stopped by PID),
with a fresh database per test.  PostgreSQL refuses to run as root: as root it
runs as ``nobody`` (``runuser``), owning its temporary directory.

Rows are changed through ``python -m tests.django_proj.rows`` (a process of its
own: the database is chosen by environment, like a Django project's)."""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_leader.testing import free_port
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
_names = itertools.count(1)


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin directory (make test installs it)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def django_env(db: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEADER_", "CELERY_"))}
    env.update(LEADER_TEST_DB=db, DJANGO_SETTINGS_MODULE="tests.django_proj.settings", **extra)
    return env


def rows(db: str, op: str, **fields: Any) -> Any:
    """Run one tests.django_proj.rows command against ``db``; its JSON result."""
    done = subprocess.run([sys.executable, "-m", "tests.django_proj.rows",
                           json.dumps({"op": op, **fields})], cwd=ROOT, env=django_env(db),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Postgres:
    """A throwaway PostgreSQL server; :meth:`stop` / :meth:`start` for outages."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="celery-leader-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "nobody")
        subprocess.run([*self.as_user, str(bindir / "initdb"), "-D", str(self.dir / "data"),
                        "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - the server's, until stop
        self.proc = subprocess.Popen(
            [*self.as_user, str(self.bindir / "postgres"), "-D", str(self.dir / "data"),
             "-p", str(self.port), "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "full_page_writes=off"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        wait_until(self._ready, 60, "PostgreSQL to accept connections", self.log)

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        return subprocess.run([str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p",
                               str(self.port)], capture_output=True).returncode == 0

    def log(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by PID, then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, 2)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(_names)}"
        subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", name], check=True, capture_output=True, timeout=60)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql; "
                    "apt-get install -y postgresql)")
    server = Postgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_db(postgres_server: Postgres) -> str:
    """A migrated database of its own on the session's PostgreSQL."""
    url = postgres_server.create_database()
    rows(url, "migrate")
    return url


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    url = f"sqlite:{tmp_path / 'db.sqlite3'}"
    rows(url, "migrate")
    return url
