"""tests.apps.leader_app plus tasks for on_follower policies and leadership probes.

Same app object, settings and event recording as leader_app; run workers with
``-A tests.apps.policy_app`` and give each its own queue (``-Q celery,q.<name>``)
so a test can run a task on one chosen replica.
"""

from __future__ import annotations

from typing import Any

from celery import signals as celery_signals

import celery_leader
from celery_leader import leader_only
from tests.apps.leader_app import app, leader_work, record

__all__ = ["app", "leader_raise", "leader_skip", "leader_work", "probe", "reversed_work"]


@leader_only(on_follower="skip")
@app.task(bind=True)
def leader_skip(self: Any, label: str) -> str:
    record("task_start", label=label, term=self.request.leader_term,
           leading=celery_leader.is_leader(), task_id=self.request.id)
    return label


@leader_only(on_follower="raise")
@app.task(bind=True)
def leader_raise(self: Any, label: str) -> str:
    record("task_start", label=label, term=self.request.leader_term,
           leading=celery_leader.is_leader(), task_id=self.request.id)
    return label


# The order opposite to the README's: @app.task above @leader_only.  (Acked
# early: a follower sends a message it was given back to the leader queue.)
@app.task(bind=True)
@leader_only
def reversed_work(self: Any, label: str) -> str:
    record("task_start", label=label, term=getattr(self.request, "leader_term", None),
           leading=celery_leader.is_leader(), task_id=self.request.id)
    return label


@app.task(bind=True)
def probe(self: Any, label: str) -> str:
    """Not leader-only: reports what this worker process believes about leadership."""
    record("probe", label=label, hostname=self.request.hostname,
           leading=celery_leader.is_leader(), term=celery_leader.current_term())
    return label


@celery_signals.task_postrun.connect
def _postrun(sender: Any = None, task_id: str = "", state: str = "", retval: Any = None,
             **kwargs: Any) -> None:
    record("task_postrun", task=getattr(sender, "name", ""), task_id=task_id, state=state,
           retval=repr(retval), hostname=getattr(getattr(sender, "request", None), "hostname",
                                                 None))
