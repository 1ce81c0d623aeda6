"""The shipped alert rules (docs/prometheus-rules.yaml) under ``promtool test rules``.

Each alert fires on the situation it names and stays quiet otherwise.  The
transitions storm is checked on what the exporter now serves: every replica's
``celery_leader_transitions_total{reason="acquired"}`` reads 0 from start-up,
then 1 at its first leadership, and ``increase()`` counts that first one.  A
series that starts absent and then reads 1 (what /metrics served before) counts
nothing: the last test keeps that reason written down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.promtool import run_rule_tests, series, storm_sum

NAME = "app"
STEP = "15s"
PER_MINUTE = 4  # samples per minute at STEP


def firing(alert: str, eval_time: str, **labels: str) -> dict[str, Any]:
    """A check that ``alert`` is firing at ``eval_time`` (through ALERTS, so the
    annotations' rendered values need not be spelt out), or is not (no labels)."""
    samples = ([{"labels": "{" + ",".join(
        f'{key}="{value}"' for key, value in {"__name__": "ALERTS", "alertname": alert,
                                               "alertstate": "firing", **labels}.items())
        + "}", "value": 1}] if labels else [])
    return {"expr": f'ALERTS{{alertname="{alert}",alertstate="firing"}}',
            "eval_time": eval_time, "exp_samples": samples}


def acquired(replica: int, values: list[float | None]) -> dict[str, str]:
    return {"series": f'celery_leader_transitions_total{{name="{NAME}",reason="acquired",'
                      f'instance="replica-{replica}"}}',
            "values": series(values)}


def first_leaderships(replicas: int, before: float | None) -> list[dict[str, str]]:
    """Replica i reads ``before`` until minute i + 1, then 1 (its first leadership)."""
    return [acquired(i, [before] * ((i + 1) * PER_MINUTE) + [1.0] * (12 * PER_MINUTE))
            for i in range(replicas)]


def test_a_replicas_first_leadership_is_counted(tmp_path: Path) -> None:
    run_rule_tests(tmp_path, [{
        "interval": STEP,
        "input_series": [acquired(0, [0.0] * (2 * PER_MINUTE) + [1.0] * (4 * PER_MINUTE))],
        "promql_expr_test": [{"expr": f"{storm_sum()} > bool 0", "eval_time": "4m",
                              "exp_samples": [{"labels": f'{{name="{NAME}"}}', "value": 1}]}],
    }])


def test_the_storm_alert_fires_on_six_first_leaderships(tmp_path: Path) -> None:
    """Six replicas that each lead for the first time within 15 minutes: a storm."""
    run_rule_tests(tmp_path, [{
        "interval": STEP,
        "input_series": first_leaderships(6, before=0.0),
        "promql_expr_test": [firing("CeleryLeaderTransitionsStorm", "5m"),
                             firing("CeleryLeaderTransitionsStorm", "8m", name=NAME,
                                    severity="warning")],
    }])


def test_a_counter_that_appears_at_one_is_not_counted(tmp_path: Path) -> None:
    """Why every counter is exported at 0 from start-up."""
    run_rule_tests(tmp_path, [{
        "interval": STEP,
        "input_series": first_leaderships(6, before=None),
        "promql_expr_test": [firing("CeleryLeaderTransitionsStorm", "8m")],
    }])


def test_no_leader_fires_after_30_seconds_without_one(tmp_path: Path) -> None:
    def is_leader(replica: int, values: list[float]) -> dict[str, str]:
        return {"series": f'celery_leader_is_leader{{name="{NAME}",instance="r{replica}"}}',
                "values": series(values)}

    # r0 leads for 2 minutes, then nobody does.
    run_rule_tests(tmp_path, [{
        "interval": STEP,
        "input_series": [is_leader(0, [1.0] * 8 + [0.0] * 8), is_leader(1, [0.0] * 16)],
        "promql_expr_test": [firing("CeleryLeaderNoLeader", "2m"),
                             firing("CeleryLeaderNoLeader", "2m15s"),
                             firing("CeleryLeaderNoLeader", "2m45s", name=NAME,
                                    severity="critical")],
    }])


def test_pending_ticks_stuck_fires_after_five_minutes(tmp_path: Path) -> None:
    pending = {"series": f'celery_leader_schedule_pending_ticks{{name="{NAME}",instance="r0"}}',
               "values": series([0.0] * 4 + [3.0] * (7 * PER_MINUTE))}
    run_rule_tests(tmp_path, [{
        "interval": STEP,
        "input_series": [pending],
        "promql_expr_test": [firing("CeleryLeaderPendingTicksStuck", "4m"),
                             firing("CeleryLeaderPendingTicksStuck", "6m30s", name=NAME,
                                    severity="warning")],
    }])


def test_schedule_late_fires_after_ten_minutes_of_late_ticks(tmp_path: Path) -> None:
    """Every tick 5-10 s late: p99 about 9.95 s, above the 5 s threshold."""
    def bucket(le: str, values: list[float]) -> dict[str, str]:
        return {"series": "celery_leader_schedule_dispatch_lateness_seconds_bucket"
                          f'{{name="{NAME}",instance="r0",le="{le}"}}',
                "values": series(values)}

    samples = 14 * PER_MINUTE
    ticks = [float(n) for n in range(samples)]
    run_rule_tests(tmp_path, [{
        "interval": STEP,
        "input_series": [bucket("5.0", [0.0] * samples), bucket("10.0", ticks),
                         bucket("+Inf", ticks)],
        "promql_expr_test": [firing("CeleryLeaderScheduleLate", "9m"),
                             firing("CeleryLeaderScheduleLate", "12m", name=NAME,
                                    severity="warning")],
    }])
