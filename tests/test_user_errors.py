"""Mistakes a user makes, answered in the user's own words: a misspelt setting
(one warning naming the closest valid name), an unknown key in a schedule entry,
`celery leader schedule add` options, cron expressions, a config module that
builds an invalid ``cron(...)``, and the command line run without ``-A``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab
from click.testing import CliRunner, Result

from celery_leader import cron
from celery_leader import settings as settings_module
from celery_leader.cli import leader
from celery_leader.election.config import ConfigurationError
from celery_leader.entries import EntryError, entry_from_config, entry_from_json
from celery_leader.scheduler import ScheduleStore
from celery_leader.settings import read_settings
from tests.celery_procs import Cluster
from tests.sched_procs import ROOT

BROKER = "redis://127.0.0.1:6390/2"


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the once-per-process warnings as a new process would."""
    monkeypatch.setattr(settings_module, "_warned_unknown", set(), raising=False)
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "celery_leader.settings" and record.levelno == logging.WARNING]


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LEADER_", "CELERY_", "CRON_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def stderr_lines(stderr: str) -> list[str]:
    """stderr lines, minus Celery's own SecurityWarning block when tests run as root."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if any("SecurityWarning" in line for line in lines):
        first = next(i for i, line in enumerate(lines) if "SecurityWarning" in line)
        # The block ends with the source line warnings shows: the call that warned
        # (Celery 5.3: warnings.warn(SecurityWarning(...; later: its helper's call).
        last = next(i for i, line in enumerate(lines) if i > first and (
            "_warn_or_raise_security_error" in line or "warnings.warn(SecurityWarning" in line))
        lines = lines[:first] + lines[last + 1:]
    return lines


# ---------------------------------------------------------------- misspelt settings


def test_a_misspelt_setting_warns_once_naming_the_closest_valid_one(
        caplog: pytest.LogCaptureFixture) -> None:
    app = Celery("proj", broker=BROKER, set_as_current=False)
    app.conf.update(leader_lease_duraton=5, leader_name="billing")
    with caplog.at_level(logging.WARNING, logger="celery_leader.settings"):
        settings = read_settings(app)
        read_settings(app)  # worker, beat and the API all read them: still one warning
    assert warnings_logged(caplog) == [
        "celery-leader: 'leader_lease_duraton' is not a celery-leader setting and is "
        "ignored; did you mean 'leader_lease_duration'?"]
    assert settings.lease_duration == 15.0  # the typo runs on the default: hence the warning
    assert settings.name == "billing"


def test_django_spelling_is_checked_too_and_other_settings_are_left_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    config = SimpleNamespace(CELERY_BROKER_URL=BROKER, CELERY_LEADER_RENEW_DEADLNE=3,
                             CELERY_LEADER_XYZZY=1, CELERY_LEADER_NAME="billing",
                             CELERY_TASK_DEFAULT_QUEUE="q")
    app = Celery("proj", set_as_current=False)
    app.config_from_object(config, namespace="CELERY")
    with caplog.at_level(logging.WARNING, logger="celery_leader.settings"):
        read_settings(app)
    renew, xyzzy = warnings_logged(caplog)
    assert renew == ("celery-leader: 'CELERY_LEADER_RENEW_DEADLNE' is not a celery-leader "
                     "setting and is ignored; did you mean 'CELERY_LEADER_RENEW_DEADLINE'?")
    # Nothing close: every valid name, so the user can find the one meant.
    assert xyzzy.startswith("celery-leader: 'CELERY_LEADER_XYZZY' is not a celery-leader "
                            "setting and is ignored; valid names: CELERY_LEADER_BEAT, ")
    assert "CELERY_LEADER_WAIT_TIMEOUT" in xyzzy


def test_every_documented_setting_is_known_and_every_known_one_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(leader_[a-z_]+)` \|", readme, flags=re.M))
    assert documented == settings_module.KNOWN_SETTINGS


@pytest.mark.integration
def test_a_real_worker_logs_the_typo_once_and_runs(tmp_path: Path, redis_url: str,
                                                  election_name: str) -> None:
    cluster = Cluster(tmp_path, redis_url, election_name, app="tests.apps.config_app")
    try:
        [worker] = cluster.start(1, "solo", env={"CONFIG_JSON": json.dumps(
            {"CELERY_LEADER_LEASE_DURATON": 5})})
        cluster.wait_ready([worker], 60)
        warning = ("celery-leader: 'CELERY_LEADER_LEASE_DURATON' is not a celery-leader "
                   "setting and is ignored; did you mean 'CELERY_LEADER_LEASE_DURATION'?")
        assert worker.log().count(warning) == 1, worker.log()
        assert worker.alive()
    finally:
        cluster.stop()
        cluster.events.close()


# ---------------------------------------------------------------- schedule entries


def test_an_unknown_entry_key_is_rejected_like_an_unknown_option() -> None:
    app = Celery("proj", broker=BROKER, set_as_current=False)
    with pytest.raises(EntryError) as key_error:
        entry_from_config("nightly", {"task": "proj.t", "schedule": 5,
                                      "optons": {"queue": "q"}}, app)
    assert str(key_error.value).startswith(
        "beat_schedule entry 'nightly': unknown key 'optons' (did you mean 'options'?); "
        "valid: args, catch_up, enabled, kwargs, misfire_grace, options, relative, "
        "schedule, task")
    with pytest.raises(EntryError) as option_error:
        entry_from_config("nightly", {"task": "proj.t", "schedule": 5,
                                      "options": {"queu": "q"}}, app)
    assert str(option_error.value).startswith(
        "beat_schedule entry 'nightly': unknown option 'queu' (did you mean 'queue'?); valid: ")
    # A runtime entry read back from Redis is held to the same keys.
    stored = json.dumps({"task": "proj.t", "schedule": {"type": "interval", "seconds": 5},
                         "enabeld": False})
    with pytest.raises(EntryError, match=r"^runtime entry 'rt': unknown key 'enabeld' "
                                         r"\(did you mean 'enabled'\?\)"):
        entry_from_json("rt", stored, app)


# ---------------------------------------------------------------- cron expressions


@pytest.mark.parametrize(("expr", "reason"), [
    ("61 * * * *", "minute field '61' is out of range (0-59)"),
    ("0 24 * * *", "hour field '24' is out of range (0-23)"),
    ("0 0 0 * *", "day-of-month field '0' is out of range (1-31)"),
    ("0 0 * 13 *", "month field '13' is out of range (1-12 or jan-dec)"),
    ("0 0 * * 8", "day-of-week field '8' is out of range (0-7 or sun-sat)"),
    ("60 * * * * *", "second field '60' is out of range (0-59)"),
    ("*/0 * * * *", "minute field '*/0' has an invalid step (0-59)"),
    ("0 0 * foo *", "month field 'foo' is not valid (1-12 or jan-dec)"),
    ("0 0 30 2 *", "it matches no date"),
])
def test_an_invalid_cron_names_the_field_as_written(expr: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        cron(expr)
    assert str(caught.value) == f"invalid cron expression {expr!r}: {reason}"


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_an_invalid_cron_in_a_config_module_stops_with_one_line(
        tmp_path: Path, redis_url: str, command: str) -> None:
    args = (["worker", "--pool", "solo"] if command == "worker"
            else ["beat", "-S", "leader", "-s", str(tmp_path / "beat-schedule")])
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.cron_config_app", *args],
        cwd=ROOT, env=clean_env(REDIS_URL=redis_url, CRON_EXPR="61 * * * *"), text=True,
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert stderr_lines(result.stderr) == [
        "celery-leader: configuration error: invalid cron expression '61 * * * *': "
        "minute field '61' is out of range (0-59)"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_bad_setting_stops_standalone_beat_with_one_line(tmp_path: Path,
                                                          redis_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.config_app", "beat", "-S", "leader",
         "-s", str(tmp_path / "beat-schedule")], cwd=ROOT, text=True, capture_output=True,
        env=clean_env(REDIS_URL=redis_url,
                      CONFIG_JSON=json.dumps({"CELERY_LEADER_RETRY_PERIOD": "often"})),
        timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert stderr_lines(result.stderr) == [
        "celery-leader: configuration error: leader_retry_period must be a number of "
        "seconds, got 'often'"], result.stderr


# ---------------------------------------------------------------- the command line


@pytest.fixture
def cli_app(redis_url: str, election_name: str) -> Iterator[Celery]:
    app = Celery("cli_errors", broker=redis_url, set_as_current=False)
    app.conf.update(leader_name=election_name)
    yield app


def leader_cli(app: Celery, *args: str) -> Result:
    """``celery -A <app> leader <args>``, through click's runner."""
    return CliRunner().invoke(leader, list(args), obj=SimpleNamespace(app=app))


