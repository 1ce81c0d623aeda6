"""The metric families (names, conventions), the dashboard and alert rules that
use them, the missing-extra answer of /metrics, and the shared task counters."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_leader.election.config import LeaderCallbacks, LeaderElectionConfig
from celery_leader.election.elector import LeaderElector
from celery_leader.election.metrics import (
    METRICS_EXTRA_MISSING,
    Family,
    Histogram,
    election_families,
    render,
)
from celery_leader.schedule.metrics import ScheduleStats
from celery_leader.taskstats import DUPLICATE, STARTED, TaskStats
from tests.fakes import FakeStore

DOCS = Path(__file__).resolve().parent.parent / "docs"


def all_families() -> list[Family]:
    elector = LeaderElector(LeaderElectionConfig(
        lock=FakeStore().lock("a"), callbacks=LeaderCallbacks(lambda stop: None, lambda: None),
        lease_duration=1.0, renew_deadline=0.75, retry_period=0.25, name="e"))
    return [*election_families("e", elector), *ScheduleStats().families("e", lambda: 0),
            *TaskStats().families("e")]


def exported_names() -> set[str]:
    names = set()
    for family in all_families():
        if family.kind == "histogram":
            names |= {family.name + suffix for suffix in ("", "_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def test_names_follow_prometheus_conventions() -> None:
    for family in all_families():
        assert re.fullmatch(r"celery_leader_[a-z_]+", family.name), family.name
        assert family.name.endswith("_total") == (family.kind == "counter"), family.name
        if family.kind == "histogram" or "seconds" in family.name:
            assert family.name.endswith(("_seconds", "_seconds_total")) or \
                family.name.endswith("_timestamp_seconds") or \
                "_seconds_" in family.name, family.name
        assert "name" in family.labels  # the election/schedule; entry and task opt-in only
        assert not {"entry", "task"} & set(family.labels), family.name


def test_every_metric_of_the_dashboard_and_the_rules_exists() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    used = {target["expr"] for panel in dashboard["panels"] for target in panel["targets"]}
    used |= {v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"}
    rules = (DOCS / "prometheus-rules.yaml").read_text()
    names = set(re.findall(r"celery_leader_[a-z_]+", " ".join(used) + rules))
    assert names, "no metric found in the dashboard"
    assert names <= exported_names(), sorted(names - exported_names())
    for alert in ("CeleryLeaderNoLeader", "CeleryLeaderTransitionsStorm",
                  "CeleryLeaderScheduleLate", "CeleryLeaderPendingTicksStuck"):
        assert f"alert: {alert}" in rules


def test_every_metric_is_documented_with_its_question() -> None:
    text = (DOCS / "metrics.md").read_text()
    for family in all_families():
        assert f"`{family.name}`" in text, family.name


def test_render_parses_and_histograms_are_cumulative() -> None:
    histogram = Histogram((0.1, 1.0))
    for observed in (0.05, 0.5, 0.5, 3.0):
        histogram.observe(observed)
    text = render([lambda: [Family("x_seconds", "histogram", "h", ("name",),
                                   {("e",): histogram}),
                            Family("y_total", "counter", "c", ("name",), {("e",): 2.0})]])
    samples = {(s.name, s.labels.get("le")): s.value
               for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    assert samples[("x_seconds_bucket", "0.1")] == 1
    assert samples[("x_seconds_bucket", "1.0")] == 3
    assert samples[("x_seconds_bucket", "+Inf")] == 4
    assert samples[("x_seconds_count", None)] == 4
    assert samples[("y_total", None)] == 2


def test_without_the_extra_the_endpoint_says_how_to_enable_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_leader.status import StatusSource
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    source = StatusSource.__new__(StatusSource)
    source.collectors = lambda: []  # type: ignore[method-assign]
    status, body = source.metrics_route()
    assert status == 501
    assert body.data.decode() == METRICS_EXTRA_MISSING
    # The package is on no index: what to install, and the extra from a checkout.
    assert "pip install prometheus-client" in METRICS_EXTRA_MISSING
    assert "pip install '/path/to/celery-leader[metrics]'" in METRICS_EXTRA_MISSING


def test_task_counters_are_shared_with_forked_children() -> None:
    stats = TaskStats(per_task=True)
    pids = []
    for task in ("a", "b", "a"):
        pid = os.fork()
        if pid == 0:  # the child counts, the parent reads
            stats.count(task, STARTED)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    stats.count("a", DUPLICATE)
    assert stats.snapshot() == {"": (3, 1, 0), "a": (2, 1, 0), "b": (1, 0, 0)}
    totals = TaskStats(per_task=False)
    totals.count("a", STARTED)
    [started, *_] = totals.families("e")
    assert started.labels == ("name",) and started.samples == {("e",): 1.0}


def test_per_entry_labels_only_when_asked_for() -> None:
    quiet, detailed = ScheduleStats(), ScheduleStats(per_entry=True)
    for stats in (quiet, detailed):
        stats.sent("every-minute@60000", term=3, now=61.5)
        stats.sent("hourly@3600000", term=3, now=3600.25)
    [dispatched, *_] = quiet.families("s", lambda: None)
    assert dispatched.samples == {("s",): 2.0}
    [dispatched, *_] = detailed.families("s", lambda: None)
    assert dispatched.samples == {("s", "every-minute"): 1.0, ("s", "hourly"): 1.0}
    assert quiet.last_lateness == {"every-minute": 1.5, "hourly": 0.25}


def test_every_counter_is_exported_at_zero_before_its_first_event() -> None:
    """increase() over a series that starts absent and then reads 1 gives 0: a
    counter that appeared at its first event hid every replica's first leadership
    from the storm alert (tests/test_prometheus_rules.py)."""
    exported = {(family.name, values): value
                for family in all_families() if family.kind == "counter"
                for values, value in family.samples.items()}
    for reason in ("acquired", "released", "lease_lost", "renew_deadline_exceeded", "stopped"):
        assert exported[("celery_leader_transitions_total", ("e", reason))] == 0
    for name in ("dispatched", "caught_up", "republished"):
        assert exported[(f"celery_leader_schedule_ticks_{name}_total", ("e",))] == 0
    for reason in ("catch_up_policy", "misfire_grace"):
        assert exported[("celery_leader_schedule_ticks_skipped_total", ("e", reason))] == 0
    for name in ("started", "duplicates_refused", "requeued"):
        assert exported[(f"celery_leader_tasks_{name}_total", ("e",))] == 0
    # Every counter family but lock errors (its labels are exception classes, known
    # only when one is raised) has a series.
    assert {family.name for family in all_families()
            if family.kind == "counter" and not family.samples} == {
        "celery_leader_lock_errors_total"}
    [lateness] = [f for f in all_families()
                  if f.name == "celery_leader_schedule_dispatch_lateness_seconds"]
    assert lateness.samples[("e",)].count == 0


def test_per_entry_counters_start_at_zero_for_known_entries() -> None:
    stats = ScheduleStats(per_entry=True)
    stats.known(["hourly"])
    families = {f.name: f for f in stats.families("s", lambda: None)}
    assert families["celery_leader_schedule_ticks_dispatched_total"].samples == {
        ("s", "hourly"): 0.0}
    assert families["celery_leader_schedule_ticks_skipped_total"].samples == {
        ("s", "hourly", "catch_up_policy"): 0.0, ("s", "hourly", "misfire_grace"): 0.0}
    stats.sent("hourly@3600000", term=1, now=3600.5)
    assert families["celery_leader_schedule_ticks_dispatched_total"].samples != \
        stats.families("s", lambda: None)[0].samples
