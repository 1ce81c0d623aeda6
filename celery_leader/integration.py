"""``celery_leader.install(app)``: everything a Celery app needs, from settings."""

from __future__ import annotations

from typing import Any

import click
from celery import current_app
from celery import signals as celery_signals

from . import control  # noqa: F401  (registers the leader_step_down command)
from .decorators import adopt, adopt_leader_only_tasks
from .settings import exit_on_configuration_error, leader_queue
from .state import LEADER_ONLY_TASKS
from .worker import (
    REFUSED_POOLS,
    LeaderQueueStep,
    LeaderWorkerStep,
    _with_cli_overrides,
    controller_for_worker,
    on_worker_shutdown,
)

# Kept importable from here (their homes: worker.py and settings.py).
__all__ = ["REFUSED_POOLS", "_with_cli_overrides", "controller_for_worker",
           "exit_on_configuration_error", "install", "route_leader_only"]


def install(app: Any) -> Any:
    """Add the worker bootstep, leader-queue routing, worker CLI options and the
    step-down control command.  Idempotent; returns ``app``."""
    if getattr(app, "_celery_leader_installed", False):
        return app
    app._celery_leader_installed = True
    app.steps["worker"].add(LeaderWorkerStep)
    app.steps["consumer"].add(LeaderQueueStep)
    for option in (
        click.Option(["--leader-name"], help="celery-leader: election name (leader_name)."),
        click.Option(["--leader-identity"], help="celery-leader: this replica's identity."),
        click.Option(["--leader-healthz-port"], type=int,
                     help="celery-leader: serve /healthz, /metrics, /status, the "
                          "status page (/) and /leader on this port "
                          "(leader_healthz_port)."),
        click.Option(["--leader-beat/--no-leader-beat"], default=None,
                     help="celery-leader: the leader runs beat_schedule."),
    ):
        app.user_options["worker"].add(option)
    app.on_after_configure.connect(_add_router, weak=False)
    # @leader_only below @app.task: known once every task exists (decorators.py).
    app.on_after_finalize.connect(_adopt_tasks, weak=False)
    celery_signals.worker_init.connect(_adopt_worker_tasks, weak=False)
    if app.finalized:
        adopt_leader_only_tasks(app)
    celery_signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
    return app


def _add_router(sender: Any = None, **kwargs: Any) -> None:
    """Route leader-only tasks to leader_queue, ahead of the user's own routes."""
    app = sender
    conf = app.conf
    existing = conf.task_routes
    if existing is None:
        routes: list[Any] = []
    elif isinstance(existing, (list, tuple)):
        routes = list(existing)
    else:
        routes = [existing]
    if route_leader_only not in routes:
        conf.task_routes = [route_leader_only, *routes]


def _adopt_tasks(sender: Any = None, **kwargs: Any) -> None:
    adopt_leader_only_tasks(sender)


def _adopt_worker_tasks(sender: Any = None, **kwargs: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None and getattr(app, "_celery_leader_installed", False):
        adopt_leader_only_tasks(app)


def route_leader_only(name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
                      **kw: Any) -> dict[str, str] | None:
    if name not in LEADER_ONLY_TASKS and (task is None or not adopt(task)):
        return None
    app = getattr(task, "app", None) or current_app
    return {"queue": leader_queue(app)}