def stored_entries(app: Celery) -> dict[Any, Any]:
    store = ScheduleStore.for_app(app)
    try:
        return dict(store.client.hgetall(store.entries_key))
    finally:
        store.client.close()


@pytest.mark.parametrize(("args", "message"), [
    (["--every", "5", "--args", "{bad"],
     "--args is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
     "column 2 (char 1)): '{bad'"),
    (["--every", "5", "--args", '{"a": 1}'],
     "--args must be a JSON list, e.g. '[1, \"a\"]'; got '{\"a\": 1}'"),
    (["--every", "5", "--kwargs", "[1]"],
     "--kwargs must be a JSON object, e.g. '{\"key\": 1}'; got '[1]'"),
    (["--every", "5", "--options", "nope"],
     "--options is not valid JSON (Expecting value: line 1 column 1 (char 0)): 'nope'"),
    (["--every", "5", "--tz", "Europe/Paris"],
     "--tz applies to --cron only; --every counts seconds, whatever the time zone"),
    (["--every", "0"], "--every must be a positive number of seconds, got 0"),
    (["--cron", "61 * * * *"],
     "invalid cron expression '61 * * * *': minute field '61' is out of range (0-59)"),
    (["--every", "5", "--options", '{"queu": "q"}'],
     "runtime entry 'job': unknown option 'queu' (did you mean 'queue'?); valid: "),
])
def test_schedule_add_errors_name_the_option(cli_app: Celery, args: list[str],
                                             message: str) -> None:
    result = leader_cli(cli_app, "schedule", "add", "job", "--task", "proj.job", *args)
    assert result.exit_code == 2, result.output
    assert f"Error: {message}" in result.output
    assert "beat_schedule" not in result.output and "[61" not in result.output
    assert stored_entries(cli_app) == {}


