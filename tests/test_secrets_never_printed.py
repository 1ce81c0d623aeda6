"""Secrets never printed (issue 15): a canary password is put into every URL and
option celery-leader reads, every error path is driven, and nothing the
library printed or served may contain it.

One redis-server of its own, with a password for the default user
(``requirepass``), an ACL user with every right and one with none.  What is
looked at, whole: the stdout+stderr of real ``celery worker`` processes at INFO
(a good one leading, and one per error path: bad scheme, unparsable URL,
unreachable Redis, wrong password, wrong ACL password, NOPERM, Sentinel without
a master: no sentinel listening, or a plain redis-server where one should be);
``celery leader status`` / ``status --json`` / ``schedule`` / ``schedule --json``
for the good configuration and for the error paths; every HTTP route of the
workers' health server (headers and bodies); and the demo's output against an
unreachable Redis.  Each path is also checked to have
happened, so the test cannot pass by printing nothing.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import django
import pytest
import redis

from celery_leader.cli import _redis_failure
from celery_leader.election.elector import log as elector_log
from celery_leader.election.redact import (
    RedactingFilter,
    redact_options,
    redact_text,
    redact_url,
)
from celery_leader.election.redisclient import redis_client_from_url
from celery_leader.settings import LeaderSettings
from celery_leader.testing import EmbeddedRedis, free_port
from tests.celery_procs import Cluster, Worker, wait_until

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.config_app"
# In every password below; alphanumeric, so no URL encoding can hide it.
CANARY = f"Canary{uuid.uuid4().hex[:12]}"
DEFAULT_PW, LEADER_PW, NOPERM_PW, WRONG_PW = (CANARY + suffix for suffix in "DLNW")
TIMINGS = {"CELERY_LEADER_LEASE_DURATION": 2, "CELERY_LEADER_RENEW_DEADLINE": 1.4,
           "CELERY_LEADER_RETRY_PERIOD": 0.3}
WORKER_ARGS = ("--without-mingle", "--without-gossip", "--without-heartbeat")


@dataclass
class Server:
    port: int

    def url(self, userinfo: str, db: int = 0, query: str = "") -> str:
        return f"redis://{userinfo}@127.0.0.1:{self.port}/{db}{query}"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A redis-server whose default user needs DEFAULT_PW, with an ACL user
    ``leader`` (every right) and ``noperm`` (no command at all)."""
    embedded = EmbeddedRedis().start()
    try:
        admin = redis.Redis(port=embedded.port)
        admin.execute_command("ACL", "SETUSER", "leader", "reset", "on", f">{LEADER_PW}",
                              "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "noperm", "reset", "on", f">{NOPERM_PW}")
        admin.config_set("requirepass", DEFAULT_PW)
        admin.close()
        yield Server(embedded.port)
    finally:
        embedded.cleanup()


def error_paths(server: Server, closed: int) -> dict[str, dict[str, Any]]:
    """Settings (CONFIG_JSON) for each error path, the canary in every URL and option."""
    sentinel_options = {"master_name": "mymaster", "password": DEFAULT_PW,
                        "sentinel_kwargs": {"password": DEFAULT_PW, "socket_timeout": 1,
                                            "socket_connect_timeout": 1}}
    return {
        "bad-scheme": {"CELERY_LEADER_REDIS_URL": f"rediz://:{DEFAULT_PW}@127.0.0.1:1/0"},
        # A password with an unescaped "/": URL parsers read a piece of it as the port.
        "unparsable": {"CELERY_LEADER_REDIS_URL": f"redis://:{CANARY}/x@127.0.0.1:1/0"},
        "not-redis-broker": {"CELERY_BROKER_URL": f"amqp://guest:{DEFAULT_PW}@127.0.0.1:1//"},
        "unreachable": {"CELERY_LEADER_REDIS_URL": f"redis://:{DEFAULT_PW}@127.0.0.1:{closed}/0",
                        "CELERY_LEADER_REDIS_OPTIONS": {"password": DEFAULT_PW}},
        "wrong-password": {"CELERY_LEADER_REDIS_URL": server.url(f":{WRONG_PW}")},
        "wrong-acl-password": {"CELERY_LEADER_REDIS_URL": server.url(f"leader:{WRONG_PW}")},
        "noperm": {"CELERY_LEADER_REDIS_URL": server.url(f"noperm:{NOPERM_PW}"),
                   "CELERY_LEADER_REDIS_OPTIONS": {"password": NOPERM_PW}},
        # Sentinels that are not there, and a plain redis-server taken for one.
        "sentinel-no-master": {
            "CELERY_LEADER_REDIS_URL": f"sentinel://:{DEFAULT_PW}@127.0.0.1:{closed};"
                                       f"sentinel://:{DEFAULT_PW}@127.0.0.1:{closed}/0",
            "CELERY_LEADER_REDIS_OPTIONS": sentinel_options,
            "CELERY_BROKER_TRANSPORT_OPTIONS": {"master_name": "mymaster",
                                                "sentinel_kwargs": {"password": DEFAULT_PW}}},
        "sentinel-plain-redis": {
            "CELERY_LEADER_REDIS_URL": f"sentinel://:{DEFAULT_PW}@127.0.0.1:{server.port}/0",
            "CELERY_LEADER_REDIS_OPTIONS": sentinel_options},
    }


# What each error path must have said (so it surely ran), in the CLI and the worker.
EXPECTED = {
    "bad-scheme": "unknown scheme in 'rediz://:***@127.0.0.1:1/0'",
    "unparsable": "no valid host and port in 'redis://:***@127.0.0.1:1/0'",
    "not-redis-broker": "broker_url ('amqp://guest:***@127.0.0.1:1//') is not a Redis URL",
    "unreachable": "ConnectionError",
    "wrong-password": "AuthenticationError",
    "wrong-acl-password": "AuthenticationError",
    "noperm": "no permissions to run",
    "sentinel-no-master": "MasterNotFoundError",
    "sentinel-plain-redis": "unknown command `SENTINEL`",
}
# Paths that stop a worker at start-up (exit status 2) instead of retrying.
FATAL = ("bad-scheme", "unparsable", "wrong-password", "wrong-acl-password", "noperm")


def run_all(commands: dict[str, tuple[list[str], dict[str, str]]],
            timeout: float = 60.0) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every command at once (each ~1 s of imports); stopped by PID on timeout."""
    running = {label: subprocess.Popen(command, cwd=ROOT, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL)
               for label, (command, env) in commands.items()}
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for label, process in running.items():
            out, err = process.communicate(timeout=timeout)
            done[label] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)
    return done


def fetch(port: int, path: str) -> str:
    """Status line, headers and body of GET ``path``, as served."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return f"{response.status}\n{response.headers}\n{response.read().decode()}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code}\n{exc.headers}\n{exc.read().decode()}"


