"""Integration: real ``celery worker`` processes (prefork and solo) on a real Redis broker.

Everything is observed through what the processes record themselves
(tests/apps/leader_app.py: every leadership signal, every leader-only task start
and finish, with the pid and CLOCK_MONOTONIC time) plus the CLI and the HTTP
endpoints a deployment would use.  Timings are the app's short defaults:
lease 2.0 s, renew deadline 1.4 s, retry period 0.3 s.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_leader.embedded import free_port
from tests.celery_procs import FAILOVER_BOUND, LEASE, Cluster, Worker, stopped_at_end, wait_until

pytestmark = pytest.mark.integration

# Scheduling noise on a loaded 2-core machine, on top of the fail-over bound.
SLACK = 1.0
BOOT = 45.0  # generous: several interpreters importing Celery on 2 cores


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str,
            election_name: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, redis_url, election_name)
    with stopped_at_end(request, made, lambda: f"worker output ({tmp_path}):\n"
                        f"{made.logs()}\n{made.events.dump()}"):
        yield made



def boot(cluster: Cluster, count: int, pool: str = "prefork",
         **kwargs: Any) -> tuple[list[Worker], Worker, dict[str, Any]]:
    """Start ``count`` replicas in parallel; wait until all are ready and one leads."""
    workers = cluster.start(count, pool, **kwargs)
    cluster.wait_ready(workers, BOOT)
    leader, started = cluster.wait_leader(BOOT)
    return workers, leader, started


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def leader_status(cluster: Cluster) -> tuple[int, dict[str, Any]]:
    result = cluster.celery("leader", "status", "--json")
    assert result.stdout.strip(), f"no output: {result.stderr}"
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- 1. crash fail-over


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_one_leader_among_three_and_sigkill_fails_over_in_bound(cluster: Cluster,
                                                                pool: str) -> None:
    workers, leader, started = boot(cluster, 3, pool)
    events = cluster.events
    pids = {w.pid for w in workers}
    # Every replica has observed the holder: all three are contending.
    events.wait_for(lambda evs: {e["pid"] for e in evs if e["kind"] == "new_leader"} >= pids,
                    10, "new_leader from every replica")
    assert len(events.of("started_leading")) == 1
    assert started["identity"].startswith(f"{leader.name}@")
    assert {(e["identity"], e["term"]) for e in events.of("new_leader")} == {
        (started["identity"], started["term"])}

    killed_at = leader.signal(signal.SIGKILL)
    assert leader.wait_exit(10) == -signal.SIGKILL
    survivors = [w for w in workers if w is not leader]
    successor, took_over = cluster.wait_leader(FAILOVER_BOUND + SLACK + 10,
                                               after_term=started["term"], among=survivors)
    failover = took_over["at"] - killed_at
    print(f"{pool}: fail-over in {failover:.2f}s (bound {FAILOVER_BOUND:.2f}s + {SLACK}s)")
    assert failover <= FAILOVER_BOUND + SLACK, (
        f"fail-over took {failover:.2f}s; bound is lease + 2.2 x retry = {FAILOVER_BOUND:.2f}s "
        f"+ {SLACK}s slack")
    # Exactly one successor, and the other survivor follows it.
    assert len(events.of("started_leading")) == 2
    other = next(w for w in survivors if w is not successor)
    events.wait_kind("new_leader", 5, where=lambda e: e["pid"] == other.pid
                     and e["identity"] == took_over["identity"], what="the other survivor "
                     "to observe the successor")
    assert len(events.of("started_leading")) == 2


# ---------------------------------------------------------------- 2. graceful hand-over


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_sigterm_hands_over_only_after_the_running_leader_task_finished(cluster: Cluster,
                                                                        pool: str) -> None:
    workers, leader, started = boot(cluster, 2, pool)
    events = cluster.events
    follower = next(w for w in workers if w is not leader)
    [task_id] = cluster.send({"task": "leader_work", "args": ["slow", 3.0]})
    [start] = events.wait_kind("task_start", 15, where=lambda e: e["label"] == "slow")
    assert start["task_id"] == task_id
    assert start["term"] == started["term"] and start["leading"] is True
    if pool == "prefork":
        assert start["pid"] not in {w.pid for w in workers}, "expected a pool child"
    else:
        assert start["pid"] == leader.pid

    leader.signal(signal.SIGTERM)
    _, took_over = cluster.wait_leader(3.0 + 15, after_term=started["term"], among=[follower])
    assert leader.wait_exit(15) == 0
    [done] = events.of("task_done", label="slow")
    assert done["term"] == started["term"]
    # No other replica led before the task finished: the lease was kept while the pool drained.
    assert done["at"] < took_over["at"]
    [stopped] = events.of("stopped_leading", pid=leader.pid)
    assert stopped["reason"] == "released" and stopped["term"] == started["term"]
    assert done["at"] <= stopped["at"] <= took_over["at"]
    # A release hands over at once, without waiting out the lease.
    assert took_over["at"] - stopped["at"] < LEASE
    assert len(events.of("started_leading")) == 2
    # Not run twice: it ran once, and nothing is left in the broker to deliver it again.
    assert len(events.of("task_start", label="slow")) == 1
    assert events.backlog() == 0


# ---------------------------------------------------------------- 3. tasks across a crash


def test_fifty_leader_tasks_complete_exactly_once_across_a_leader_sigkill(
        cluster: Cluster) -> None:
    workers, leader, started = boot(cluster, 2, "prefork")
    events = cluster.events
    labels = {f"t{i}" for i in range(50)}
    ids = cluster.send({"task": "leader_work", "args": ["t{i}", 0.5], "count": 50})
    assert len(set(ids)) == 50
    # Midway (some finished, most not), and while both pool processes are inside a
    # task: then the worker holds its full prefetch and has no fetch in flight.  A
    # SIGKILL between kombu's BRPOP and its write to the ``unacked`` hash loses that
    # message in the broker (celery/kombu#305), which no leader-side fencing can
    # bring back; this test is about what the leader does, not that window.
    term = started["term"]

    def both_busy(all_events: list[dict[str, Any]]) -> bool:
        begun = {e["task_id"] for e in all_events if e["kind"] == "task_start"
                 and e.get("term") == term}
        ended = {e["task_id"] for e in all_events if e["kind"] == "task_done"
                 and e.get("term") == term}
        return len(ended) >= 10 and len(begun - ended) == 2

    events.wait_for(both_busy, 40,
                    "10 tasks done and two running on the leader")
    killed_at = leader.signal(signal.SIGKILL)
    assert leader.wait_exit(10) == -signal.SIGKILL
    follower = next(w for w in workers if w is not leader)
    _, took_over = cluster.wait_leader(FAILOVER_BOUND + SLACK + 10,
                                       after_term=started["term"], among=[follower])
    # Messages the killed worker held come back after the visibility timeout (6 s);
    # wait until every task finished and nothing is left that could be delivered again.
    wait_until(lambda: {e["label"] for e in events.of("task_done")} >= labels
               and events.backlog() == 0, 40, "all 50 tasks done and the broker drained",
               events.dump)

    done = events.of("task_done")
    counts = Counter(e["label"] for e in done)
    assert set(counts) == labels
    assert [label for label, n in counts.items() if n != 1] == [], "completed more than once"
    leaderships = {e["term"]: e for e in events.of("started_leading")}
    assert sorted(leaderships) == [started["term"], took_over["term"]]
    terms_used = Counter(e["term"] for e in done)
    assert terms_used[started["term"]] >= 10 and terms_used[took_over["term"]] >= 1, terms_used
    starts = {(e["task_id"], e["term"]): e for e in events.of("task_start")}
    worker_pids = {w.pid for w in workers}
    for finish in done:
        begin = starts[(finish["task_id"], finish["term"])]
        assert begin["leading"] is True, begin
        assert begin["pid"] not in worker_pids, "leader-only tasks run in pool children"
        # Only while its worker led: after that leadership began, before the next began.
        assert leaderships[finish["term"]]["at"] <= begin["at"], (begin, finish)
        if finish["term"] == started["term"]:
            assert finish["at"] < took_over["at"], (finish, took_over)
            assert begin["at"] < killed_at
    # Every run was claimed in Redis under its term (the fencing made in the pool child).
    claims = [events.client.get(f"celery-leader:{{{cluster.election}}}:task:{task_id}")
              for task_id in ids]
    assert claims == [b"done"] * 50
    # Runs cut off by the kill (started, never finished) were run again by the successor.
    for begin in events.of("task_start", term=started["term"]):
        if not any(f["task_id"] == begin["task_id"] and f["term"] == started["term"]
                   for f in done):
            assert counts[begin["label"]] == 1
            assert any(f["task_id"] == begin["task_id"] and f["term"] == took_over["term"]
                       for f in done)


# ---------------------------------------------------------------- 4. invalid settings


def _without_root_warning(stderr: str) -> list[str]:
    """stderr lines, minus Celery's own SecurityWarning block when tests run as root."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if any("SecurityWarning" in line for line in lines):
        first = next(i for i, line in enumerate(lines) if "SecurityWarning" in line)
        # The block ends with the source line warnings shows: the call that warned
        # (Celery 5.3: warnings.warn(SecurityWarning(...; later: its helper's call).
        last = next(i for i, line in enumerate(lines) if i > first and (
            "_warn_or_raise_security_error" in line or "warnings.warn(SecurityWarning" in line))
        lines = lines[:first] + lines[last + 1:]
    return lines


