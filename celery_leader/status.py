"""What the health port shows besides ``/healthz``: ``/metrics`` (Prometheus),
``/status`` (JSON) and ``/`` (a self-contained HTML page that reloads itself),
on workers and standalone beats alike.

Everything here is read-only.  Each replica also records itself, every few
seconds, in ``<prefix>:{<name>}:replicas`` (identity -> role, term, when), so
any replica's page can list the replicas of its election; each forgets the
replicas not heard from for ``forget_after``, so the hash holds the live
replicas and those gone within that time.  Every replica's page shows the
schedule as Redis holds it, whoever dispatches it.

No Redis URL (nor any other setting that may carry a password) is shown.
"""

from __future__ import annotations

import contextlib
import html
import json
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from .election.config import ConfigurationError
from .election.elector import LeaderElector
from .election.healthz import Body, HealthzAdaptor, HealthzServer, PageRoute, Route, serve_healthz
from .election.metrics import (
    METRICS_EXTRA_MISSING,
    Collect,
    Family,
    election_families,
    render,
)
from .election.redact import secret_safe_logger
from .election.redislock import RedisLock, as_text
from .schedule.runner import ScheduleRunner
from .schedule.store import ScheduleStore
from .taskstats import TaskStats

log = secret_safe_logger(__name__)

REPLICAS_SUFFIX = "replicas"
MAX_ENTRIES_SHOWN = 200  # the page and /status list at most this many entries
REFRESH_SECONDS = 2
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def _iso(seconds: float | None) -> str | None:
    if not seconds:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


class ReplicaRegistry:
    """Each replica's heartbeat in its election's slot (informational, not fenced)."""

    def __init__(self, lock: RedisLock, identity: str, interval: float) -> None:
        # Bound: one field per replica of the election; silent ones are dropped by
        # the next reader after forget_after.
        self.lock = lock
        self.identity = identity
        self.interval = interval
        self.key = lock.key(REPLICAS_SUFFIX)
        # Forgotten (by the next reader) after this long without a heartbeat.
        self.forget_after = max(30.0, 10 * interval)

    def beat(self, leading: bool, term: int) -> None:
        record = json.dumps({"role": "leader" if leading else "follower", "term": term,
                             "at_ms": int(time.time() * 1000)})
        try:
            self.lock.client.hset(self.key, self.identity, record)
        except Exception as exc:  # Redis down: the election reports it already
            log.debug("celery-leader: cannot record this replica: %s", exc)

    def run(self, stop: threading.Event, state: Callable[[], tuple[bool, int]]) -> None:
        forget_at = 0.0
        while not stop.is_set():
            self.beat(*state())
            if time.monotonic() >= forget_at:
                # INVARIANT: a replica killed without its hdel is forgotten by the living
                # ones even if no one reads the page: the hash holds the replicas of
                # the last forget_after seconds, not every one that ever ran.
                with contextlib.suppress(Exception):
                    self.replicas()
                forget_at = time.monotonic() + self.forget_after
            stop.wait(self.interval)
        with contextlib.suppress(Exception):  # else forgotten once the key expires
            self.lock.client.hdel(self.key, self.identity)

    def replicas(self) -> list[dict[str, Any]]:
        now = time.time()
        seen = []
        for raw_name, raw in (self.lock.client.hgetall(self.key) or {}).items():
            try:
                data = json.loads(raw)
                age = now - int(data["at_ms"]) / 1000
            except (ValueError, KeyError, TypeError):
                continue
            if age > self.forget_after:  # gone: forgotten (commands the ACL allows)
                with contextlib.suppress(Exception):
                    self.lock.client.hdel(self.key, raw_name)
                continue
            seen.append({"identity": as_text(raw_name), "role": str(data.get("role")),
                         "term": data.get("term"), "seen_seconds_ago": round(max(age, 0), 1),
                         "stale": age > 3 * self.interval})
        return sorted(seen, key=lambda r: (r["role"] != "leader", r["identity"]))


