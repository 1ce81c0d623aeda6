"""/metrics, /status and / on the health port of real workers (issue 14).

Two prefork workers of tests/apps/observe_app.py (the schedule on, an entry
every half second) each serve the health port; the tests scrape them before and
after the leader is killed, and parse every metric with prometheus_client's own
parser.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_leader.testing import free_port
from tests import browser
from tests.celery_procs import FAILOVER_BOUND, Cluster, Worker, wait_until
from tests.promtool import run_rule_tests, series, storm_sum

pytestmark = pytest.mark.integration

APP = "tests.apps.observe_app"
BOOT = 45.0
SLACK = 10.0


@pytest.fixture
def cluster(tmp_path: Path, redis_url: str, election_name: str) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, redis_url, election_name, app=APP)
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            cluster.events.close()


def get(port: int, path: str, token: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.headers.get("Content-Type", ""), reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read().decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, token: str | None = None) -> Samples:
    status, content_type, body = get(port, "/metrics", token)
    assert status == 200, body
    assert content_type.startswith("text/plain; version=0.0.4")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


def first_leadership_counted(tmp_path: Path, scraped: list[float | None]) -> None:
    """Scrapes a minute apart, as a Prometheus would have stored them."""
    samples = [v for v in scraped for _ in range(4)]
    run_rule_tests(tmp_path, [{
        "interval": "15s",
        "input_series": [{"series": 'celery_leader_transitions_total{name="app",'
                                    'reason="acquired",instance="successor"}',
                          "values": series(samples)}],
        "promql_expr_test": [{"expr": f"{storm_sum()} > bool 0", "eval_time": "105s",
                              "exp_samples": [{"labels": '{name="app"}', "value": 1}]}],
    }])


def started_with_ports(cluster: Cluster, count: int, env: dict[str, str] | None = None
                       ) -> tuple[list[Worker], dict[str, int]]:
    ports: dict[str, int] = {}

    def own_port(name: str) -> dict[str, Any]:
        ports[name] = free_port()
        return {"env": {"LEADER_HEALTHZ_PORT": str(ports[name]), **(env or {})}}

    workers = cluster.start(count, "prefork", per_worker=own_port)
    cluster.wait_ready(workers, BOOT)
    return workers, ports


def test_metrics_across_a_failover(cluster: Cluster) -> None:
    name = cluster.election
    workers, ports = started_with_ports(cluster, 2)
    leader, started = cluster.wait_leader(BOOT)
    follower = next(w for w in workers if w is not leader)
    term = started["term"]

    def leader_dispatched(port: int) -> Samples | None:
        samples = scrape(port)
        count = value(samples, "celery_leader_schedule_dispatch_lateness_seconds_count",
                      name=name)
        return samples if count and count >= 2 else None

    before = wait_until(lambda: leader_dispatched(ports[leader.name]), 20,
                        "the leader's lateness histogram to observe ticks", cluster.logs)
    assert value(before, "celery_leader_is_leader", name=name) == 1
    assert value(before, "celery_leader_term", name=name) == term
    assert value(before, "celery_leader_transitions_total", name=name, reason="acquired") == 1
    assert value(before, "celery_leader_schedule_ticks_dispatched_total", name=name) >= 2
    assert value(before, "celery_leader_schedule_entries", name=name, state="loaded") == 1
    late = value(before, "celery_leader_schedule_dispatch_lateness_seconds_sum", name=name)
    assert late is not None and late >= 0
    assert (value(before, "celery_leader_renew_duration_seconds_count", name=name) or 0) > 0
    assert 0 < value(before, "celery_leader_lease_remaining_seconds", name=name) <= 2.0

    watching = scrape(ports[follower.name])
    assert value(watching, "celery_leader_is_leader", name=name) == 0
    assert value(watching, "celery_leader_term", name=name) == term
    # Every counter is there at 0 before its first event (increase() would not
    # count a series that appears at 1: checked below with promtool).
    assert value(watching, "celery_leader_transitions_total", name=name,
                 reason="acquired") == 0
    assert value(watching, "celery_leader_schedule_ticks_dispatched_total", name=name) == 0
    assert value(watching, "celery_leader_schedule_ticks_caught_up_total", name=name) == 0
    assert value(watching, "celery_leader_observed_holder_info", name=name,
                 holder=started["identity"]) == 1

    leader.signal(signal.SIGKILL)
    leader.wait_exit(10)
    successor, took_over = cluster.wait_leader(FAILOVER_BOUND + SLACK, after_term=term,
                                               among=[follower])
    after = wait_until(lambda: leader_dispatched(ports[successor.name]), 20,
                       "the new leader's lateness histogram to observe ticks", cluster.logs)
    new_term = value(after, "celery_leader_term", name=name)
    assert new_term == took_over["term"] and new_term > term
    assert value(after, "celery_leader_is_leader", name=name) == 1
    # One transition counted, once, on the replica that made it.
    assert value(after, "celery_leader_transitions_total", name=name, reason="acquired") == 1
    assert value(after, "celery_leader_observed_holder_info", name=name,
                 holder=took_over["identity"]) == 1
    assert value(after, "celery_leader_observed_holder_info", name=name,
                 holder=started["identity"]) is None
    # Of the ticks due while nobody led (about a lease), the "latest" policy sends
    # the last one (caught up) and skips the others.
    assert value(after, "celery_leader_schedule_ticks_caught_up_total", name=name) == 1
    assert value(after, "celery_leader_schedule_ticks_skipped_total", name=name,
                 reason="catch_up_policy") >= 1
    assert value(after, "celery_leader_schedule_dispatch_lateness_seconds_sum", name=name) > 0
    # The shipped storm alert's sum counts the successor's first leadership from
    # what its /metrics served before and after it.
    first_leadership_counted(cluster.tmp_path, [
        value(watching, "celery_leader_transitions_total", name=name, reason="acquired"),
        value(after, "celery_leader_transitions_total", name=name, reason="acquired")])

    status, _, body = get(ports[successor.name], "/status")
    assert status == 200
    report = json.loads(body)
    assert report["election"]["leader"] == took_over["identity"]
    assert report["election"]["term"] == new_term
    assert report["election"]["this_replica"]["is_leader"] is True
    assert [t["event"] for t in report["transitions"]][:1] == ["started_leading"]
    assert report["schedule"]["entries"][0]["name"] == "half-second"
    assert report["schedule"]["entries"][0]["term"] == new_term
    assert "redis://" not in body  # no URL (and so no password) is ever shown


def test_a_token_guards_every_endpoint_but_healthz(cluster: Cluster) -> None:
    token = "s3cret-token"
    workers, ports = started_with_ports(cluster, 1, {"LEADER_HEALTHZ_TOKEN": token})
    port = ports[workers[0].name]
    cluster.wait_leader(BOOT)
    assert get(port, "/healthz")[0] == 200
    for path in ("/", "/status", "/metrics", "/leader"):
        status, _, body = get(port, path)
        assert status == 401, (path, body)
        assert get(port, path, token="wrong")[0] == 401
        assert get(port, path, token=token)[0] == 200
    assert get(port, f"/?token={token}")[0] == 200  # a browser opening the page
    assert token not in get(port, "/status", token=token)[2]


def test_leader_only_tasks_are_counted_across_pool_children(cluster: Cluster) -> None:
    name = cluster.election
    workers, ports = started_with_ports(cluster, 1, {"LEADER_METRICS_PER_TASK": "1"})
    cluster.wait_leader(BOOT)
    port = ports[workers[0].name]
    cluster.send({"task": "leader_work", "args": ["t{i}"], "count": 3})
    cluster.events.wait_kind("task_done", 30, count=3)
    task = "tests.apps.leader_app.leader_work"
    samples = wait_until(
        lambda: (s := scrape(port)) and value(s, "celery_leader_tasks_started_total",
                                              name=name, task=task) == 3 and s,
        10, "3 leader-only starts counted", cluster.logs)
    assert value(samples, "celery_leader_tasks_duplicates_refused_total", name=name,
                 task=task) == 0


def test_the_status_page_in_headless_chromium(cluster: Cluster, tmp_path: Path) -> None:
    """Loads with no console error, shows the leader, follows a fail-over by itself
    (it reloads every 2 s).  SCREENSHOT=<path> also saves the page there."""
    if browser.chromium_binary() is None:
        pytest.skip("no chromium binary: `make test` installs Debian's chromium "
                    "(apt-get install -y chromium, as root); it could not here")
    workers, ports = started_with_ports(cluster, 2)
    leader, started = cluster.wait_leader(BOOT)
    follower = next(w for w in workers if w is not leader)
    url = f"http://127.0.0.1:{ports[follower.name]}/"

    def leader_shown(identity: str) -> Callable[[], str | None]:
        def shown() -> str | None:
            text = page.text()
            return text if f"Leader\n{identity}" in text else None
        return shown

    with browser.chromium() as page:
        page.navigate(url)
        text = wait_until(leader_shown(started["identity"]), 20,
                          f"the page to show leader {started['identity']}",
                          lambda: page.text())
        assert "follower" in text and "half-second" in text
        leader.signal(signal.SIGKILL)
        leader.wait_exit(10)
        _, took_over = cluster.wait_leader(FAILOVER_BOUND + SLACK, after_term=started["term"],
                                           among=[follower])
        text = wait_until(leader_shown(took_over["identity"]), 20,
                          f"the page to show the new leader {took_over['identity']}",
                          lambda: page.text())
        assert f"Term\n{took_over['term']}" in text
        assert page.errors == []
        shot = Path(os.environ.get("SCREENSHOT") or tmp_path / "status.png")
        page.screenshot(shot)
        assert shot.read_bytes().startswith(b"\x89PNG")
