"""``@leader_only``: tasks (and plain functions) that only the leader runs.

Either order of ``@leader_only`` and ``@app.task`` makes a leader-only task: put
below ``@app.task``, it marks the function, and the task whose body it is gets
the task's guard (registered for routing when the app finalizes, the worker
starts or the task is first sent, and applied whenever the body runs as that
task), never the plain function's "return None on a follower".

A leader-only task is routed to ``leader_queue``, which only the current leader
consumes, so a message waits there while nobody leads.  The check that matters
is made again in the pool child when the body is about to run, against the
shared leadership page, and the run is claimed in Redis under the current term
so a redelivered message never runs twice within one leadership.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery._state import get_current_task
from celery.exceptions import Ignore, Reject
from celery.local import PromiseProxy

from .election.redact import secret_safe_logger
from .election.resourcelock import ClaimResult
from .leaderqueue import DELIVERY_HEADER
from .state import LEADER_ONLY_TASKS, current_term
from .taskruns import TASK_CLAIM_TTL_MS, TASK_START_LUA, claim_task_start
from .taskstats import DUPLICATE, REQUEUED, STARTED
from .worker import current_controller

__all__ = ["LEADER_ONLY_TASKS", "POLICIES", "TASK_CLAIM_TTL_MS", "TASK_START_LUA",
           "NotLeaderError", "adopt_leader_only_tasks", "leader_only"]

log = secret_safe_logger(__name__)

POLICIES = ("requeue", "skip", "raise")
# The attribute @leader_only sets on a function it wraps: its policy.  A task
# whose body carries it is a leader-only task (@leader_only below @app.task).
_FUNCTION_POLICY = "_leader_only_function_policy"
_MAX_WRAPPERS = 32  # how deep _runs_under looks through wrappers of a task's run

F = TypeVar("F", bound=Callable[..., Any])


class NotLeaderError(RuntimeError):
    """A leader-only body was asked to run on a replica that does not lead."""


@overload
def leader_only(target: F, *, on_follower: str = "requeue") -> F: ...
@overload
def leader_only(target: None = None, *, on_follower: str = "requeue") -> Callable[[F], F]: ...


def leader_only(target: Any = None, *, on_follower: str = "requeue") -> Any:
    """Restrict a Celery task (above or below ``@app.task``) or a function to the leader.

    ``on_follower``: ``"requeue"`` puts the message back for the leader (tasks),
    ``"skip"`` ends it as ignored (returns None for functions), ``"raise"``
    raises NotLeaderError.
    """
    if on_follower not in POLICIES:
        raise ValueError(f"leader_only(on_follower=...) must be one of {', '.join(POLICIES)}, "
                         f"got {on_follower!r}")

    def decorate(obj: Any) -> Any:
        if _is_task(obj):
            then = getattr(obj, "__then__", None)
            if then is not None and not getattr(obj, "__evaluated__", lambda: True)():
                then(_guard_task, obj, on_follower)  # a PromiseProxy: wrap once it exists
            else:
                _guard_task(obj, on_follower)
            return obj
        if callable(obj):
            return _guard_function(obj, on_follower)
        raise TypeError(f"leader_only needs a Celery task or a function, got {obj!r}")

    return decorate(target) if target is not None else decorate


def _is_task(obj: Any) -> bool:
    return isinstance(obj, PromiseProxy) or (
        hasattr(obj, "apply_async") and hasattr(obj, "run") and hasattr(obj, "request"))


def _guard_function(fun: F, policy: str) -> F:
    @functools.wraps(fun)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        task = get_current_task()
        if task is not None and _runs_under(task, guarded):
            # The body of a task (@leader_only below @app.task): the task's guard,
            # with its fenced claim, never the function's.
            # With bind=True the task itself comes first: not the message's.
            bound = bool(args) and args[0] is task
            return _run_guarded(task, policy, lambda: fun(*args, **kwargs),
                                args[1:] if bound else args, kwargs)
        if current_term():
            return fun(*args, **kwargs)
        if policy == "raise":
            raise NotLeaderError(f"{fun.__qualname__} runs only on the leader")
        return None

    setattr(guarded, _FUNCTION_POLICY, policy)
    return guarded  # type: ignore[return-value]


def _runs_under(task: Any, body: Any) -> bool:
    """Whether ``body`` is the function ``task`` runs, under whatever wrapped
    ``run`` since (the tick guard wraps every task's; ``run`` is a bound method
    with ``bind=True``)."""
    run = getattr(task, "run", None)
    for _ in range(_MAX_WRAPPERS):
        run = getattr(run, "__func__", run)
        if run is body:
            return True
        run = getattr(run, "__wrapped__", None)
        if run is None:
            return False
    return False


def adopt(task: Any) -> bool:
    """Register ``task`` as leader-only when its body is a @leader_only function
    (the decorators in the other order); True when it is leader-only."""
    if getattr(task, "_leader_only_policy", None) is not None:
        return True
    run = getattr(task, "run", None)
    policy = getattr(getattr(run, "__func__", run), _FUNCTION_POLICY, None)
    if policy is None:  # (functools.wraps copies it onto a wrapper of the body)
        return False
    task._leader_only_policy = policy
    LEADER_ONLY_TASKS[task.name] = policy
    return True


def adopt_leader_only_tasks(app: Any) -> None:
    """Register every task of ``app`` whose body is a @leader_only function:
    called once the app is finalized and when a worker starts, so routing,
    the leader queue and the task counters know them before the first message."""
    for task in list(app.tasks.values()):
        adopt(task)


def _guard_task(task: Any, policy: str) -> None:
    if getattr(task, "_leader_only_policy", None) is not None:
        return
    original_run = task.run
    task._leader_only_policy = policy
    LEADER_ONLY_TASKS[task.name] = policy

    @functools.wraps(original_run)
    def guarded_run(*args: Any, **kwargs: Any) -> Any:
        return _run_guarded(task, policy, lambda: original_run(*args, **kwargs), args, kwargs)

    task.run = guarded_run


def _run_guarded(task: Any, policy: str, call: Callable[[], Any], args: Any,
                 kwargs: Any) -> Any:
    """Run a leader-only task's body once per leadership: claimed under the
    current term (fenced), else the on_follower policy (``args`` and ``kwargs``
    are the message's, for a requeue)."""
    request = task.request
    term = current_term()
    started = _start_run(request.id, term) if term else ClaimResult.FENCED
    if started is ClaimResult.ALREADY_CLAIMED:  # it ran or runs under this term
        _count(task.name, DUPLICATE)
        log.info("leader-only task %s[%s] already ran; skipping duplicate",
                 task.name, request.id)
        raise Ignore()
    if started is ClaimResult.FENCED:
        return _on_follower(task, request, policy, args, kwargs)
    _count(task.name, STARTED)
    request.leader_term = term
    try:
        result = call()
    except BaseException:
        _finish_run(request, done=False)  # a retry or redelivery may run it again
        raise
    _finish_run(request, done=True)
    return result


def _count(task: str, outcome: int) -> None:
    """Count for ``/metrics`` (taskstats.py); nothing without a worker's controller."""
    controller = current_controller()
    if controller is not None:
        controller.task_stats.count(task, outcome)


def _start_run(task_id: str | None, term: int) -> ClaimResult:
    """Claim this run under ``term`` (taskruns.py): CLAIMED runs it, FENCED is
    "not the leader", ALREADY_CLAIMED a duplicate delivery."""
    controller = current_controller()
    if controller is None or task_id is None:
        # No election here (e.g. a test harness): the term check suffices.
        return ClaimResult.CLAIMED
    return claim_task_start(_task_start_script(controller), controller.lock, task_id, term,
                            lambda: current_term() == term)


def _finish_run(request: Any, done: bool) -> None:
    """Record the outcome, and end the message's in-flight record in the same step."""
    controller = current_controller()
    task_id = request.id
    if controller is None or task_id is None:
        return
    try:
        controller.finish_run(task_id, done, controller.done_ttl_ms,
                              getattr(request, DELIVERY_HEADER, None))
    except Exception:
        log.exception("could not record the outcome of leader-only task %s", task_id)


_scripts: dict[int, Any] = {}


def _task_start_script(controller: Any) -> Any:
    """The controller's fenced TASK_START_LUA, registered once per controller."""
    script = _scripts.get(id(controller))
    if script is None:
        script = _scripts[id(controller)] = controller.lock.fenced_script(TASK_START_LUA)
    return script


def _on_follower(task: Any, request: Any, policy: str, args: Any, kwargs: Any) -> Any:
    if policy == "raise":
        raise NotLeaderError(f"task {task.name}[{request.id}] runs only on the leader")
    if policy == "skip":
        log.info("leader-only task %s[%s] skipped: this worker does not lead",
                 task.name, request.id)
        raise Ignore()
    log.info("leader-only task %s[%s] requeued for the leader", task.name, request.id)
    _count(task.name, REQUEUED)
    if getattr(request, "acks_late", None) or (task.acks_late and not request.called_directly):
        raise Reject("not the leader", requeue=True)
    # Already acknowledged: publish the same task again (same id) for the leader.
    controller = current_controller()
    queue = controller.settings.queue if controller else None
    task.apply_async(args=args, kwargs=kwargs, task_id=request.id, queue=queue,
                     headers=getattr(request, "headers", None) or None)
    raise Ignore()
