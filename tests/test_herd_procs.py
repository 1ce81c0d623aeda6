"""A herd across a leader SIGKILL, with real ``celery beat -S leader`` replicas.

tests/apps/herd_app.py: HERD_N entries all due every 6 s, no worker (the
messages stay in the broker list).  The leading beat is SIGKILLed while a herd
is half in the broker (its batches of HERD_BATCH ticks are fenced), or
SIGSTOPped there past its lease and resumed once the successor leads (its next
batch is refused whole); the successor must send exactly the ticks the deposed
leader did not, as the catch-up policy says, and every fire time of every
entry is in the broker at most once.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_leader.schedule.herd import HERD_BATCH
from tests.sched_procs import Replicas
from tests.waiting import wait_until

N = 3000  # six batches: a fault seen after the first cannot be outrun by the pipeline
QUEUE = "celery"


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str, election_name: str) -> Iterator[Replicas]:
    procs = Replicas(tmp_path, redis_url, election_name, app="tests.apps.herd_app",
                     env={"HERD_N": str(N)})
    try:
        yield procs
    finally:
        procs.stop()
        print(procs.logs())  # shown by pytest only when the test failed


def herds(replicas: Replicas) -> dict[str, Counter[str]]:
    """Fire time -> how many messages each entry has for it."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for raw in replicas.client.lrange(QUEUE, 0, -1):
        headers = json.loads(raw)["headers"]
        out[headers["leader_fire_time"]][headers["leader_tick"].rsplit("@", 1)[0]] += 1
    return out


def terms_of(replicas: Replicas, fire: str) -> Counter[int]:
    terms: Counter[int] = Counter()
    for raw in replicas.client.lrange(QUEUE, 0, -1):
        headers = json.loads(raw)["headers"]
        if headers["leader_fire_time"] == fire:
            terms[int(headers["leader_term"])] += 1
    return terms


@pytest.mark.integration
@pytest.mark.parametrize(("fault", "policy"), [
    ("kill", "all"), ("kill", "latest"), ("kill", "none"),
    ("stop", "all"), ("stop", "latest"), ("stop", "none")])
def test_a_leader_lost_mid_herd_each_fire_time_is_sent_at_most_once(
        replicas: Replicas, election_name: str, fault: str, policy: str) -> None:
    replicas.env.update(LEADER_CATCH_UP=policy)
    replicas.beat()
    replicas.beat()
    election = f"{election_name}-beat"
    leader, term = replicas.wait_leader(election, timeout=60)
    # Lose the leader while a herd is partly in the broker (between batches).
    client = replicas.client
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "never caught a herd in flight\n" + replicas.logs()
        if client.llen(QUEUE) % N:
            leader.signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            break
        time.sleep(0.001)
    if fault == "kill":
        leader.popen.wait(10)
        replicas.retired.add(leader.pid)
    partial = {fire: len(entries) for fire, entries in herds(replicas).items()
               if len(entries) < N}
    assert len(partial) == 1, partial
    (killed_fire, killed_count), = partial.items()
    assert 0 < killed_count < N
    successor, term2 = replicas.wait_leader(election, timeout=30, not_pid=leader.pid,
                                            after_term=term)
    if fault == "stop":
        leader.signal(signal.SIGCONT)  # resumes mid-herd, deposed: its next batch is refused
        wait_until(lambda: f"term {term} is over; not dispatching a batch" in leader.log(),
                   20, "the deposed leader's batch refused", replicas.logs)

    def a_later_herd_is_complete() -> bool:
        return any(fire > killed_fire and len(entries) == N
                   for fire, entries in herds(replicas).items())

    wait_until(a_later_herd_is_complete, 30, "the successor's first whole herd",
               replicas.logs)
    for proc in (successor, leader):
        if proc.alive():
            proc.signal(signal.SIGSTOP)  # nothing more while we count
    sent = herds(replicas)
    duplicates = {fire: [e for e, n in entries.items() if n > 1]
                  for fire, entries in sent.items() if any(n > 1 for n in entries.values())}
    assert not duplicates, duplicates
    whole = sorted(fire for fire, entries in sent.items() if len(entries) == N)
    killed_terms = terms_of(replicas, killed_fire)
    # The lost leader's part: what was in the broker when the fault was decided on,
    # plus the batches Redis still ran inside its term: those it had already sent
    # (pipelined, herd.py) and those it sent before the signal landed.  Whole
    # batches only: a batch is applied whole or not at all.
    lost_part = killed_terms[term]
    assert killed_count <= lost_part, (killed_count, killed_terms)
    assert lost_part % HERD_BATCH == 0 or lost_part == N, (killed_count, killed_terms)
    if policy == "none":
        # Missed by the time the successor began: not sent; the dead leader's part stays.
        assert len(sent[killed_fire]) == lost_part, (killed_count, killed_terms)
        assert set(killed_terms) == {term}
    else:
        # "all" and "latest": the successor sends exactly the part the batches did not.
        assert len(sent[killed_fire]) == N, (killed_count, killed_terms)
        assert set(killed_terms) == ({term, term2} if lost_part < N else {term}), killed_terms
    # Every other fire time is whole (the herd after the last one counted may be in flight).
    last_whole = whole[-1]
    assert all(len(entries) == N for fire, entries in sent.items()
               if fire != killed_fire and fire <= last_whole), \
        {fire: len(entries) for fire, entries in sent.items()}
