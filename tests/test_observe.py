"""/metrics, /status and / on the health port of real workers (issue 14).

Two prefork workers of tests/apps/observe_app.py (the schedule on, an entry
every half second) each serve the health port; the tests scrape them before and
after the leader is killed, and parse every metric with prometheus_client's own
parser.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
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
ATOMIC_PUBLISH_LINE = ("celery-leader: ticks are published in the same atomic step as their "
                       "claim is cleared")
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


def started_with_ports(cluster: Cluster, count: int, env: dict[str, str] | None = None,
                       pool: str = "prefork") -> tuple[list[Worker], dict[str, int]]:
    ports: dict[str, int] = {}

    def own_port(name: str) -> dict[str, Any]:
        ports[name] = free_port()
        return {"env": {"LEADER_HEALTHZ_PORT": str(ports[name]), **(env or {})}}

    workers = cluster.start(count, pool, per_worker=own_port)
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
    # What README.md says the worker logs at its first tick (the broker is the
    # lease's Redis here); the ticks went through the herd path.
    assert ATOMIC_PUBLISH_LINE in leader.log()
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert ATOMIC_PUBLISH_LINE.removeprefix("celery-leader: ") in readme
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
        # The killed leader is a former leader, never a follower; the schedule is
        # dispatched by the leader the page shows.
        text = wait_until(lambda: (t := page.text()) and
                          f"dispatched by {took_over['identity']} (term {took_over['term']})"
                          in t and t, 20, "the page to show the new dispatcher",
                          lambda: page.text())
        assert f"{started['identity']}\tformer leader" in text, text
        assert page.errors == []
        shot = Path(os.environ.get("SCREENSHOT") or tmp_path / "status.png")
        page.screenshot(shot)
        assert shot.read_bytes().startswith(b"\x89PNG")


CARD = re.compile(r'id="(leader|term)"><span class="muted">[^<]*</span><b>([^<]*)</b>')
DISPATCHED = re.compile(r"(last )?dispatched by <b>([^<]*)</b> \(term (\d+)")
ROW = re.compile(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td[^>]*>([^<]*)</td>")


def page_contradictions(report: dict[str, Any], page: str, dead: str) -> list[str]:
    """What a /status reply and a page (each read once) say that the lease they
    show contradicts."""
    wrong = []
    election = report["election"]
    holder, term = election["leader"], election["term"]
    rows = {row.get("identity"): row for row in election["replicas"]}
    if holder in rows and (rows[holder]["role"], rows[holder]["term"]) != ("leader", term):
        wrong.append(f"/status: the leader's row {rows[holder]} under lease term {term}")
    if holder != dead and dead in rows and rows[dead]["role"] == "follower":
        wrong.append(f"/status: the killed leader shown as a follower {rows[dead]}")
    owner = report["schedule"].get("dispatcher") or {}
    if owner.get("leading") and (owner["identity"], owner["term"]) != (holder, term):
        wrong.append(f"/status: dispatcher {owner} under {holder} term {term}")
    cards = dict(CARD.findall(page))
    page_rows = {ident: (role.removesuffix(" (silent: gone?)"), row_term)
                 for ident, role, row_term in ROW.findall(page)}
    shown = cards.get("leader")
    if shown in page_rows and page_rows[shown] != ("leader", cards.get("term")):
        wrong.append(f"page: the leader's row {page_rows[shown]} under Term {cards.get('term')}")
    if shown != dead and page_rows.get(dead, ("",))[0] == "follower":
        wrong.append("page: the killed leader shown as a follower")
    for last, identity, owner_term in DISPATCHED.findall(page):
        if not last and (identity, owner_term) != (shown, cards.get("term")):
            wrong.append(f"page: dispatched by {identity} (term {owner_term}) while "
                         f"{shown} (term {cards.get('term')}) leads")
    return wrong


def test_the_page_right_after_a_failover_agrees_with_itself(cluster: Cluster) -> None:
    """Both survivors' /status and page, read every few ms from the kill of the
    leader until both show its successor dispatching: the replica table gives
    the new leader the lease's term and never calls the killed one a follower,
    and the schedule is never "dispatched by" anyone but the leader shown."""
    workers, ports = started_with_ports(cluster, 3, pool="threads")
    leader, started = cluster.wait_leader(BOOT)
    survivors = [w for w in workers if w is not leader]
    dead = started["identity"]
    for worker in survivors:  # every replica has recorded itself, the leader dispatches
        wait_until(lambda w=worker: len(json.loads(get(ports[w.name], "/status")[2])[
            "election"]["replicas"]) == 3 and (json.loads(get(ports[w.name], "/status")[2])[
                "schedule"]["dispatcher"] or {}).get("identity") == dead,
            20, f"{worker.name}'s page to list 3 replicas and the dispatcher", cluster.logs)
    leader.signal(signal.SIGKILL)
    leader.wait_exit(10)
    wrong: list[str] = []
    settled: dict[str, float] = {}
    samples = 0
    deadline = time.monotonic() + FAILOVER_BOUND + SLACK + 10
    while len(settled) < len(survivors) or time.monotonic() < max(settled.values()) + 1.0:
        assert time.monotonic() < deadline, (
            f"the survivors' pages did not settle on a new dispatching leader: {settled}\n"
            + cluster.logs())
        for worker in survivors:
            status, _, body = get(ports[worker.name], "/status")
            page_status, _, page = get(ports[worker.name], "/")
            assert status == page_status == 200, body
            report = json.loads(body)
            samples += 1
            wrong += [f"{worker.name}: {w}" for w in page_contradictions(report, page, dead)]
            owner = report["schedule"]["dispatcher"] or {}
            holder = report["election"]["leader"]
            if holder not in (None, dead) and owner.get("identity") == holder \
                    and owner.get("leading") and worker.name not in settled:
                settled[worker.name] = time.monotonic()
    assert not wrong, f"{len(wrong)} contradictions in {samples} reads:\n" + \
        "\n".join(dict.fromkeys(wrong))


def test_the_pages_links_keep_the_token_in_headless_chromium(cluster: Cluster) -> None:
    """Opened as /?token=..., the page's /status and /metrics links answer 200 in
    a real browser (which sends no Authorization header)."""
    if browser.chromium_binary() is None:
        pytest.skip("no chromium binary: `make test` installs Debian's chromium "
                    "(apt-get install -y chromium, as root); it could not here")
    token = "link-token"
    workers, ports = started_with_ports(cluster, 1, {"LEADER_HEALTHZ_TOKEN": token},
                                        pool="threads")
    cluster.wait_leader(BOOT)
    base = f"http://127.0.0.1:{ports[workers[0].name]}"
    with browser.chromium() as page:
        page.navigate(f"{base}/?token={token}")
        wait_until(lambda: "celery-leader election" in page.text(), 20, "the page to load",
                   lambda: page.text())
        links = page.call("Runtime.evaluate", returnByValue=True,
                          expression="Array.from(document.links).map(a => a.href)")
        hrefs = links["result"]["value"]
        assert page.errors == []  # the page itself (a JSON reply makes the browser ask
        # for /favicon.ico, which answers 401 without the token: not the page's doing)
        assert hrefs == [f"{base}/status?token={token}", f"{base}/metrics?token={token}"]
        for href, expected in zip(hrefs, ('"election"', "celery_leader_is_leader"),
                                  strict=True):
            page.navigate(href)
            text = wait_until(lambda want=expected: (t := page.text()) and (
                "unauthorized" in t or want in t) and t, 20, f"{href} to load",
                lambda: page.text())
            assert "unauthorized" not in text and expected in text, text[:300]
