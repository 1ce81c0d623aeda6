"""The leader-gated schedule under faults, with real processes and a real Redis.

Three replicas of tests.apps.beat_app (a ``cron("* * * * * *")`` entry whose task
records its ``leader_fire_time`` in ``test:ticks``) lose their leader to SIGKILL,
to SIGSTOP past the lease (then SIGCONT), and to SIGTERM.  Fire times are
compared, never arrival counts:

- ``LEADER_CATCH_UP=all``: every second from the first recorded fire time to
  the end of the window is recorded exactly once;
- ``latest`` / ``none``: no fire time is recorded twice (``none``: the seconds
  missed during the fail-over stay missing);
- always: ordered by fire time, the dispatching terms never decrease (a
  deposed leader never dispatched a tick after its successor's first one).

Faults are injected at a quiet moment (the current second's tick recorded, the
next one >= 0.3 s away), so no tick message is in flight in a killed process:
a gap can only come from the scheduler, not from a lost broker message.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.sched_procs import LEASE, Analysis, Proc, Replicas, analyse, wait_until

pytestmark = pytest.mark.integration

STEADY = 2.5  # seconds of normal operation after each fail-over



def fail_over(r: Replicas, election: str, fault: str, log: list[str]) -> Proc:
    """Inject ``fault`` into the current leader; return the leader that follows it."""
    old, term = r.wait_leader(election)
    start = time.monotonic()
    if fault == "kill":
        old.signal(signal.SIGKILL)
    elif fault == "stop":
        old.signal(signal.SIGSTOP)
    elif fault == "term":
        old.signal(signal.SIGTERM)
    new, new_term = r.wait_leader(election, timeout=20, not_pid=old.pid, after_term=term)
    took = time.monotonic() - start
    if fault == "stop":
        # Keep it paused well past its lease, then let it run into the fence.
        time.sleep(max(0.0, start + LEASE + 1.5 - time.monotonic()))
        old.signal(signal.SIGCONT)
    elif fault == "term":
        wait_until(lambda: not old.alive(), 20, f"{old.describe()} to exit after SIGTERM",
                   r.logs)
    log.append(f"{fault} {old.name} (term {term}) -> {new.name} (term {new_term}) "
               f"after {took:.2f}s")
    r.wait_ticks(2, term=term, timeout=15)  # the new term dispatches
    return new


def run_sequence(r: Replicas, election: str, faults: list[str], window: float,
                 contiguous: bool) -> Analysis:
    r.wait_ticks(3, timeout=60)
    log: list[str] = []
    for fault in faults:
        time.sleep(STEADY)  # a measurement window of normal operation
        r.wait_quiet(contiguous)
        fail_over(r, election, fault, log)
    first = min(r.seconds())
    time.sleep(max(0.0, first + window - time.time()))
    end = int(time.time())
    # Ticks up to ``end`` were all dispatched before ``end + 1`` was; give the
    # consumers one more second to run them (SIGCONTed ones included).
    wait_until(lambda: max(r.seconds()) >= end + 1, 15, f"the tick of {end + 1}", r.logs)
    time.sleep(1.0)
    ticks = r.ticks()
    analysis = analyse(ticks, until=end)
    # Ordered by fire time, the terms never go back: no deposed leader dispatched
    # a tick after its successor took over.
    by_fire = sorted((t for t in ticks if t["label"] == "every-second"),
                     key=lambda t: (t["fire_time"], t["term"]))
    terms = [int(t["term"]) for t in by_fire]
    assert terms == sorted(terms), [(t["fire_time"], t["term"]) for t in by_fire]
    assert len({t["task_id"] for t in by_fire}) == len(by_fire), "a task id was reused"
    print(f"{analysis.summary()}; faults: {'; '.join(log)}")
    return analysis


def start_workers(r: Replicas, policy: str) -> None:
    r.env.update(LEADER_CATCH_UP=policy)
    for _ in range(3):
        r.worker()
    r.wait_workers_ready()


# ---------------------------------------------------------------- worker-embedded


def test_worker_replicas_catch_up_all_every_second_exactly_once(
        replicas: Replicas, election_name: str) -> None:
    start_workers(replicas, "all")
    analysis = run_sequence(replicas, election_name, ["kill", "stop", "term"],
                                 window=30, contiguous=True)
    assert analysis.last - analysis.first + 1 >= 30, analysis.summary()
    assert not analysis.duplicates, analysis.summary()
    assert not analysis.missing, analysis.summary()
    assert analysis.recorded == analysis.expected
    assert len(analysis.terms) >= 4, analysis.summary()  # initial + one per fault


@pytest.mark.parametrize("policy", ["latest", "none"])
def test_worker_replicas_without_full_catch_up_never_duplicate(
        replicas: Replicas, election_name: str, policy: str) -> None:
    start_workers(replicas, policy)
    analysis = run_sequence(replicas, election_name, ["kill"], window=12,
                                 contiguous=False)
    assert analysis.last - analysis.first + 1 >= 12, analysis.summary()
    assert not analysis.duplicates, analysis.summary()
    assert len(analysis.terms) >= 2, analysis.summary()
    if policy == "none":
        # The lease outlives the killed leader by > 1 s, so at least the tick
        # after the kill was missed, and "none" never sends a missed tick.
        assert analysis.missing, analysis.summary()


# ---------------------------------------------------------------- standalone beat


def test_standalone_beat_replicas_catch_up_all_every_second_exactly_once(
        replicas: Replicas, election_name: str) -> None:
    replicas.env.update(LEADER_CATCH_UP="all")
    consumer = replicas.worker("--no-leader-beat")
    for _ in range(3):
        replicas.beat()
    replicas.wait_workers_ready()
    beat_election = f"{election_name}-beat"
    analysis = run_sequence(replicas, beat_election, ["kill", "stop", "term"],
                                 window=30, contiguous=True)
    assert analysis.last - analysis.first + 1 >= 30, analysis.summary()
    assert not analysis.duplicates, analysis.summary()
    assert not analysis.missing, analysis.summary()
    assert len(analysis.terms) >= 4, analysis.summary()
    # Only beats dispatched: the consumer worker never led the beat election, and
    # its own election (the workers') dispatched nothing.
    assert consumer.alive()
    assert {int(t["pid"]) for t in replicas.ticks()} == {consumer.pid}
    state = json.loads(replicas.client.hget(
        f"celery-leader:{{{election_name}}}:schedule:state", "every-second") or b"{}")
    assert state["election"] == beat_election, state
