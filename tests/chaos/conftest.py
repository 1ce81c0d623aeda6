"""Fixtures of the chaos suite: the seed, the time budget, and a cluster of three
replicas on a Redis of its own, whose every process is stopped by PID."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosCluster, ChaosRedis

# Faults of every kind run once per sequence; CHAOS_SECONDS lengthens each
# sequence with further seeded random faults.
DEFAULT_SECONDS = 40.0


def show(config: pytest.Config, text: str) -> None:
    """Print past pytest's output capture (the seed and the journal must be seen)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in text.splitlines():
            reporter.write_line(line)


@pytest.fixture(scope="session")
def chaos_seed(pytestconfig: pytest.Config) -> int:
    explicit = os.environ.get("CHAOS_SEED")
    seed = int(explicit) if explicit else random.SystemRandom().randrange(2**32)
    show(pytestconfig, f"chaos seed: {seed} (replay with CHAOS_SEED={seed})")
    return seed


@pytest.fixture(scope="session")
def chaos_seconds() -> float:
    return float(os.environ.get("CHAOS_SECONDS", DEFAULT_SECONDS))


ClusterFactory = Callable[..., ChaosCluster]


@pytest.fixture
def chaos_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClusterFactory]:
    """``chaos_cluster(replicas=3, **env)``: a fresh Redis (AOF, fsync always) in
    ``tmp_path/redis`` and ``replicas`` ready replicas of tests.apps.chaos_app."""
    made: list[ChaosCluster] = []
    servers: list[ChaosRedis] = []
    failed_before = request.session.testsfailed

    def make(replicas: int = 3, **env: str) -> ChaosCluster:
        server = ChaosRedis(tmp_path / "redis")
        servers.append(server)
        server.start()
        cluster = ChaosCluster(tmp_path, server, f"chaos-{uuid.uuid4().hex[:8]}", env)
        made.append(cluster)
        started = [cluster.start_replica() for _ in range(replicas)]
        cluster.wait_ready(started)
        return cluster

    try:
        yield make
    finally:
        try:
            for cluster in made:
                cluster.stop()
        finally:
            for server in servers:
                server.stop()
            if request.session.testsfailed > failed_before:
                for cluster in made:
                    show(request.config, f"replica logs ({tmp_path}):\n{cluster.logs()}")