def served_routes() -> set[str]:
    """``/healthz`` plus every route a celery-leader module registers
    (``routes={...}``), so a route added later is covered too."""
    found = {"/healthz"}
    for path in (ROOT / "celery_leader").rglob("*.py"):
        for block in re.findall(r"routes=\{([^}]*)\}", path.read_text()):
            found.update(re.findall(r"[\"'](/[\w/.-]*)[\"']", block))
    assert "/leader" in found, found
    return found


def leaks(printed: dict[str, str]) -> list[str]:
    return [f"{label}: " + next(line for line in text.splitlines() if CANARY in line)
            for label, text in printed.items() if CANARY in text]


@pytest.mark.integration
def test_canary_password_is_never_printed_or_served(server: Server, tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    name = f"secrets-{uuid.uuid4().hex[:6]}"
    broker = server.url(f":{DEFAULT_PW}")
    good = {
        **TIMINGS,
        "CELERY_LEADER_NAME": name,
        # Credentials three ways: ACL user in the URL, ?password=, and the options.
        "CELERY_LEADER_REDIS_URL": server.url(f"leader:{LEADER_PW}",
                                              query=f"?password={LEADER_PW}"),
        "CELERY_LEADER_REDIS_OPTIONS": {"password": LEADER_PW},
        "CELERY_BROKER_TRANSPORT_OPTIONS": {"sentinel_kwargs": {"password": DEFAULT_PW}},
        "CELERY_RESULT_BACKEND": broker,
        "CELERY_BEAT_SCHEDULE": {"cleanup": {"task": "celery.backend_cleanup",
                                             "schedule": 3600}},
    }
    bad = error_paths(server, closed)
    ports = {label: free_port() for label in ["good", *bad]}

    def config(label: str) -> dict[str, str]:
        settings = good if label == "good" else {**TIMINGS, "CELERY_LEADER_NAME": name,
                                                 **bad[label]}
        settings = {**settings, "CELERY_LEADER_HEALTHZ_PORT": ports[label],
                    "CELERY_LEADER_HEALTHZ_HOST": "127.0.0.1"}
        return {"CONFIG_JSON": json.dumps(settings)}

    cluster = Cluster(tmp_path, broker, name, app=APP)
    printed: dict[str, str] = {}
    try:
        workers: dict[str, Worker] = {}
        for label in ["good", *(label for label in bad if label != "not-redis-broker")]:
            [workers[label]] = cluster.start(pool="solo", args=WORKER_ARGS,
                                             env=config(label))
        cli = [sys.executable, "-m", "celery", "-A", APP, "leader"]
        commands = {f"{label} {' '.join(args)}": ([*cli, *args], cluster.base_env(config(label)))
                    for label in bad for args in (["status"], ["status", "--json"])}
        commands.update({f"{label} schedule --json": ([*cli, "schedule", "--json"],
                                                      cluster.base_env(config(label)))
                         for label in ("unreachable", "noperm", "sentinel-no-master",
                                       "sentinel-plain-redis")})
        commands["demo"] = ([sys.executable, "-m", "example_project.demo", "--plain",
                             "--redis-url", f"redis://:{DEFAULT_PW}@127.0.0.1:{closed}/0"],
                            cluster.base_env())
        for label, result in run_all(commands).items():
            printed[f"cli {label}"] = result.stdout + result.stderr
            assert result.returncode != 0, f"{label} succeeded:\n{printed[f'cli {label}']}"
            path = label.split()[0]
            want = EXPECTED.get(path, "cannot use Redis at redis://:***@127.0.0.1")
            assert want in printed[f"cli {label}"], (want, printed[f"cli {label}"])

        routes = sorted(served_routes() | {"/no-such-route"})
        for label in bad:
            worker = workers.get(label)
            if worker is None:
                continue
            if label in FATAL:
                assert worker.wait_exit(30) == 2, worker.log()
                assert EXPECTED[label] in worker.log(), worker.log()
                continue
            # The elector's retry log, then every route of its health server.
            wait_until(lambda w=worker, want=EXPECTED[label]: w.alive() and re.search(
                r"lock redis:\S+ failed \(.*" + want, w.log()), 45,
                f"the {label} worker to log its failing lock", worker.log)
            for route in routes:
                printed[f"http {label} {route}"] = fetch(ports[label], route)

        # The good worker leads; the CLI in both formats and every route.
        good_worker = workers["good"]
        wait_until(lambda: '"is_leader": true' in fetch(ports["good"], "/leader"), 45,
                   "the good worker to lead", good_worker.log)
        for route in routes:
            printed[f"http good {route}"] = fetch(ports["good"], route)
        assert printed["http good /healthz"].startswith("200"), printed["http good /healthz"]
        good_cli = {f"good {' '.join(args)}": ([*cli, *args], cluster.base_env(config("good")))
                    for args in (["status"], ["status", "--json"], ["schedule"],
                                 ["schedule", "--json"])}
        for label, result in run_all(good_cli).items():
            printed[f"cli {label}"] = result.stdout + result.stderr
            assert result.returncode == 0, printed[f"cli {label}"]
        assert "term:" in printed["cli good status"], printed["cli good status"]
        assert "cleanup" in printed["cli good schedule --json"]
        assert f"redis://leader:***@127.0.0.1:{server.port}/0?password=***" == redact_url(
            good["CELERY_LEADER_REDIS_URL"])
    finally:
        cluster.stop()
        cluster.events.close()
    for worker in cluster.workers:
        printed[f"worker {worker.name} ({worker.env['CONFIG_JSON'][:60]}...)"] = worker.log()
    assert " ready." in workers["good"].log()
    assert not leaks(printed), "the canary password was printed or served:\n" + "\n".join(
        leaks(printed))


# ----------------------------------------------------------- the helper itself

@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
    ("rediss://user@h", "rediss://user@h"),  # a user name, as kombu shows it
    ("sentinel://:pw@h1:26379;sentinel://h2:26379/0",
     "sentinel://:***@h1:26379;sentinel://h2:26379/0"),
    ("redis://h:6379/0?password=pw&db=1", "redis://h:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?db=1&sentinel_password=pw", "unix:///run/redis.sock?db=1&"
                                                         "sentinel_password=***"),
    ("redis://:p/w#x@h:6379/0", "redis://:***@h:6379/0"),  # unescaped: masked whole
    ("redis:/:pw@h", "redis:/:***@h"),  # a mistyped "://"
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis://", "redis://"),
])
def test_redact_url(url: str, masked: str) -> None:
    assert redact_url(url) == masked


