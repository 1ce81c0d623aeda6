"""The start claim of a leader-only task when Redis replies are lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from celery_leader import ClaimResult, LeaderElectionRecord, RedisLock, decorators, state, worker


@pytest.fixture
def leading(redis_client: redis.Redis, election_name: str,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, int]]:
    lock = RedisLock(redis_client, election_name, "w")
    written = lock.create(LeaderElectionRecord("w", 30.0)).record
    assert written is not None
    shared = state.shared_leadership()
    shared.publish(written.term, time.monotonic() + 30)
    controller = SimpleNamespace(lock=lock)
    monkeypatch.setattr(worker, "_controller", controller)
    try:
        yield controller, written.term
    finally:
        shared.publish(0, 0.0)
        decorators._scripts.pop(id(controller), None)


def flaky_script(controller: Any, failures: int, on_failure: Any = None) -> list[int]:
    real = decorators._task_start_script(controller)
    outcomes: list[int] = []

    def script(*args: Any, **kwargs: Any) -> Any:
        outcome = real(*args, **kwargs)  # the claim is written in Redis...
        outcomes.append(outcome)
        if len(outcomes) <= failures:
            if on_failure is not None:
                on_failure()
            raise redis.ConnectionError("reply lost")  # ...but its reply never arrives
        return outcome

    decorators._scripts[id(controller)] = script
    return outcomes


def test_lost_reply_is_asked_again_with_the_same_attempt(leading: tuple[Any, int]) -> None:
    controller, term = leading
    outcomes = flaky_script(controller, failures=2)
    assert decorators._start_run("task-1", term) is ClaimResult.CLAIMED
    assert outcomes == [1, 1, 1]
    # Another delivery of the same task under the same term is a duplicate.
    assert decorators._start_run("task-1", term) is ClaimResult.ALREADY_CLAIMED


def test_leadership_ending_during_retries_hands_the_task_on(leading: tuple[Any, int]) -> None:
    controller, term = leading
    flaky_script(controller, failures=100,
                 on_failure=lambda: state.shared_leadership().publish(0, 0.0))
    assert decorators._start_run("task-2", term) is ClaimResult.FENCED
    # The next leader (a higher term) runs it although the claim was written.
    lock = controller.lock
    newer = lock.update(LeaderElectionRecord("w", 30.0), lock.get().raw).record
    assert newer is not None and newer.term > term
    state.shared_leadership().publish(newer.term, time.monotonic() + 30)
    decorators._scripts.pop(id(controller), None)
    assert decorators._start_run("task-2", newer.term) is ClaimResult.CLAIMED


def test_a_persistent_script_error_is_not_retried(leading: tuple[Any, int]) -> None:
    """Only a lost request or reply (connection, timeout) is asked again: NOPERM
    or a script error would fail the same way for as long as the term lasts, so
    the run fails at once, naming the error, instead of hanging there."""
    controller, term = leading
    calls: list[int] = []

    def refused(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 3:  # bounds a retry loop: end the leadership
            state.shared_leadership().publish(0, 0.0)
        raise redis.exceptions.NoPermissionError("NOPERM no permissions to run 'evalsha'")

    decorators._scripts[id(controller)] = refused
    with pytest.raises(redis.exceptions.NoPermissionError):
        decorators._start_run("task-3", term)
    assert len(calls) == 1