class StatusSource:
    """One replica's view: its elector, the schedule as Redis holds it (``store``),
    what its own schedule runner counted (if it has one), its leader-only task
    counters (a worker's)."""

    def __init__(self, name: str, identity: str, elector: LeaderElector,
                 registry: ReplicaRegistry, store: ScheduleStore,
                 scheduler: ScheduleRunner | None, task_stats: TaskStats | None) -> None:
        self.name = name
        self.identity = identity
        self.elector = elector
        self.registry = registry
        self.store = store
        self.scheduler = scheduler
        self.task_stats = task_stats

    # -- /metrics --------------------------------------------------------------

    def collectors(self) -> list[Collect]:
        collectors: list[Collect] = [lambda: election_families(self.name, self.elector)]
        if self.scheduler is not None:
            collectors.append(self.scheduler.families)
        if self.task_stats is not None:
            stats = self.task_stats
            collectors.append(lambda: stats.families(self.name))
        return collectors

    def families(self) -> list[Family]:
        return [family for collect in self.collectors() for family in collect()]

    def metrics_route(self) -> tuple[int, Any]:
        try:
            data = render(self.collectors())
        except ImportError:
            return 501, Body("text/plain; charset=utf-8", METRICS_EXTRA_MISSING.encode())
        return 200, Body(PROMETHEUS_TEXT, data)

    # -- /status ---------------------------------------------------------------

    def status(self, limit: int = MAX_ENTRIES_SHOWN) -> dict[str, Any]:
        elector = self.elector
        record = elector.observed_record()
        holder = record.holder_identity if record else ""
        term = record.term if record else 0
        try:
            replicas = self._with_live_roles(self.registry.replicas(), holder, term)
        except Exception as exc:
            replicas = [{"error": type(exc).__name__}]
        election = {
            "name": self.name,
            "leader": holder or None,
            "term": record.term if record else None,
            "leader_since": _iso(record.acquire_time) if record and holder else None,
            "lease_remaining_seconds": round(elector.lease_remaining(), 3),
            "this_replica": {"identity": self.identity, "is_leader": elector.is_leader(),
                             "leading_since": _iso(elector.stats.leading_since)},
            "replicas": replicas,
        }
        transitions = [{"at": _iso(t.at), "event": t.event, "identity": t.identity,
                        "term": t.term, "reason": t.reason or None}
                       for t in reversed(elector.stats.recent)]
        return {"generated_at": _iso(time.time()), "election": election,
                "schedule": self._schedule(limit, holder, term), "transitions": transitions}

    def _with_live_roles(self, replicas: list[dict[str, Any]],
                         holder: str, term: int) -> list[dict[str, Any]]:
        """Roles from the lease this replica sees now, not from heartbeats that may
        predate a fail-over, so the table agrees with the header: the holder leads
        with the lease's term; a replica whose last heartbeat said it led an older
        term is a former leader (dead, or not yet heard as a follower); this
        replica's own row is its live state."""
        rows = []
        for row in replicas:
            if holder and row["identity"] == holder:
                row = dict(row, role="leader", term=term)
            elif row["role"] == "leader":
                row = dict(row, role="former leader")  # its term: the one it led
            else:
                row = dict(row, role="follower")
            if row["identity"] == self.identity:
                leading = self.elector.is_leader()
                row.update(role="leader" if leading else "follower",
                           term=self.elector.term if leading else 0,
                           seen_seconds_ago=0.0, stale=False)
            rows.append(row)
        order = {"leader": 0, "follower": 1}
        return sorted(rows, key=lambda r: (order.get(r["role"], 2), r["identity"]))

    def _schedule(self, limit: int, holder: str, term: int) -> dict[str, Any]:
        store, runner = self.store, self.scheduler
        try:
            rows = store.report()
            owner = store.owner()
            pending = int(store.client.hlen(store.pending_key))
        except Exception as exc:  # Redis down, a bad beat_schedule: say so, keep the rest
            return {"runner_here": runner is not None, "error": type(exc).__name__}
        lateness = runner.stats.last_lateness if runner is not None else {}
        for row in rows:
            late = lateness.get(row["name"])
            row["lateness_seconds"] = round(late, 3) if late is not None else None
        last_ticks = sorted((r for r in rows if r["last_fire_time"]),
                            key=lambda r: r["last_fire_time"], reverse=True)[:10]
        sent_here = [] if runner is None else [
            {"entry": t.entry, "fire_time": _iso(t.fire_time), "sent_at": _iso(t.sent_at),
             "lateness_seconds": round(t.lateness, 3), "term": t.term}
            for t in reversed(runner.stats.recent)]
        dispatcher = None
        if owner is not None:
            dispatcher = {key: owner.get(key) for key in ("identity", "election", "term",
                                                          "mode", "leading")}
            if owner.get("election") == self.name:
                # Judged against the lease the header shows, so the page never says
                # one replica leads while another dispatches for a live term.
                dispatcher["leading"] = (owner.get("identity") == holder
                                         and owner.get("term") == term)
        return {
            "runner_here": runner is not None,
            "dispatcher": dispatcher,
            "entries_total": len(rows),
            "entries": rows[:limit],
            "truncated": len(rows) > limit,
            "last_ticks": [{"entry": r["name"], "fire_time": r["last_fire_time"],
                            "term": r["term"], "election": r["election"]}
                           for r in last_ticks],
            "sent_here": sent_here,
            "pending_ticks": pending,
        }

    def status_route(self) -> tuple[int, Any]:
        return 200, self.status()

    def page_route(self, token: str = "") -> tuple[int, Any]:
        return 200, Body("text/html; charset=utf-8",
                         render_page(self.status(), token).encode())

    def routes(self) -> dict[str, Route]:
        return {"/status": self.status_route, "/metrics": self.metrics_route}

    def pages(self) -> dict[str, PageRoute]:
        return {"/": self.page_route}


