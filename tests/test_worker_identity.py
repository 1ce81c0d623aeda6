"""Two real ``celery worker`` processes given the same ``--leader-identity``.

A copy-pasted identity (POD_NAME unset in a Deployment) must not make both
replicas lead: each running elector is its own holder, so one leads, the
other follows and says why, and every status view still shows the configured
identity.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_leader.embedded import free_port
from tests.celery_procs import LEASE, Cluster, Worker, stopped_at_end, wait_until
from tests.fakes import observe

pytestmark = pytest.mark.integration

BOOT = 45.0  # several interpreters importing Celery on a loaded 2-core machine
IDENTITY = "proj-worker-0"  # what the deployment doc's snippet falls back to
WARNING = f"identity {IDENTITY!r} is in use by another running elector"


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str,
            election_name: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, redis_url, election_name)
    with stopped_at_end(request, made, lambda: made.logs() + "\n" + made.events.dump()):
        yield made


def leader_view(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/leader", timeout=3) as reply:
        data: dict[str, Any] = json.loads(reply.read())
        return data


def test_two_workers_with_one_identity_only_one_leads(cluster: Cluster) -> None:
    ports: dict[str, int] = {}

    def same_identity(name: str) -> dict[str, Any]:
        ports[name] = free_port()
        return {"env": {"LEADER_HEALTHZ_PORT": str(ports[name])},
                "args": ["--leader-identity", IDENTITY]}

    workers = cluster.start(2, "solo", per_worker=same_identity)
    cluster.wait_ready(workers, BOOT)
    leader, started = cluster.wait_leader(BOOT)
    follower: Worker = next(w for w in workers if w is not leader)
    assert started["identity"] == IDENTITY

    def views() -> dict[str, dict[str, Any]]:
        return {w.name: leader_view(ports[w.name]) for w in workers}

    def only_the_leader_leads() -> None:
        seen = views()
        assert [name for name, view in seen.items() if view["is_leader"]] == [leader.name], seen
        assert all(view["identity"] == IDENTITY for view in seen.values()), seen

    # Three leases (20 retry periods): the follower never takes over, not even in turns.
    observe(3 * LEASE, only_the_leader_leads, interval=0.05)
    assert len(cluster.events.of("started_leading")) == 1, cluster.events.dump()

    code, status = _status(cluster)
    assert code == 0 and status["leader"] == IDENTITY and status["term"] == started["term"]
    seen = views()
    assert seen[leader.name]["term"] == started["term"]
    assert all(view["leader"] == IDENTITY for view in seen.values()), seen
    # on_new_leader (the new_leader signal) reports the configured identity everywhere.
    assert {e["identity"] for e in cluster.events.of("new_leader")} == {IDENTITY}
    wait_until(lambda: WARNING in follower.log(), 2 * LEASE, "the follower's warning",
               cluster.logs)
    # Each leadership change is logged once, not twice.
    assert leader.log().count("became leader") == 1, leader.log()


def _status(cluster: Cluster) -> tuple[int, dict[str, Any]]:
    result = cluster.celery("leader", "status", "--json")
    assert result.stdout.strip(), f"no output: {result.stderr}"
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])
