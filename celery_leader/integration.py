"""``celery_leader.install(app)``: everything a Celery app needs, from settings."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import click
from celery import signals as celery_signals

from .config import ConfigurationError
from .decorators import LEADER_ONLY_TASKS
from .elections import ROLE_WORKERS, mark_role
from .settings import LeaderSettings, read_settings
from .tlscheck import check_tls
from .worker import (
    LeaderController,
    LeaderQueueStep,
    LeaderWorkerStep,
    on_worker_shutdown,
)

REFUSED_POOLS = ("gevent", "eventlet")


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
                     help="celery-leader: serve /healthz and /leader on this port."),
        click.Option(["--leader-beat/--no-leader-beat"], default=None,
                     help="celery-leader: the leader runs beat_schedule."),
    ):
        app.user_options["worker"].add(option)
    app.on_after_configure.connect(_add_router, weak=False)
    celery_signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
    from . import control  # noqa: F401  (registers the leader_step_down command)

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


def route_leader_only(name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
                      **kw: Any) -> dict[str, str] | None:
    if name not in LEADER_ONLY_TASKS:
        return None
    from celery import current_app

    app = getattr(task, "app", None) or current_app
    from .settings import setting

    return {"queue": setting(app, "leader_queue", "celery_leader")}


@contextlib.contextmanager
def exit_on_configuration_error() -> Iterator[None]:
    """Turn a ConfigurationError into one stderr line and exit status 2 (Celery
    stops the worker on SystemExit, also from a bootstep's start)."""
    try:
        yield
    except ConfigurationError as exc:
        from celery.utils.log import LoggingProxy

        stream = sys.stderr
        if isinstance(stream, LoggingProxy):  # once the worker runs: not a log record
            stream = sys.__stderr__ or stream
        print(f"celery-leader: configuration error: {exc}", file=stream, flush=True)
        raise SystemExit(2) from None


def controller_for_worker(worker: Any, options: dict[str, Any]) -> LeaderController:
    """Build the worker's controller, or stop the worker with one clear line."""
    app = worker.app
    with exit_on_configuration_error():
        pool = getattr(worker, "pool_cls", None)
        pool_name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
        if any(refused in str(pool_name) for refused in REFUSED_POOLS):
            raise ConfigurationError(
                f"worker pool {pool_name!r} is not supported by celery-leader; use prefork, "
                "threads or solo"
            )
        settings = _with_cli_overrides(read_settings(app), options)
        check_tls(app, settings)  # a certificate problem stops the worker now, named
        controller = LeaderController(app, settings, hostname=worker.hostname)
    lock = controller.lock
    # Each new leader labels the election for `celery leader status --all`.
    controller.leadership_hooks.append(lambda term, stop: mark_role(lock, ROLE_WORKERS))
    return controller


def _with_cli_overrides(settings: LeaderSettings, options: dict[str, Any]) -> LeaderSettings:
    """Worker flags override settings; they get the same checks as the settings, so
    a bad flag is a ConfigurationError naming it, not a traceback from deeper in."""
    from dataclasses import replace

    from .settings import _bool, _name, _optional_port

    overrides: dict[str, Any] = {}
    if options.get("leader_name"):
        overrides["name"] = _name("--leader-name", options["leader_name"])
    if options.get("leader_identity"):
        overrides["identity"] = _name("--leader-identity", options["leader_identity"])
    if options.get("leader_healthz_port") is not None:
        overrides["healthz_port"] = _optional_port("--leader-healthz-port",
                                                   options["leader_healthz_port"])
    if options.get("leader_beat") is not None:
        overrides["beat"] = _bool("--leader-beat", options["leader_beat"])
    return replace(settings, **overrides) if overrides else settings
