"""Credentials the lease's Redis refuses: loud at start-up, unhealthy later.

At start-up a real ``celery worker`` whose ``leader_redis_url`` Redis refuses
its credentials (WRONGPASS: a wrong password; NOAUTH: none where one is
required; NOPERM: an ACL user without the election's grants) exits 2 with one
line naming ``leader_redis_url``, its password masked.  Before, it retried
forever and ``/healthz`` said ok.

Later (a password rotated, a grant revoked while running): ``/healthz`` (the
worker's check, served) fails once it has lasted past the lease and the check's
tolerance, and
``celery_leader_lock_credentials_refused`` reads 1 meanwhile; both recover when
Redis accepts the credentials again.  Real Redis servers throughout (the
session's, with ACL users of their own; one with ``requirepass``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from celery_leader import (
    HealthCheckError,
    LeaderCallbacks,
    LeaderElectionConfig,
    LeaderElector,
    RedisLock,
)
from celery_leader.election.healthz import HealthzAdaptor, serve_healthz
from celery_leader.election.metrics import election_families
from celery_leader.testing import EmbeddedRedis
from tests.celery_procs import ROOT, Cluster, stopped_at_end
from tests.test_celery_worker import _without_root_warning
from tests.waiting import wait_until

LEASE, RENEW, RETRY = 1.0, 0.7, 0.2
GOOD, WRONG = "right-" + uuid.uuid4().hex[:8], "wrong-" + uuid.uuid4().hex[:8]
# What the election needs on a connection (redis-py's handshake, SELECT of the db).
CONNECT = ["+@connection", "+select", "+client", "+info"]


class AclUser:
    """An ACL user of the session's Redis, deleted at the end of the test."""

    def __init__(self, admin_url: str, rules: list[str]) -> None:
        self.admin = redis.Redis.from_url(admin_url)
        self.name = "cl-" + uuid.uuid4().hex[:10]
        self.admin.acl_setuser(self.name, enabled=True, passwords=[f"+{GOOD}"],
                               keys=["*"], channels=["*"], commands=rules, reset=True)
        parts = urlsplit(admin_url)
        self.base = f"redis://{{}}@{parts.hostname}:{parts.port}{parts.path}"

    def url(self, password: str) -> str:
        return self.base.format(f"{self.name}:{password}")

    def set(self, *rules: str) -> None:
        self.admin.execute_command("ACL", "SETUSER", self.name, *rules)

    def drop_connections(self) -> None:
        self.admin.execute_command("CLIENT", "KILL", "USER", self.name)

    def close(self) -> None:
        self.admin.acl_deluser(self.name)
        self.admin.close()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str,
            election_name: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, redis_url, election_name, app="tests.apps.config_app")
    with stopped_at_end(request, made, lambda: f"worker output ({tmp_path}):\n"
                        f"{made.logs()}"):
        yield made


@pytest.fixture
def password_server() -> Iterator[EmbeddedRedis]:
    """A Redis whose default user needs a password (set after it answers PING)."""
    server = EmbeddedRedis()
    server.start()
    try:
        redis.Redis(port=server.port).config_set("requirepass", GOOD)
        yield server
    finally:
        server.cleanup()


