"""``celery -A proj leader status|step-down`` (entry point ``celery.commands``)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

import click

from .config import ConfigurationError
from .settings import read_settings


def lease_status(app: Any) -> dict[str, Any]:
    """The election as Redis sees it, judged on the Redis server's clock."""
    settings = read_settings(app)
    lock = settings.lock("celery-leader-cli")
    client = lock.client
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
    replies: list[dict[str, Any]] = []
    try:
        holder = lease_status(app)["leader"] or ""
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    # The default identity is "<worker nodename>:<pid>": ask that worker alone,
    # and return as soon as it answers instead of waiting out the timeout.
    nodename = holder.rpartition(":")[0]
    if "@" in nodename:
        replies = app.control.broadcast("leader_step_down", reply=True, timeout=timeout,
                                        destination=[nodename], limit=1) or []
    if not replies:  # a custom leader_identity: every worker checks for itself
        replies = app.control.broadcast("leader_step_down", reply=True, timeout=timeout) or []
    stepping = [r for reply in replies for r in reply.values()
                if r.get("ok") == "stepping down"]
    if stepping:
        click.echo(f"{stepping[0]['identity']} is stepping down (term {stepping[0]['term']})")
        return
    click.echo(f"no worker replied as leader ({len(replies)} replies)")
    sys.exit(1)


@leader.group(invoke_without_command=True,
              help="Show the periodic schedule; subcommands change runtime entries and "
                   "enable or disable any entry.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def schedule(ctx: click.Context, as_json: bool) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from .scheduler import schedule_owner, schedule_report

    try:
        rows = schedule_report(ctx.obj.app)
        owner = None if as_json else schedule_owner(ctx.obj.app)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(rows, sort_keys=True))
        return
    if owner is not None:
        mode = "standalone beat" if owner["mode"] == "beat" else "worker (leader_beat = True)"
        click.echo(f"dispatched by: {mode} {owner.get('identity')}, election "
                   f"{owner.get('election')!r}, term {owner.get('term')}"
                   + ("" if owner["leading"] else " (that leadership has ended)"))
    if not rows:
        click.echo("no entries")
        return
    click.echo(schedule_table(rows))


def schedule_table(rows: list[dict[str, Any]]) -> str:
    """The schedule as aligned columns, two spaces apart, nothing truncated; the
    term is shown with the election that holds it (terms of the workers' and the
    beats' elections are not comparable)."""
    header = ("name", "schedule", "next fire (UTC)", "last fire (UTC)", "term (election)")
    lines = [header]
    for row in rows:
        nxt = _table_time(row["next_fire_time"]) if row["enabled"] else "disabled"
        term = "-" if row["term"] is None else f"{row['term']} ({row['election']})"
        lines.append((row["name"], row["schedule"], nxt, _table_time(row["last_fire_time"]),
                      term))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths,
                                                                         strict=True)).rstrip()
                     for line in lines)


def _table_time(iso: str | None) -> str:
    if iso is None:
        return "-"
    moment = datetime.fromisoformat(iso).astimezone(timezone.utc)
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{moment.microsecond // 1000:03d}" if moment.microsecond else text


def _store(ctx: click.Context) -> Any:
    from .scheduler import ScheduleStore

    return ScheduleStore.for_app(ctx.obj.app)


@schedule.command(name="add", help="Add (or with --replace, overwrite) a runtime entry.")
@click.argument("name")
@click.option("--task", required=True, help="Task name.")
@click.option("--cron", "cron_expr", help="Cron expression (5 fields, or 6 with seconds first).")
@click.option("--tz", help="IANA time zone for --cron (default: the app's).")
@click.option("--every", type=float, help="Interval in seconds.")
@click.option("--args", "args_json", default="[]", help="JSON list of positional arguments.")
@click.option("--kwargs", "kwargs_json", default="{}", help="JSON object of keyword arguments.")
@click.option("--options", "options_json", default="{}", help="JSON object of send options.")
@click.option("--disabled", is_flag=True, help="Store it disabled.")
@click.option("--replace", "replace_existing", is_flag=True, help="Overwrite an existing entry.")
@click.pass_context
def schedule_add(ctx: click.Context, name: str, task: str, cron_expr: str | None,
                 tz: str | None, every: float | None, args_json: str, kwargs_json: str,
                 options_json: str, disabled: bool, replace_existing: bool) -> None:
    from .cron import cron
    from .entries import EntryError

    if (cron_expr is None) == (every is None):
        raise click.UsageError("give exactly one of --cron or --every")
    try:
        sched: Any = cron(cron_expr, tz=tz) if cron_expr is not None else every
        entry = _store(ctx).add(name, task, sched, args=json.loads(args_json),
                                kwargs=json.loads(kwargs_json),
                                options=json.loads(options_json), enabled=not disabled,
                                replace_existing=replace_existing)
    except (EntryError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"added {entry.name}: {entry.describe_schedule()}")


@schedule.command(name="remove", help="Remove a runtime entry (and its progress).")
@click.argument("name")
@click.pass_context
def schedule_remove(ctx: click.Context, name: str) -> None:
    from .entries import EntryError

    try:
        removed = _store(ctx).remove(name)
    except EntryError as exc:
        raise click.UsageError(str(exc)) from None
    if not removed:
        raise click.UsageError(f"no runtime entry named {name!r}")
    click.echo(f"removed {name}")


@schedule.command(name="enable",
                  help="Enable a runtime entry, or a beat_schedule entry disabled here.")
@click.argument("name")
@click.pass_context
def schedule_enable(ctx: click.Context, name: str) -> None:
    _set_enabled(ctx, name, True)


@schedule.command(name="disable",
                  help="Disable a runtime entry, or a beat_schedule entry (kept in Redis "
                       "until enabled again; beat_schedule is not changed).")
@click.argument("name")
@click.pass_context
def schedule_disable(ctx: click.Context, name: str) -> None:
    _set_enabled(ctx, name, False)


def _set_enabled(ctx: click.Context, name: str, enabled: bool) -> None:
    from .entries import EntryError

    try:
        entry = _store(ctx).enable(name) if enabled else _store(ctx).disable(name)
    except EntryError as exc:
        raise click.UsageError(str(exc)) from None
    kind = "runtime entry" if entry.runtime else "beat_schedule entry"
    click.echo(f"{'enabled' if enabled else 'disabled'} {name} ({kind})")