def test_schedule_add_of_an_existing_entry_points_to_replace(cli_app: Celery) -> None:
    assert leader_cli(cli_app, "schedule", "add", "job", "--task", "proj.job",
                      "--every", "5").exit_code == 0
    result = leader_cli(cli_app, "schedule", "add", "job", "--task", "proj.job",
                        "--every", "7")
    assert result.exit_code == 2, result.output
    assert "Error: runtime entry 'job' already exists; pass --replace to overwrite it" \
        in result.output
    assert "update()" not in result.output
    result = leader_cli(cli_app, "schedule", "add", "job", "--task", "proj.job",
                        "--every", "7", "--replace")
    assert (result.exit_code, result.output) == (0, "added job: every 7s\n")


def test_the_command_line_without_an_app_asks_for_dash_a() -> None:
    result = subprocess.run([sys.executable, "-m", "celery", "leader", "status"], cwd=ROOT,
                            env=clean_env(), text=True, capture_output=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: no Celery app given: name yours with -A, as in "
        "'celery -A proj leader status'")


@pytest.mark.parametrize("spelling", ["plain", "django"])
def test_strict_settings_make_a_misspelt_setting_an_error(spelling: str) -> None:
    if spelling == "plain":
        app = Celery("proj", broker=BROKER, set_as_current=False)
        app.conf.update(leader_lease_duraton=5, leader_strict_settings=True)
        typo, meant = "leader_lease_duraton", "leader_lease_duration"
    else:
        config = SimpleNamespace(CELERY_BROKER_URL=BROKER, CELERY_LEADER_RENEW_DEADLNE=3,
                                 CELERY_LEADER_STRICT_SETTINGS="true")
        app = Celery("proj", set_as_current=False)
        app.config_from_object(config, namespace="CELERY")
        typo, meant = "CELERY_LEADER_RENEW_DEADLNE", "CELERY_LEADER_RENEW_DEADLINE"
    with pytest.raises(ConfigurationError) as caught:
        read_settings(app)
    assert str(caught.value) == (f"{typo!r} is not a celery-leader setting (did you mean "
                                 f"{meant!r}?); leader_strict_settings makes this an error")


@pytest.mark.integration
def test_a_real_worker_with_strict_settings_stops_on_a_typo(tmp_path: Path, redis_url: str,
                                                             election_name: str) -> None:
    cluster = Cluster(tmp_path, redis_url, election_name, app="tests.apps.config_app")
    try:
        [worker] = cluster.start(1, "solo", split_stderr=True, env={"CONFIG_JSON": json.dumps(
            {"CELERY_LEADER_STRICT_SETTINGS": True, "CELERY_LEADER_LEASE_DURATON": 5})})
        assert worker.wait_exit(45) == 2, worker.log()
        assert worker.stderr_path is not None
        assert stderr_lines(worker.stderr_path.read_text()) == [
            "celery-leader: configuration error: 'CELERY_LEADER_LEASE_DURATON' is not a "
            "celery-leader setting (did you mean 'CELERY_LEADER_LEASE_DURATION'?); "
            "leader_strict_settings makes this an error"]
    finally:
        cluster.stop()
        cluster.events.close()


def test_the_cli_shows_a_crontab_as_its_cron_fields(cli_app: Celery) -> None:
    cli_app.conf.beat_schedule = {
        "every-minute": {"task": "proj.job", "schedule": crontab()},
        "office-hours": {"task": "proj.job", "schedule": crontab(
            minute="*/15", hour="9-17", day_of_week="mon-fri")},
        "twice-hourly": {"task": "proj.job", "schedule": crontab(minute={30, 0})},
    }
    table = leader_cli(cli_app, "schedule")
    assert table.exit_code == 0, table.output
    as_json = leader_cli(cli_app, "schedule", "--json")
    rows = {row["name"]: row["schedule"] for row in json.loads(as_json.output)}
    assert rows == {"every-minute": "* * * * *", "office-hours": "*/15 9-17 * * mon-fri",
                    "twice-hourly": "0,30 * * * *"}
    for text in rows.values():
        assert f"  {text}  " in table.output, table.output
    assert "crontab" not in table.output + as_json.output
