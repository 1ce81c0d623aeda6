"""``celery -A proj leader status|step-down|schedule`` (entry point ``celery.commands``)."""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime, timezone
from typing import Any

import click
import redis

from .election.config import ConfigurationError
from .election.elections import (
    ROLE_BEAT,
    ROLE_WORKERS,
    StepDownRequests,
    beat_hash_tag,
    election_names,
    read_role,
)
from .election.redact import redact, redact_text
from .election.redislock import RedisLock
from .schedule.cronexpr import cron
from .schedule.entries import EntryError, EntryExistsError
from .schedule.runner import beat_election_name
from .schedule_api import ScheduleStore, schedule_owner, schedule_report
from .settings import LeaderSettings, read_settings

CLI_IDENTITY = "celery-leader-cli"


class CommandError(click.ClickException):
    """Redis could not answer: exit status 2, apart from status's 1 for "no leader"."""

    exit_code = 2


def _app(ctx: click.Context) -> Any:
    """The -A app; without one Celery's default app would answer for an election
    named 'default' on the default broker, so say what is missing instead."""
    root = ctx.find_root()
    if "app" in root.params and not root.params["app"]:
        names, level = [], ctx
        while level.parent is not None:  # up to, not including, the `celery` root
            names.append(level.info_name or "")
            level = level.parent
        command = " ".join(reversed(names))
        raise click.UsageError(f"no Celery app given: name yours with -A, as in "
                               f"'celery -A proj {command}'")
    return ctx.obj.app


def _settings(ctx: click.Context) -> LeaderSettings:
    try:
        return read_settings(_app(ctx))
    except ConfigurationError as exc:
        raise click.UsageError(redact_text(str(exc))) from None