@pytest.mark.parametrize(("app", "env", "args", "expected"), [
    pytest.param("tests.apps.leader_app", {"LEADER_LEASE": "1.0"}, [],
                 "leader_lease_duration (1.0) must be greater than leader_renew_deadline (1.4)",
                 id="lease-not-above-renew-deadline"),
    pytest.param("tests.apps.config_app",
                 {"CONFIG_JSON": json.dumps({"CELERY_LEADER_RETRY_PERIOD": "often"})}, [],
                 "leader_retry_period must be a number of seconds, got 'often'",
                 id="django-namespace-wrong-type"),
    pytest.param("tests.apps.config_app",
                 {"CONFIG_JSON": json.dumps({"CELERY_LEADER_REDIS_URL": "http://127.0.0.1:1/"})},
                 [], "leader_redis_url has an unknown scheme in 'http://127.0.0.1:1/'",
                 id="unknown-url-scheme"),
    pytest.param("tests.apps.leader_app", {}, ["--leader-name", "a{b}"],
                 "--leader-name must not contain braces, got 'a{b}'", id="bad-cli-flag"),
])
def test_invalid_setting_stops_the_worker_with_one_clear_line(
        cluster: Cluster, app: str, env: dict[str, str], args: list[str], expected: str) -> None:
    cluster.app = app
    [worker] = cluster.start(1, "prefork", env=env, args=args, split_stderr=True)
    code = worker.wait_exit(30)
    assert worker.stderr_path is not None
    stderr = worker.stderr_path.read_text()
    assert code == 2, worker.log()
    lines = _without_root_warning(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"celery-leader: configuration error: {expected}"), stderr
    assert "Traceback" not in worker.log()
    assert cluster.events.all() == []