def test_redact_options_masks_secrets_at_any_depth() -> None:
    options = {"password": "pw", "master_name": "m", "ssl_password": "pw", "db": 1,
               "sentinel_kwargs": {"password": "pw", "socket_timeout": 1},
               "url": "redis://:pw@h", "username": "user"}
    assert redact_options(options) == {
        "password": "***", "master_name": "m", "ssl_password": "***", "db": 1,
        "sentinel_kwargs": {"password": "***", "socket_timeout": 1},
        "url": "redis://:***@h", "username": "user"}


def test_redact_text_masks_urls_and_client_reprs() -> None:
    # redis-py 6.2 to 7.x printed connection arguments in a pool's repr, and
    # MasterNotFoundError embeds that repr.
    text = ("No master found for 'm' : <redis.client.Redis(<redis.connection.ConnectionPool("
            "<redis.connection.Connection(db=0,username=u,password=pw,socket_timeout=1)>)>)> "
            "{'password': 'p w'} at 'rediz://:pw@h:1/0'")
    masked = redact_text(text)
    assert "pw" not in masked.replace("password", "") and "p w" not in masked, masked
    assert "username=u,password=***,socket_timeout=1" in masked
    assert "'rediz://:***@h:1/0'" in masked
    # Identities and ordinary messages are left alone.
    plain = ("leader election secrets-1: lock redis:k failed; celery@host:123 became "
             "leader; invalid username-password pair; password: see the docs")
    assert redact_text(plain) == plain


