"""The health port of real ``celery beat -S leader`` processes, and the schedule
on the page of a worker that does not dispatch it (issue 21, item 5).

Two standalone beats and one worker with ``leader_beat = False``
(tests/apps/beat_app.py) each serve ``leader_healthz_port`` with a token: each
beat answers ``/healthz`` without it (a Kubernetes probe), ``/metrics``,
``/status`` and the page with it; every replica's page shows the schedule as
Redis holds it and who dispatches it, and the page's links keep the
``?token=`` it was opened with.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_leader.testing import free_port
from tests.sched_procs import Replicas
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

TOKEN = "beat-page-token"



def get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:  # nothing listens there
        return 0, str(error)


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(port, "/metrics")
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def test_standalone_beats_serve_the_health_port_and_every_page_shows_the_schedule(
        replicas: Replicas, election_name: str) -> None:
    ports = [free_port() for _ in range(3)]
    env = [{"LEADER_HEALTHZ_PORT": str(port), "LEADER_HEALTHZ_TOKEN": TOKEN} for port in ports]
    beats = [replicas.beat(env=env[0]), replicas.beat(env=env[1])]
    worker = replicas.worker(env={**env[2], "LEADER_BEAT": "0"})
    election = f"{election_name}-beat"
    leader, term = replicas.wait_leader(election, timeout=60)
    replicas.wait_ticks(2, timeout=30)
    replicas.wait_workers_ready()
    port_of = {beats[0].pid: ports[0], beats[1].pid: ports[1]}
    follower = next(b for b in beats if b is not leader)
    identity = replicas.lease(election)["holderIdentity"]  # type: ignore[index]

    # A probe needs no token; everything else does, and says how to give it.
    for port in ports[:2]:
        status, body = wait_until(lambda p=port: (r := get(p, "/healthz", token=None))[0] and r,
                                  30, f"beat port {port} to answer", replicas.logs)
        assert (status, body) == (200, "ok\n")
        status, body = get(port, "/status", token=None)
        assert status == 401 and "?token=" in body, body

    # Metrics of the beats' own election and of the schedule, counters at 0 on the follower.
    lead = wait_until(lambda: (s := samples(port_of[leader.pid])) and s.get(
        ("celery_leader_schedule_ticks_dispatched_total", (("name", election_name),)), 0) >= 1
        and s, 20, "the beat leader to count its ticks", replicas.logs)
    assert lead[("celery_leader_is_leader", (("name", election),))] == 1
    assert lead[("celery_leader_term", (("name", election),))] >= term
    idle = samples(port_of[follower.pid])
    assert idle[("celery_leader_is_leader", (("name", election),))] == 0
    assert idle[("celery_leader_transitions_total",
                 (("name", election), ("reason", "acquired")))] == 0
    assert idle[("celery_leader_schedule_ticks_dispatched_total",
                 (("name", election_name),))] == 0

    # /status and the page of each replica: the schedule as Redis holds it,
    # dispatched by the beat leader, the worker's (which dispatches nothing) too.
    def page_shows_the_dispatcher(port: int) -> dict[str, Any] | None:
        status, body = get(port, "/status")
        assert status == 200, body
        report = json.loads(body)
        dispatcher = report["schedule"].get("dispatcher") or {}
        return report if dispatcher.get("identity") == identity else None

    for port, own_election in ((ports[0], election), (ports[1], election),
                               (ports[2], election_name)):
        report = wait_until(lambda p=port: page_shows_the_dispatcher(p), 20,
                            f"port {port}'s /status to name the dispatcher", replicas.logs)
        assert report["election"]["name"] == own_election
        schedule = report["schedule"]
        assert schedule["dispatcher"]["leading"] is True
        assert [e["name"] for e in schedule["entries"]] == ["every-second"]
        assert schedule["entries"][0]["last_fire_time"] is not None
        status, page = get(port, "/")
        assert status == 200
        assert "does not run the schedule" not in page
        assert re.search(rf"dispatched by <b>{re.escape(identity)}</b> \(term \d+", page), page
        assert "every-second" in page
    worker_report = page_shows_the_dispatcher(ports[2])
    assert worker_report is not None and worker_report["schedule"]["runner_here"] is False
    assert worker_report["schedule"]["sent_here"] == []

    # Opened in a browser with ?token=, the page's links keep it, and they work.
    status, page = get(ports[0], f"/?token={TOKEN}", token=None)
    assert status == 200
    links = re.findall(r'<a href="([^"]+)"', page)
    assert links == [f"status?token={TOKEN}", f"metrics?token={TOKEN}"], links
    for link in links:
        assert get(ports[0], f"/{link}", token=None)[0] == 200, link
    # A wrong token is never copied into the links.
    status, page = get(ports[0], "/?token=wrong", token=TOKEN)
    assert status == 200 and "token=wrong" not in page
    assert worker.alive()