def test_a_healthz_port_in_use_stops_the_worker_with_one_clear_line(cluster: Cluster) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        [worker] = cluster.start(1, "prefork", env={"LEADER_HEALTHZ_PORT": str(port)},
                                 split_stderr=True)
        code = worker.wait_exit(30)
    assert worker.stderr_path is not None
    stderr = worker.stderr_path.read_text()
    assert code == 2, worker.log()
    lines = _without_root_warning(stderr)
    assert lines == [f"celery-leader: configuration error: leader_healthz_port {port} cannot "
                     f"be served on 127.0.0.1: Address already in use"], stderr
    assert "Traceback" not in worker.log()
    assert cluster.events.of("started_leading") == []


# ---------------------------------------------------------------- 5. CLI and HTTP


def test_status_cli_and_http_endpoints_tell_the_truth_across_a_failover(
        cluster: Cluster) -> None:
    code, info = leader_status(cluster)
    assert code == 1 and info["leader"] is None and info["name"] == cluster.election

    ports: dict[str, int] = {}

    def own_port(name: str) -> dict[str, Any]:
        ports[name] = free_port()
        return {"env": {"LEADER_HEALTHZ_PORT": str(ports[name])}}

    workers, leader, started = boot(cluster, 3, "prefork", per_worker=own_port)
    term, identity = started["term"], started["identity"]
    _assert_http_view(workers, ports, identity, term)
    code, info = leader_status(cluster)
    assert code == 0, info
    assert (info["leader"], info["term"], info["transitions"]) == (identity, term, 0)
    assert info["lease_duration"] == LEASE and 0 < info["lease_remaining"] <= LEASE
    assert info["key"] == f"celery-leader:{{{cluster.election}}}:lease"

    leader.signal(signal.SIGKILL)
    leader.wait_exit(10)
    survivors = [w for w in workers if w is not leader]
    successor, took_over = cluster.wait_leader(FAILOVER_BOUND + SLACK + 10, after_term=term,
                                               among=survivors)
    assert took_over["term"] > term
    _assert_http_view(survivors, ports, took_over["identity"], took_over["term"])
    with pytest.raises(OSError):
        http_get(ports[leader.name], "/healthz")
    code, info = leader_status(cluster)
    assert code == 0, info
    assert (info["leader"], info["term"], info["transitions"]) == (
        took_over["identity"], took_over["term"], 1)
    assert successor.pid == took_over["pid"]