def test_every_celery_leader_logger_masks_its_records(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """Each module's ``log`` goes through the masking filter (a new module's too)."""
    # contrib.django_beat imports Django's models: settings of its own, whatever ran before.
    monkeypatch.setenv("LEADER_TEST_DB", f"sqlite:{tmp_path / 'db.sqlite3'}")
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "tests.django_proj.settings")
    django.setup()
    unmasked = []
    for path in sorted((ROOT / "celery_leader").rglob("*.py")):
        module_name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        module = importlib.import_module(module_name.removesuffix(".__init__"))
        for attribute, value in vars(module).items():
            if isinstance(value, logging.Logger) and not any(
                    isinstance(f, RedactingFilter) for f in value.filters):
                unmasked.append(f"{module_name}.{attribute} ({value.name})")
    assert not unmasked, unmasked


def test_leaky_client_repr_in_an_error_is_masked(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """redis-py 6.2 to 7.x printed a pool's connection arguments, password
    included, in its repr, and MasterNotFoundError embeds that repr: the
    elector's log (message and traceback) and the CLI's error line mask it."""
    def leaky_repr(pool: Any) -> str:  # as redis-py 7.0 wrote it
        kwargs = ",".join(f"{k}={v}" for k, v in pool.connection_kwargs.items())
        return f"<{type(pool).__module__}.{type(pool).__name__}({kwargs})>"

    monkeypatch.setattr(redis.connection.ConnectionPool, "__repr__", leaky_repr)
    closed = free_port()
    client = redis_client_from_url(
        f"sentinel://:{DEFAULT_PW}@127.0.0.1:{closed}/0",
        {"master_name": "mymaster", "sentinel_kwargs": {"password": DEFAULT_PW,
                                                        "socket_connect_timeout": 0.5}})
    with pytest.raises(redis.exceptions.ConnectionError) as raised:
        client.ping()
    assert CANARY in str(raised.value), "the leak this guards against did not happen"
    with caplog.at_level(logging.WARNING, logger=elector_log.name):
        elector_log.warning("lock failed (%s)", raised.value, exc_info=raised.value)
    assert "lock failed (" in caplog.text and "password=***" in caplog.text
    assert CANARY not in caplog.text, caplog.text
    assert CANARY not in str(_redis_failure(raised.value).message)


def test_settings_repr_masks_the_url_and_options() -> None:
    settings = LeaderSettings(redis_url=f"redis://leader:{LEADER_PW}@h:6379/0",
                              redis_options={"password": LEADER_PW},
                              transport_options={"sentinel_kwargs": {"password": LEADER_PW}})
    shown = repr(settings)
    assert CANARY not in shown and "redis://leader:***@h:6379/0" in shown, shown