def start_refused(cluster: Cluster, lease_url: str) -> str:
    """Start a worker whose election uses ``lease_url``; its one stderr line."""
    [worker] = cluster.start(1, "solo", split_stderr=True, env={
        "CONFIG_JSON": json.dumps({"CELERY_LEADER_REDIS_URL": lease_url})})
    code = worker.wait_exit(45)
    assert worker.stderr_path is not None
    stderr = worker.stderr_path.read_text()
    assert code == 2, worker.log()
    lines = _without_root_warning(stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in worker.log()
    return lines[0]


@pytest.mark.integration
@pytest.mark.parametrize("case", ["WRONGPASS", "NOPERM"])
def test_refused_credentials_stop_the_worker_at_start_with_one_line(
        cluster: Cluster, redis_url: str, case: str) -> None:
    # NOPERM: the user may connect but not run the election's scripts.
    user = AclUser(redis_url, ["+@all"] if case == "WRONGPASS" else [*CONNECT, "+get"])
    try:
        url = user.url(WRONG if case == "WRONGPASS" else GOOD)
        line = start_refused(cluster, url)
    finally:
        user.close()
    masked = url.replace(WRONG, "***").replace(GOOD, "***")
    assert line.startswith(f"celery-leader: configuration error: leader_redis_url {masked}: "
                           "Redis refused the election's credentials ("), line
    # redis-py's exception for each reply (it drops the WRONGPASS prefix).
    kind = {"WRONGPASS": "AuthenticationError", "NOPERM": "NoPermissionError"}[case]
    assert f"({kind}: " in line and WRONG not in line and GOOD not in line
    assert "fix the password or the ACL user's grants" in line


@pytest.mark.integration
def test_no_password_where_one_is_required_stops_the_worker(
        cluster: Cluster, password_server: EmbeddedRedis) -> None:
    line = start_refused(cluster, f"redis://127.0.0.1:{password_server.port}/0")
    assert line.startswith("celery-leader: configuration error: leader_redis_url "
                           f"redis://127.0.0.1:{password_server.port}/0: Redis refused the "
                           "election's credentials ("), line
    assert "NOAUTH" in line or "Authentication required" in line, line


def refused_gauge(elector: LeaderElector, name: str) -> float:
    [family] = [f for f in election_families(name, elector)
                if f.name == "celery_leader_lock_credentials_refused"]
    return float(family.samples[(name,)])


@pytest.mark.parametrize("change", ["password-rotated", "grant-revoked"])
def test_credentials_refused_while_running_fail_the_health_check_after_a_bound(
        redis_url: str, election_name: str, change: str) -> None:
    user = AclUser(redis_url, ["+@all"])
    client = redis.Redis.from_url(user.url(GOOD), socket_timeout=2.0,
                                  socket_connect_timeout=2.0)
    lock = RedisLock(client, name=election_name, identity="a")
    led = threading.Event()
    adaptor = HealthzAdaptor.for_lease(LEASE)  # the worker's check
    elector = LeaderElector(LeaderElectionConfig(
        lock=lock, callbacks=LeaderCallbacks(lambda stop: (led.set(), stop.wait()),
                                             lambda: None),
        lease_duration=LEASE, renew_deadline=RENEW, retry_period=RETRY, name=election_name,
        watchdog=adaptor))
    http = serve_healthz(adaptor, 0)

    def healthz() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/healthz",
                                        timeout=3) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    stop = threading.Event()
    thread = threading.Thread(target=elector.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert led.wait(10), "never led"
        assert healthz() == (200, "ok\n")
        assert refused_gauge(elector, election_name) == 0.0  # exported from the start
        if change == "password-rotated":
            user.set("resetpass", f">{WRONG}")
            user.drop_connections()  # the next connection authenticates again
        else:
            user.set("-@all", *CONNECT)
        refused_at = time.monotonic()
        wait_until(lambda: refused_gauge(elector, election_name) == 1.0, 10,
                   "the gauge to say the credentials are refused")

        wait_until(lambda: healthz()[0] == 500, 2 * LEASE + 5, "/healthz to fail")
        assert time.monotonic() - refused_at >= 2 * LEASE - RETRY
        status, body = healthz()
        assert status == 500 and "refused the credentials" in body, body
        assert WRONG not in body and GOOD not in body
        with pytest.raises(HealthCheckError, match="refused the credentials"):
            elector.check(LEASE)
        # Redis accepts them again: healthy, and the gauge back at 0.
        if change == "password-rotated":
            user.set(f">{GOOD}")
        else:
            user.set("+@all")
        wait_until(lambda: refused_gauge(elector, election_name) == 0.0, 10,
                   "the gauge to clear")
        assert healthz() == (200, "ok\n")
    finally:
        http.close()
        stop.set()
        elector.stop()
        thread.join(10)
        client.close()
        user.close()


@pytest.mark.integration
def test_a_standalone_beat_with_refused_credentials_stops_with_one_line(
        tmp_path: Path, redis_url: str, election_name: str) -> None:
    user = AclUser(redis_url, ["+@all"])
    url = user.url(WRONG)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LEADER_", "CELERY_"))}
    env.update(REDIS_URL=redis_url, PYTHONUNBUFFERED="1", CONFIG_JSON=json.dumps(
        {"CELERY_LEADER_REDIS_URL": url, "CELERY_LEADER_NAME": election_name}))
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.apps.config_app", "beat", "-S", "leader",
         "-s", str(tmp_path / "beat-schedule"), "-l", "info"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        _, stderr = process.communicate(timeout=45)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        user.close()
    assert process.returncode == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("celery-leader:")]
    assert lines == [f"celery-leader: configuration error: leader_redis_url "
                     f"{url.replace(WRONG, '***')}: Redis refused the election's credentials "
                     "(AuthenticationError: invalid username-password pair or user is "
                     "disabled.); fix the password or the ACL user's grants"], stderr
    assert WRONG not in stderr
