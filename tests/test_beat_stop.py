"""``celery beat -S leader`` stops promptly on SIGTERM, even right after SIGCONT.

Dispatch runs in background threads while beat's main thread sleeps between
ticks.  The kernel delivers a process signal to a thread that is not stopped,
so SIGCONT followed at once by SIGTERM (a paused replica being stopped) often
lands in one of our threads; Python then runs the handler only when the main
thread's sleep ends.  Three replicas are stopped that way, one after the other.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.sched_procs import Replicas
from tests.waiting import wait_until

pytestmark = pytest.mark.integration



def test_a_paused_beat_exits_within_seconds_of_sigcont_then_sigterm(
        replicas: Replicas, election_name: str) -> None:
    beats = [replicas.beat() for _ in range(3)]
    election = f"{election_name}-beat"
    replicas.wait_leader(election, timeout=60)
    for proc in beats:
        wait_until(lambda p=proc: "beat: Starting" in p.log(), 30, f"{proc.describe()} to start",
                   replicas.logs)
    for proc in beats:
        proc.signal(signal.SIGSTOP)
        time.sleep(0.2)  # stopped: every thread of it
        proc.signal(signal.SIGCONT)
        proc.signal(signal.SIGTERM)
        replicas.retired.add(proc.pid)
        wait_until(lambda p=proc: not p.alive(), 5, f"{proc.describe()} to exit after SIGTERM",
                   replicas.logs)