def election_status(lock: RedisLock, settings: LeaderSettings) -> dict[str, Any]:
    """One election as Redis sees it, judged on the Redis server's clock."""
    observation = lock.get()
    record = observation.record
    seconds, micros = lock.client.time()
    now = seconds + micros / 1e6
    holder = record.holder_identity if record else ""
    return {
        "name": lock.name,
        "role": election_role(lock, settings),
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


def election_role(lock: RedisLock, settings: LeaderSettings) -> str | None:
    """What the election is for: as its last leader recorded it, else as the
    app's settings name it (<leader_name> workers, <leader_name>-beat beat)."""
    role = read_role(lock)
    if role:
        return role
    if lock.name == beat_election_name(settings, standalone=True):
        return ROLE_BEAT
    if lock.name == settings.name:
        return ROLE_WORKERS
    return None


def _lock(settings: LeaderSettings, name: str | None, client: Any = None) -> RedisLock:
    if name is not None and (not name.strip() or "{" in name or "}" in name):
        raise click.UsageError(f"--name must be a non-empty election name without braces, "
                               f"got {name!r}")
    client = client if client is not None else settings.redis_client()
    name = name or settings.name
    return RedisLock(client, name=name, identity=CLI_IDENTITY, key_prefix=settings.key_prefix,
                     hash_tag=beat_hash_tag(client, settings.key_prefix, name))


def _redis_failure(exc: Exception) -> CommandError:
    """One line for a Redis error, passwords masked (redis-py's messages may
    carry a client's repr, with its connection arguments)."""
    text = redact_text(str(exc))
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return CommandError(f"Redis refused a command for the election's user: {text}")
    return CommandError(f"cannot read the election from Redis ({type(exc).__name__}: {text})")


@click.group(name="leader", help="Inspect and steer celery-leader's elections.")
def leader() -> None:
    pass


@leader.command(help="Show the current leader; exit 0 when one holds the lease, 1 when none. "
                     "With --all, every election under leader_key_prefix; exit 0 when any "
                     "has a leader.")
@click.option("--name", "election", metavar="NAME",
              help="Election to show (default: leader_name; a standalone beat elects "
                   "under <leader_name>-beat).")
@click.option("--all", "show_all", is_flag=True,
              help="Every election under the key prefix, with its role, leader and term.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, election: str | None, show_all: bool, as_json: bool) -> None:
    settings = _settings(ctx)
    if show_all and election:
        raise click.UsageError("give --name or --all, not both")
    try:
        if show_all:
            client = settings.redis_client()
            found = [election_status(_lock(settings, name, client), settings)
                     for name in election_names(client, settings.key_prefix)]
        else:
            found = [election_status(_lock(settings, election), settings)]
    except redis.exceptions.RedisError as exc:
        raise _redis_failure(exc) from None
    found = redact(found)  # what is printed, in either format, passwords masked
    if show_all:
        _print_all(found, settings, as_json)
        sys.exit(0 if any(info["leader"] for info in found) else 1)
    [info] = found
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
    elif info["leader"]:
        click.echo(f"election:    {info['name']} ({info['role'] or 'role unknown'})\n"
                   f"leader:      {info['leader']}\nterm:        {info['term']}\n"
                   f"lease age:   {info['lease_age']}s of {info['lease_duration']}s\n"
                   f"remaining:   {info['lease_remaining']}s\n"
                   f"transitions: {info['transitions']}")
    else:
        click.echo(f"no leader for election {info['name']!r}")
    sys.exit(0 if info["leader"] else 1)


def _print_all(found: list[dict[str, Any]], settings: LeaderSettings, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(found, sort_keys=True))
        return
    if not found:
        click.echo(f"no elections under key prefix {settings.key_prefix!r}")
        return
    click.echo(f"{'election':28} {'role':8} {'leader':36} {'term':>6}  lease age")
    for info in found:
        age = (f"{info['lease_age']}s of {info['lease_duration']}s" if info["leader"]
               else "-")
        click.echo(f"{info['name'][:28]:28} {(info['role'] or '?')[:8]:8} "
                   f"{(info['leader'] or '(none)')[:36]:36} {info['term'] or '-':>6}  {age}")


@leader.command(name="step-down", help="Ask the current leader to hand over gracefully.")
@click.option("--name", "election", metavar="NAME",
              help="Election whose leader steps down (default: leader_name; "
                   "<leader_name>-beat for the standalone beat).")
@click.option("--timeout", default=5.0, show_default=True,
              help="Seconds to wait for the leader to answer.")
@click.pass_context
def step_down(ctx: click.Context, election: str | None, timeout: float) -> None:
    settings = _settings(ctx)
    try:
        lock = _lock(settings, election)  # reads Redis (the beat election's hash tag)
        info = election_status(lock, settings)
        if not info["leader"]:
            click.echo(f"no leader for election {lock.name!r}")
            sys.exit(1)
        holder, term = info["leader"], info["term"]
        if info["role"] == ROLE_BEAT:
            # A beat process has no control consumer: ask through Redis.
            if StepDownRequests(lock).request(term, holder, timeout):
                click.echo(f"{holder} is stepping down (term {term})")
                return
            click.echo(f"{holder}, leader of {lock.name!r} (term {term}), did not take the "
                       f"request within {timeout}s")
            sys.exit(1)
    except redis.exceptions.RedisError as exc:
        raise _redis_failure(exc) from None
    replies = _ask_worker(ctx.obj.app, lock.name, holder, term, timeout)
    stepping = [r for reply in replies for r in reply.values()
                if r.get("ok") == "stepping down"]
    if stepping:
        click.echo(f"{stepping[0]['identity']} is stepping down (term {stepping[0]['term']})")
        return
    click.echo(f"no worker replied as leader of {lock.name!r} ({len(replies)} replies)")
    sys.exit(1)


def _ask_worker(app: Any, name: str, holder: str, term: int,
                timeout: float) -> list[dict[str, Any]]:
    """The leader_step_down control command, for this election and term only."""
    arguments = {"name": name, "term": term}
    # The default identity is "<worker nodename>:<pid>": ask that worker alone,
    # and return as soon as it answers instead of waiting out the timeout.
    nodename = holder.rpartition(":")[0]
    replies: list[dict[str, Any]] = []
    if "@" in nodename:
        replies = app.control.broadcast("leader_step_down", reply=True, timeout=timeout,
                                        destination=[nodename], limit=1,
                                        arguments=arguments) or []
    if not replies:  # a custom leader_identity: every worker checks for itself
        replies = app.control.broadcast("leader_step_down", reply=True, timeout=timeout,
                                        arguments=arguments) or []
    return replies


@leader.group(invoke_without_command=True,
              help="Show the periodic schedule; subcommands change runtime entries and "
                   "enable or disable any entry.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def schedule(ctx: click.Context, as_json: bool) -> None:
    if ctx.invoked_subcommand is not None:
        return
    try:
        rows = schedule_report(_app(ctx))
        owner = None if as_json else schedule_owner(_app(ctx))
    except ConfigurationError as exc:
        raise click.UsageError(redact_text(str(exc))) from None
    except redis.exceptions.RedisError as exc:
        raise _redis_failure(exc) from None
    rows, owner = redact(rows), redact(owner)  # passwords masked, in either format
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
    # A "source" column only when an entry source (django-celery-beat) is on.
    sources = any(row.get("source") not in (None, "beat_schedule", "runtime") for row in rows)
    header: tuple[str, ...] = ("name", "schedule", "next fire (UTC)", "last fire (UTC)",
                               "term (election)") + (("source",) if sources else ())
    lines = [header]
    for row in rows:
        nxt = _table_time(row["next_fire_time"]) if row["enabled"] else "disabled"
        term = "-" if row["term"] is None else f"{row['term']} ({row['election']})"
        lines.append((row["name"], row["schedule"], nxt, _table_time(row["last_fire_time"]),
                      term) + ((row["source"],) if sources else ()))
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


def _store(ctx: click.Context) -> ScheduleStore:
    return ScheduleStore.for_app(_app(ctx))


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
    _check_schedule_choice(cron_expr, tz, every)
    try:
        sched: Any = cron(cron_expr, tz=tz) if cron_expr is not None else every
        entry = _store(ctx).add(name, task, sched, args=_json_option("--args", args_json, list),
                                kwargs=_json_option("--kwargs", kwargs_json, dict),
                                options=_json_option("--options", options_json, dict),
                                enabled=not disabled, replace_existing=replace_existing)
    except EntryExistsError:
        raise click.UsageError(f"runtime entry {name!r} already exists; pass --replace to "
                               "overwrite it") from None
    except (EntryError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"added {entry.name}: {entry.describe_schedule()}")


@schedule.command(name="remove", help="Remove a runtime entry (and its progress).")
@click.argument("name")
@click.pass_context
def schedule_remove(ctx: click.Context, name: str) -> None:
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
    try:
        entry = _store(ctx).enable(name) if enabled else _store(ctx).disable(name)
    except EntryError as exc:
        raise click.UsageError(str(exc)) from None
    kind = "runtime entry" if entry.runtime else "beat_schedule entry"
    click.echo(f"{'enabled' if enabled else 'disabled'} {name} ({kind})")


def _check_schedule_choice(cron_expr: str | None, tz: str | None, every: float | None) -> None:
    """--cron or --every, each with only the options that mean something for it."""
    if (cron_expr is None) == (every is None):
        raise click.UsageError("give exactly one of --cron or --every")
    if every is not None and tz is not None:
        raise click.UsageError("--tz applies to --cron only; --every counts seconds, "
                               "whatever the time zone")
    if every is not None and not (math.isfinite(every) and every > 0):
        raise click.UsageError(f"--every must be a positive number of seconds, got {every:g}")


def _json_option(option: str, text: str, kind: type[list[Any]] | type[dict[str, Any]]) -> Any:
    """A JSON option's value, or an error naming the option (not the entry it
    would have become)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.UsageError(f"{option} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, kind):
        wanted = "a JSON list, e.g. '[1, \"a\"]'" if kind is list else \
            "a JSON object, e.g. '{\"key\": 1}'"
        raise click.UsageError(f"{option} must be {wanted}; got {text!r}")
    return value
