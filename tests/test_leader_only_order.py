"""``@leader_only`` above or below ``@app.task``: the same leader-only task.

Pure logic (no worker, so no replica leads here): routing, the follower policy,
and the plain-function behaviour that must not leak into a task's body.  The
worker-level check is tests/test_celery_worker.py
(test_app_task_above_leader_only_runs_each_call_once_on_the_leader).
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_leader import NotLeaderError, install, leader_only
from celery_leader.integration import route_leader_only
from celery_leader.state import LEADER_ONLY_TASKS


def make_app() -> Celery:
    app = Celery("order", set_as_current=False, broker="memory://")
    install(app)
    return app


@pytest.mark.parametrize("bind", [False, True])
@pytest.mark.parametrize("readme_order", [True, False])
def test_either_order_is_a_leader_only_task(readme_order: bool, bind: bool) -> None:
    app = make_app()
    ran: list[Any] = []

    def body(*args: Any) -> str:
        ran.append(args)
        return "ran"

    name = f"order.{'readme' if readme_order else 'reversed'}_{bind}"
    if readme_order:
        leader_only(on_follower="raise")(app.task(bind=bind, name=name)(body))
    else:
        app.task(bind=bind, name=name)(leader_only(on_follower="raise")(body))
    app.finalize()
    assert LEADER_ONLY_TASKS.get(name) == "raise"
    assert route_leader_only(name, (), {}, {}, task=app.tasks[name]) == {
        "queue": "celery_leader"}
    # No replica leads here: the task's policy, not the function's "return None".
    result = app.tasks[name].apply(args=(1,))
    assert isinstance(result.result, NotLeaderError), result.result
    assert ran == []


def test_a_plain_function_keeps_its_own_behaviour() -> None:
    calls: list[int] = []

    @leader_only
    def helper(x: int) -> int:
        calls.append(x)
        return x

    assert helper(3) is None and calls == []

    @leader_only(on_follower="raise")
    def strict(x: int) -> int:
        return x

    with pytest.raises(NotLeaderError):
        strict(1)


def test_a_leader_only_function_called_from_another_task_stays_a_function() -> None:
    """Only the function a task runs gets the task's guard; a helper it calls
    keeps the function's behaviour."""
    app = make_app()

    @leader_only
    def helper() -> str:
        return "helped"

    @app.task(name="order.caller")
    def caller() -> Any:
        return helper()

    app.finalize()
    assert "order.caller" not in LEADER_ONLY_TASKS
    assert app.tasks["order.caller"].apply().result is None
