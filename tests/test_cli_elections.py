"""The standalone beat's election seen and steered from the command line, with
real ``celery beat -S leader`` replicas and a real ``celery worker`` of
tests.apps.beat_app (workers with ``leader_beat = False``, as the README says).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from celery_leader.elections import StepDownListener, StepDownRequests, election_names
from celery_leader.redislock import RedisLock
from tests.sched_procs import KEY_PREFIX, ROOT, Replicas, wait_until

BOOT = 60.0  # several interpreters importing Celery on a loaded 2-core machine


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str, election_name: str) -> Iterator[Replicas]:
    replicas = Replicas(tmp_path, redis_url, election_name, env={"LEADER_BEAT": "0"})
    try:
        yield replicas
    finally:
        replicas.stop()


def cli_json(replicas: Replicas, *args: str, leader_name: str | None = None) -> tuple[int, Any]:
    """``celery leader <args> --json``; ``leader_name`` runs it as another app would."""
    env = replicas.base_env({"LEADER_NAME": leader_name} if leader_name else None)
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.beat_app",
                             "leader", *args, "--json"], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.stdout.strip(), f"no output (exit {result.returncode}): {result.stderr}"
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_standalone_beat_election_shown_by_name_and_all_and_stepped_down(
        replicas: Replicas) -> None:
    name, beat_name = replicas.name, f"{replicas.name}-beat"
    beats = [replicas.beat(), replicas.beat()]
    replicas.worker()

    # The banner names the election beat really joins, not the workers'.
    for beat in beats:
        wait_until(lambda b=beat: "celery-leader election" in b.log(), BOOT,
                   f"{beat.name}'s banner", replicas.logs)
        banner = next(line for line in beat.log().splitlines()
                      if "celery-leader election" in line)
        assert f"celery-leader election '{beat_name}' (standalone beat) as beat@" in banner, \
            banner

    beat_leader, beat_term = replicas.wait_leader(beat_name, BOOT)
    worker_leader, worker_term = replicas.wait_leader(name, BOOT)
    beat_holder = replicas.lease(beat_name)["holderIdentity"]  # type: ignore[index]
    worker_holder = replicas.lease(name)["holderIdentity"]  # type: ignore[index]

    code, info = cli_json(replicas, "status", "--name", beat_name)
    assert code == 0, info
    assert (info["name"], info["role"], info["leader"], info["term"]) == (
        beat_name, "beat", beat_holder, beat_term)
    # The beats' keys sit in the schedule's hash slot.
    assert info["key"] == f"{KEY_PREFIX}:{{{name}}}:{beat_name}:lease"

    # --all lists both elections.  Run as an app with another leader_name, the
    # roles can only come from what each election's leader recorded.
    for key in (f"{KEY_PREFIX}:{{{name}}}:role", f"{KEY_PREFIX}:{{{name}}}:{beat_name}:role"):
        wait_until(lambda k=key: replicas.client.exists(k), 10, f"{key} to be written")
    code, rows = cli_json(replicas, "status", "--all", leader_name="some-other-app")
    assert code == 0, rows
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == {name, beat_name}, rows
    assert (by_name[name]["role"], by_name[name]["leader"], by_name[name]["term"]) == (
        "workers", worker_holder, worker_term)
    assert (by_name[beat_name]["role"], by_name[beat_name]["leader"],
            by_name[beat_name]["term"]) == ("beat", beat_holder, beat_term)
    table = replicas.celery("leader", "status", "--all")
    assert table.returncode == 0, table.stderr
    [beat_row] = [line for line in table.stdout.splitlines() if line.startswith(beat_name)]
    assert beat_row.split()[:4] == [beat_name, "beat", beat_holder, str(beat_term)], table.stdout

    # step-down reaches the beat leader (no control consumer there) and only it.
    result = replicas.celery("leader", "step-down", "--name", beat_name, "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{beat_holder} is stepping down (term {beat_term})"
    successor, _ = replicas.wait_leader(beat_name, 20, not_pid=beat_leader.pid,
                                        after_term=beat_term)
    assert successor in beats and successor is not beat_leader
    assert "step-down requested from the command line" in beat_leader.log()
    assert replicas.leader(name) == (worker_leader, worker_term)
    assert beat_leader.alive(), "stepping down must not stop the process"


@pytest.mark.integration
def test_step_down_of_an_election_without_leader_says_so(replicas: Replicas) -> None:
    result = replicas.celery("leader", "step-down", "--name", "nobody-here")
    assert (result.returncode, result.stdout.strip()) == (
        1, "no leader for election 'nobody-here'"), result.stderr
    result = replicas.celery("leader", "status", "--all")
    assert (result.returncode, result.stdout.strip()) == (
        1, f"no elections under key prefix '{KEY_PREFIX}'"), result.stderr
    result = replicas.celery("leader", "status", "--all", "--name", "x")
    assert result.returncode == 2 and "give --name or --all, not both" in result.stderr


def test_a_step_down_request_is_taken_only_by_the_leader_of_its_term(
        redis_client: redis.Redis, election_name: str) -> None:
    """The Redis path on its own: a listener whose elector leads in term 7."""
    lock = RedisLock(redis_client, name=election_name, identity="beat-a")
    stepped: list[int] = []
    elector = SimpleNamespace(term=7, step_down=lambda: stepped.append(elector.term))
    listener = StepDownListener(elector, lock, poll=60.0)  # type: ignore[arg-type]
    requests = StepDownRequests(lock)
    listener.start()
    try:
        asked_at = time.monotonic()
        assert requests.request(7, "beat-a", timeout=10.0)
        assert time.monotonic() - asked_at < 5, "taken on the pub/sub wake-up, not the poll"
        assert stepped == [7] and not redis_client.exists(requests.key)
        # A predecessor's request never deposes this leadership; it is withdrawn.
        assert not requests.request(6, "beat-old", timeout=0.5)
        elector.term = 0  # not leading: nothing to hand over
        assert not requests.request(7, "beat-a", timeout=0.5)
        assert stepped == [7] and not redis_client.exists(requests.key)
    finally:
        listener.stop()


def test_elections_are_found_by_lease_or_counter_and_nothing_else(
        redis_client: redis.Redis) -> None:
    redis_client.set("celery-leader:{a}:lease", "{}")
    redis_client.hset("celery-leader:{b}:counter", "version", 3)  # no leader right now
    redis_client.set("celery-leader:{c}:job:lease", "1")  # a claim named "job:lease"
    redis_client.hset("celery-leader:{c}:schedule:state", "x", "{}")
    redis_client.set("ha*:{d}:lease", "{}")  # another prefix, with a glob character
    assert election_names(redis_client, "celery-leader") == ["a", "b"]
    assert election_names(redis_client, "ha*") == ["d"]
    assert election_names(redis_client, "ha") == []
