"""Dispatch one tick the way the scheduler's loop does, for tests and benchmarks.

The loop hands every due tick, even a lone one, to the herd dispatcher
(``ScheduleRunner._fire_all_due`` -> ``runner.herd.dispatch``): one fenced
HERD_DISPATCH_LUA call claims it and, with the broker on the lease's Redis and
a template for the entry, pushes its message in the same step; otherwise it
leaves a pending copy that is published right after (``_publish_pending``).
"""

from __future__ import annotations

from datetime import datetime

from celery_leader.schedule.entries import Entry
from celery_leader.schedule.herd import Claim
from celery_leader.schedule.runner import ScheduleRunner
from celery_leader.schedule.store import to_ms


def fire(runner: ScheduleRunner, entry: Entry, fire_time: datetime, term: int,
         publish: bool = True) -> bool:
    """Claim (and publish, unless ``publish`` is False) ``entry``'s tick at
    ``fire_time`` under ``term``: a herd of one.  False when the term is over
    (fenced); raises ScheduleTakenOver when another election owns the schedule."""
    return runner.herd.dispatch([Claim(entry, to_ms(fire_time), publish)], term)