def serve_status(adaptor: HealthzAdaptor, source: StatusSource, port: int, host: str,
                 token: str | None, routes: dict[str, Route] | None = None) -> HealthzServer:
    """``/healthz``, ``/metrics``, ``/status``, the page (and ``routes``) on the
    health port; a port that cannot be served is a ConfigurationError naming it."""
    try:
        return serve_healthz(adaptor, port, host=host, routes={**(routes or {}),
                                                               **source.routes()},
                             token=token, pages=source.pages())
    except OSError as exc:  # before the elector starts: this replica never leads
        raise ConfigurationError(f"leader_healthz_port {port} cannot be served on "
                                 f"{host}: {exc.strerror or exc}") from None


# -- the page -------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#f7f8fa}
h1{font-size:20px;margin:0 0 .2em}h2{font-size:16px;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:40em}
th,td{border:1px solid #d5d9e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}.leader{color:#0a7d32;font-weight:600}.muted{color:#6b7280}
.card{display:inline-block;background:#fff;border:1px solid #d5d9e0;padding:8px 14px;
margin:0 10px 10px 0;min-width:9em}.card b{display:block;font-size:18px}
"""


def _cell(value: Any) -> str:
    if value is None or value == "":
        return '<td class="muted">-</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], empty: str) -> str:
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{body}</table>"


def _dispatcher_line(owner: dict[str, Any] | None) -> str:
    """Who dispatches the schedule, as the record in Redis and the lease say."""
    if owner is None:
        return "no leader has dispatched the schedule yet"
    who = (f"<b>{html.escape(str(owner.get('identity')))}</b> (term "
           f"{html.escape(str(owner.get('term')))}"
           + ("" if owner.get("mode") != "beat" else
              f", standalone beat election {html.escape(str(owner.get('election')))}")
           + ")")
    if owner.get("leading"):
        return f"dispatched by {who}"
    return f"last dispatched by {who}, which no longer leads: the next leader takes it over"


def render_page(status: dict[str, Any], token: str = "") -> str:
    """The status page: no script, no external resource; it reloads itself."""
    election = status["election"]
    me = election["this_replica"]
    leader = election["leader"] or "none"
    cards = [("Leader", leader), ("Term", election["term"]),
             ("Leader since", election["leader_since"]),
             ("Lease remaining", f"{election['lease_remaining_seconds']:.1f} s"),
             ("This replica", f"{me['identity']} ({'leader' if me['is_leader'] else 'follower'})")]
    card_html = "".join(
        f'<div class="card" id="{html.escape(title.lower().replace(" ", "-"))}">'
        f'<span class="muted">{html.escape(title)}</span><b>{html.escape(str(value))}</b></div>'
        for title, value in cards)
    replicas = _table(["identity", "role", "term", "seen (s ago)"],
                      ([r.get("identity"),
                        f"{r.get('role')} (silent: gone?)" if r.get("stale") else r.get("role"),
                        r.get("term"), r.get("seen_seconds_ago")]
                       for r in election["replicas"]),
                      "no replica has recorded itself yet")
    transitions = _table(["at", "event", "identity", "term", "reason"],
                         ([t["at"], t["event"], t["identity"], t["term"], t["reason"]]
                          for t in status["transitions"]), "none seen by this replica")
    schedule = status["schedule"]
    if "error" in schedule:
        schedule_html = f'<p>schedule unavailable: {html.escape(schedule["error"])}</p>'
    else:
        schedule_html = (
            f"<p>{_dispatcher_line(schedule['dispatcher'])}; "
            f'{schedule["entries_total"]} entries, {schedule["pending_ticks"]} pending ticks'
            + (f"; the first {len(schedule['entries'])} shown" if schedule["truncated"] else "")
            + "</p>"
            + _table(["entry", "task", "schedule", "enabled", "next fire", "last fire",
                      "term", "lateness (s)"],
                     ([e["name"], e["task"], e["schedule"], e["enabled"], e["next_fire_time"],
                       e["last_fire_time"], e["term"], e["lateness_seconds"]]
                      for e in schedule["entries"]), "no entries")
            + "<h2>Last ticks</h2>"
            + _table(["entry", "fire time", "term", "election"],
                     ([t["entry"], t["fire_time"], t["term"], t["election"]]
                      for t in schedule["last_ticks"]), "no tick yet"))
    # The token the page was opened with, kept by its links (a browser sends no header).
    query = f"?token={quote(token, safe='')}" if token else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<link rel="icon" href="data:,">'
        f"<title>celery-leader: {html.escape(election['name'])}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>celery-leader election <code>{html.escape(election['name'])}</code></h1>"
        f'<p class="muted">as seen by {html.escape(me["identity"])} at '
        f'{html.escape(str(status["generated_at"]))}; reloads every {REFRESH_SECONDS} s. '
        f'JSON: <a href="status{query}">/status</a>, '
        f'Prometheus: <a href="metrics{query}">/metrics</a></p>'
        f"{card_html}<h2>Replicas</h2>{replicas}<h2>Schedule</h2>{schedule_html}"
        f"<h2>Transitions seen by this replica</h2>{transitions}</body></html>\n")