def _assert_http_view(workers: list[Worker], ports: dict[str, int], identity: str,
                      term: int) -> None:
    """Every replica's /leader names ``identity`` and ``term``; only the leader says it leads."""

    def view(worker: Worker) -> dict[str, Any] | None:
        status, body = http_get(ports[worker.name], "/leader")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        return data if (data["leader"], data["leader_term"]) == (identity, term) else None

    for worker in workers:
        data = wait_until(lambda w=worker: view(w), 5, f"{worker.name}'s /leader to show "
                          f"{identity} (term {term})")
        leads = data["identity"] == identity
        assert data["identity"].startswith(f"{worker.name}@")
        assert (data["is_leader"], data["term"]) == ((True, term) if leads else (False, 0)), data
        assert http_get(ports[worker.name], "/healthz") == (200, "ok\n")
    assert sum(data["identity"] == identity for data in
               (json.loads(http_get(ports[w.name], "/leader")[1]) for w in workers)) == 1


# ---------------------------------------------------------------- step-down


def test_step_down_command_hands_leadership_to_another_replica(cluster: Cluster) -> None:
    _, leader, started = boot(cluster, 2, "solo")
    asked_at = time.monotonic()
    result = cluster.celery("leader", "step-down", "--timeout", "30")
    # It asks the lease holder's worker alone and returns on its reply, not
    # after waiting the whole --timeout for other workers.
    assert time.monotonic() - asked_at < 20
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == (f"{started['identity']} is stepping down "
                                     f"(term {started['term']})")
    events = cluster.events
    [stopped] = events.wait_kind("stopped_leading", 10, where=lambda e: e["pid"] == leader.pid)
    assert stopped["reason"] == "released"
    # The worker's own line says the hand-over was asked for.
    assert (f"{started['identity']} stopped leading (term {started['term']}): released "
            "(step-down requested)") in leader.log()
    [next_start] = events.wait_kind("started_leading", 10,
                                    where=lambda e: e["term"] > started["term"])
    assert next_start["pid"] != leader.pid, (
        "the leader that stepped down took the lease straight back")
    assert next_start["at"] >= stopped["at"]
    code, info = leader_status(cluster)
    assert code == 0 and info["leader"] == next_start["identity"]
    # Nobody consumes the leader queue through kombu, so a hand-over never
    # bounces an in-flight fetch back with kombu's "No consumers" warning.
    assert "Requeuing undeliverable message" not in cluster.logs()


# ---------------------------------------------------------------- is_leader() and policies


