"""One schedule, two ways to dispatch it: standalone ``celery beat -S leader`` and
workers with ``leader_beat = True``, with real processes and a real Redis.

Both modes share one progress (state, pending ticks, first-seen) and one
"dispatcher" claim naming the leadership that owns the schedule, so:

- switching beat -> workers -> beat sends every fire time once (``catch_up =
  "all"``: none twice, none dropped);
- while both run, exactly one of them dispatches; the other logs one line
  naming the setting to change, and takes over when the owner's leadership ends.

Fire times are compared by the ``leader_fire_time`` header, never by arrival
counts.  Every process is stopped by PID in the fixture's teardown.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sched_procs import Analysis, Proc, Replicas, analyse, wait_until

pytestmark = pytest.mark.integration

STEADY = 4  # whole seconds of ticks to observe in each phase
REFUSAL = "not dispatching the schedule"  # the refusing side's one log line


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str, election_name: str) -> Iterator[Replicas]:
    procs = Replicas(tmp_path, redis_url, election_name, env={"LEADER_CATCH_UP": "all"})
    try:
        yield procs
    finally:
        procs.stop()
        print(procs.logs())  # shown by pytest only when the test failed


def stop(r: Replicas, *procs: Proc) -> None:
    """SIGTERM (a graceful stop: a leader releases its lease) and wait for the exit."""
    for proc in procs:
        r.retired.add(proc.pid)
        proc.signal(signal.SIGTERM)
    for proc in procs:
        wait_until(lambda p=proc: not p.alive(), 30, f"{proc.describe()} to exit", r.logs)


def observe(r: Replicas, seconds: int = STEADY) -> None:
    """Wait until ``seconds`` more fire times after now have been recorded."""
    start = int(time.time())
    wait_until(lambda: sum(s > start for s in set(r.seconds())) >= seconds, seconds + 30,
               f"{seconds} fire times after {start}",
               lambda: f"seconds: {sorted(set(r.seconds()))}\n{r.logs()}")


def settle(r: Replicas) -> Analysis:
    """Everything up to now, once the tick after it was recorded (all consumers had
    time to run what was dispatched before it)."""
    end = int(time.time())
    wait_until(lambda: max(r.seconds()) >= end + 1, 20, f"the tick of {end + 1}", r.logs)
    time.sleep(1.0)  # a tick dispatched before end + 1 may still be running
    analysis = analyse(r.ticks(), until=end)
    print(analysis.summary())
    return analysis


def refusals(proc: Proc) -> list[str]:
    return [line for line in proc.log().splitlines() if REFUSAL in line]


def test_switching_beat_workers_beat_dispatches_every_fire_time_once(
        replicas: Replicas) -> None:
    r = replicas
    # Standalone beat; a worker without leader_beat runs the ticks.
    consumer = r.worker("--no-leader-beat")
    beat1 = r.beat()
    r.wait_workers_ready()
    r.wait_ticks(3, timeout=60)
    observe(r)

    # Switch to worker-embedded dispatch: workers with leader_beat = True come up,
    # the old worker and then the beat go away.
    embedded = [r.worker(), r.worker()]
    r.wait_workers_ready()
    stop(r, consumer)
    observe(r, 2)
    stop(r, beat1)
    observe(r)

    # And back to standalone beat.
    consumer = r.worker("--no-leader-beat")
    beat2 = r.beat()
    r.wait_workers_ready()
    stop(r, *embedded)
    observe(r)
    assert beat2.alive() and consumer.alive()

    analysis = settle(r)
    assert analysis.last - analysis.first + 1 >= 4 * STEADY, analysis.summary()
    assert not analysis.duplicates, analysis.summary()
    assert not analysis.missing, analysis.summary()
    ids = [t["task_id"] for t in r.ticks()]
    assert len(ids) == len(set(ids)), "a task id was sent twice"


def test_worker_and_beat_dispatching_at_once_one_refuses_with_one_line(
        replicas: Replicas) -> None:
    r = replicas
    # Workers with leader_beat = True dispatch; then a standalone beat starts too.
    embedded = [r.worker(), r.worker()]
    r.wait_workers_ready()
    r.wait_ticks(3, timeout=60)
    beat = r.beat()
    wait_until(lambda: refusals(beat), 30, "the standalone beat to refuse", r.logs)
    observe(r, 2 * STEADY)
    [line] = refusals(beat)
    assert "leader_beat" in line, line

    # The workers are switched to leader_beat = False: the beat takes over.
    consumer = r.worker("--no-leader-beat")
    r.wait_workers_ready()
    stop(r, *embedded)
    observe(r)
    assert refusals(beat) == [line], "the beat refused more than once"

    # A worker with leader_beat = True comes back while the beat dispatches: the
    # worker, once it leads, refuses.
    late = r.worker()
    r.wait_workers_ready()
    stop(r, consumer)
    wait_until(lambda: refusals(late), 30, "the leading worker to refuse", r.logs)
    observe(r, 2 * STEADY)
    [worker_line] = refusals(late)
    assert "leader_beat" in worker_line, worker_line
    assert beat.alive()

    analysis = settle(r)
    assert not analysis.duplicates, analysis.summary()
    assert not analysis.missing, analysis.summary()
