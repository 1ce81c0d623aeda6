"""``celery -A proj leader status|step-down`` (entry point ``celery.commands``)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .config import ConfigurationError
from .redislock import RedisLock
from .settings import read_settings


def lease_status(app: Any) -> dict[str, Any]:
    """The election as Redis sees it, judged on the Redis server's clock."""
    settings = read_settings(app)
    client = settings.redis_client()
    lock = RedisLock(client, name=settings.name, identity="celery-leader-cli",
                     key_prefix=settings.key_prefix)
    observation = lock.get()
    record = observation.record
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    holder = record.holder_identity if record else ""
    return {
        "name": settings.name,
        "key": lock.lease_key,
        "leader": holder or None,
        "term": record.term if record else None,
        "lease_duration": record.lease_duration if record else None,
        "lease_age": round(now - record.renew_time, 3) if record else None,
        "lease_remaining": observation.ttl,
        "acquired_for": round(now - record.acquire_time, 3) if record else None,
        "transitions": record.leader_transitions if record else None,
        "malformed": observation.error,
    }


@click.group(name="leader", help="Inspect and steer celery-leader's election.")
def leader() -> None:
    pass


@leader.command(help="Show the current leader; exit 0 when one holds the lease, 1 when none.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    app = ctx.obj.app
    try:
        info = lease_status(app)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
    elif info["leader"]:
        click.echo(f"leader:      {info['leader']}\nterm:        {info['term']}\n"
                   f"lease age:   {info['lease_age']}s of {info['lease_duration']}s\n"
                   f"remaining:   {info['lease_remaining']}s\n"
                   f"transitions: {info['transitions']}")
    else:
        click.echo(f"no leader for election {info['name']!r}")
    sys.exit(0 if info["leader"] else 1)


@leader.command(name="step-down", help="Ask the current leader to hand over gracefully.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for replies.")
@click.pass_context
def step_down(ctx: click.Context, timeout: float) -> None:
    app = ctx.obj.app
    replies = app.control.broadcast("leader_step_down", reply=True, timeout=timeout) or []
    stepping = [r for reply in replies for r in reply.values()
                if r.get("ok") == "stepping down"]
    if stepping:
        click.echo(f"{stepping[0]['identity']} is stepping down (term {stepping[0]['term']})")
        return
    click.echo(f"no worker replied as leader ({len(replies)} replies)")
    sys.exit(1)
