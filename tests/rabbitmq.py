"""A real RabbitMQ broker for the tests, run as a child process on loopback.

Debian's ``rabbitmq-server`` (``make rabbitmq`` installs it; its service never
starts) is started from its own scripts with everything of its own: a unique
node name, Mnesia and log directories and config file under a temporary
directory, free AMQP and Erlang distribution ports on 127.0.0.1, and an
``epmd`` of its own on a free loopback port (ERL_EPMD_PORT), so it neither
finds nor starts the machine's.  Both are stopped by PID (the server's whole
process group, then epmd).  Where the server is not installed the tests that
need it skip, saying so in one line.

One broker per test session (and per pytest-xdist process: it takes seconds
to boot); ``rabbitmq_url`` deletes the queues the test apps use first, so a
test never sees an earlier test's messages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from celery_leader.testing import free_port
from tests.waiting import wait_until

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
BOOT = 120.0
# The broker closes a channel whose delivery stays unacknowledged this long
# (RabbitMQ's consumer_timeout; its default, stated so tests run as deployments do).
CONSUMER_TIMEOUT_MS = 1800000
APP_QUEUES = ("celery", "celery_leader")


class RabbitMQ:
    """One throwaway broker; :meth:`start` waits until AMQP connections work."""

    def __init__(self, consumer_timeout_ms: int = CONSUMER_TIMEOUT_MS,
                 channel_tick_ms: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="celery-leader-rabbitmq-"))
        self.node = f"rabbit-{uuid.uuid4().hex[:10]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.consumer_timeout_ms = consumer_timeout_ms
        # How often a channel checks its deliveries against consumer_timeout (60 s
        # by default: a timeout fires up to that long after it is due).
        self.channel_tick_ms = channel_tick_ms
        self.epmd: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        config = self.dir / "rabbitmq.conf"
        config.write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
                          f"consumer_timeout = {self.consumer_timeout_ms}\n"
                          "log.console = true\nlog.console.level = warning\n"
                          "log.file = false\n")
        if self.channel_tick_ms is not None:
            (self.dir / "advanced.config").write_text(
                f"[{{rabbit, [{{channel_tick_interval, {self.channel_tick_ms}}}]}}].\n")
        plugins = self.dir / "enabled_plugins"
        plugins.write_text("[].\n")
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.dir),  # its Erlang cookie, not root's
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(config),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),  # not /etc's
            RABBITMQ_ENABLED_PLUGINS_FILE=str(plugins),
            RABBITMQ_PID_FILE=str(self.dir / "rabbitmq.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def start(self) -> None:
        env = self.env()
        with open(self.dir / "epmd.log", "wb") as out:
            self.epmd = subprocess.Popen(
                [EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        with open(self.dir / "server.log", "wb") as out:
            self.proc = subprocess.Popen([str(SERVER)], cwd=self.dir, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_until(self._ready, BOOT, "RabbitMQ to accept AMQP connections", self.log)

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (
            f"rabbitmq-server exited with {self.proc and self.proc.returncode}:\n{self.log()}")
        try:
            with Connection(self.url, connect_timeout=1.0) as connection:
                connection.ensure_connection(max_retries=1, timeout=1.0)
                return True
        except Exception:
            return False

    def log(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the server's script (a clean stop), its process group if it
        lingers; then epmd.  All by PID."""
        for proc, sig in ((self.proc, signal.SIGTERM), (self.epmd, signal.SIGTERM)):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(sig)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self.proc is not None:
            # What the VM left in its group (erl_child_setup, inet_gethost).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def purge_queues(url: str, *queues: str) -> None:
    """Delete ``queues`` (a test's own names): nothing left from an earlier test."""
    with Connection(url) as connection:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitMQ]:
    if not SERVER.exists():
        pytest.skip("RabbitMQ is not installed (make test installs Debian's rabbitmq-server; "
                    "apt-get install -y rabbitmq-server)")
    server = RabbitMQ()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def rabbitmq_url(rabbitmq_server: RabbitMQ) -> str:
    purge_queues(rabbitmq_server.url, *APP_QUEUES)
    return rabbitmq_server.url