def test_leadership_in_pool_children_and_on_follower_policies(cluster: Cluster) -> None:
    cluster.app = "tests.apps.policy_app"
    workers, leader, started = boot(
        cluster, 2, "prefork", per_worker=lambda name: {"args": ["-Q", f"celery,q.{name}"]})
    follower = next(w for w in workers if w is not leader)
    on_leader = {"queue": f"q.{leader.name}"}
    on_follower = {"queue": f"q.{follower.name}"}
    ids = cluster.send(
        {"task": "probe", "args": ["probe-leader"], "options": on_leader},
        {"task": "probe", "args": ["probe-follower"], "options": on_follower},
        {"task": "leader_skip", "args": ["skip-leader"], "options": on_leader},
        {"task": "leader_skip", "args": ["skip-follower"], "options": on_follower},
        {"task": "leader_raise", "args": ["raise-follower"], "options": on_follower},
    )
    events = cluster.events
    events.wait_for(lambda evs: {e["task_id"] for e in evs if e["kind"] == "task_postrun"}
                    >= set(ids), 20, "every task to finish")
    postrun = {e["task_id"]: e for e in events.of("task_postrun")}
    worker_pids = {w.pid for w in workers}

    probes = {e["label"]: e for e in events.of("probe")}
    assert probes["probe-leader"]["hostname"].startswith(f"{leader.name}@")
    assert probes["probe-leader"]["pid"] not in worker_pids, "expected a pool child"
    assert (probes["probe-leader"]["leading"], probes["probe-leader"]["term"]) == (
        True, started["term"])
    assert probes["probe-follower"]["hostname"].startswith(f"{follower.name}@")
    assert (probes["probe-follower"]["leading"], probes["probe-follower"]["term"]) == (False, 0)

    # On the leader a leader-only task runs, with its term.
    [ran] = events.of("task_start", label="skip-leader")
    assert (ran["leading"], ran["term"]) == (True, started["term"])
    assert postrun[ids[2]]["state"] == "SUCCESS"
    # On a follower: "skip" ends it as ignored, "raise" fails it with NotLeaderError,
    # and neither runs the body.
    assert events.of("task_start", label="skip-follower") == []
    assert postrun[ids[3]]["state"] == "IGNORED"
    assert events.of("task_start", label="raise-follower") == []
    assert postrun[ids[4]]["state"] == "FAILURE"
    assert "NotLeaderError" in postrun[ids[4]]["retval"]
    assert "runs only on the leader" in postrun[ids[4]]["retval"]


def test_app_task_above_leader_only_runs_each_call_once_on_the_leader(cluster: Cluster) -> None:
    """``@app.task`` above ``@leader_only`` (the other order from the README's) is
    a leader-only task too: routed to the leader queue, and a message forced onto
    a follower is requeued for the leader, never "succeeded" without running."""
    cluster.app = "tests.apps.policy_app"
    workers, leader, started = boot(
        cluster, 2, "prefork", per_worker=lambda name: {"args": ["-Q", f"celery,q.{name}"]})
    follower = next(w for w in workers if w is not leader)
    ids = cluster.send(
        {"task": "reversed_work", "args": ["routed-{i}"], "count": 10},
        {"task": "reversed_work", "args": ["forced-{i}"], "count": 4,
         "options": {"queue": f"q.{follower.name}"}},
    )
    events = cluster.events
    events.wait_for(lambda evs: {e["task_id"] for e in evs if e["kind"] == "task_postrun"
                                 and e["state"] == "SUCCESS"} >= set(ids),
                    30, "every reversed_work call to succeed")
    starts = events.of("task_start")
    labels = Counter(e["label"] for e in starts)
    assert labels == Counter([f"routed-{i}" for i in range(10)]
                             + [f"forced-{i}" for i in range(4)]), labels
    assert all((e["leading"], e["term"]) == (True, started["term"]) for e in starts), starts
    # The follower ran none of them: it requeued the four sent to it.
    ran_on = {e["hostname"] for e in events.of("task_postrun")
              if e["task_id"] in ids and e["state"] == "SUCCESS"}
    assert ran_on and all(host.startswith(f"{leader.name}@") for host in ran_on), ran_on
