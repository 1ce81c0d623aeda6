"""django-celery-beat rows as the leader's entries, in-process against a real
SQLite database (the process tests run PostgreSQL and SQLite replicas)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_leader.election.config import ConfigurationError
from celery_leader.schedule.entries import NEVER
from celery_leader.settings import read_settings

UTC = timezone.utc
T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def django_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = tmp_path_factory.mktemp("django") / "db.sqlite3"
    os.environ["LEADER_TEST_DB"] = f"sqlite:{path}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_proj.settings")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    from django_celery_beat import models

    yield models


@pytest.fixture
def models(django_db: Any) -> Iterator[Any]:
    yield django_db
    django_db.PeriodicTask.objects.all().delete()


@pytest.fixture
def app(redis_url: str, election_name: str) -> Celery:
    app = Celery("t", broker=redis_url, set_as_current=False)
    app.conf.update(leader_name=election_name, leader_django_celery_beat=True,
                    leader_retry_period=0.2)
    return app


def task(models: Any, name: str, **fields: Any) -> Any:
    fields.setdefault("task", "proj.tick")
    return models.PeriodicTask.objects.create(name=name, **fields)


def entry(app: Celery, row: Any) -> Any:
    from celery_leader.contrib.django_beat import entry_from_row

    return entry_from_row(type(row).objects.get(pk=row.pk), app)[0]


def test_every_schedule_kind_and_option(models: Any, app: Celery) -> None:
    every = models.IntervalSchedule.objects.create(every=90, period="seconds")
    row = task(models, "interval", interval=every, args=json.dumps([1, "a"]),
               kwargs=json.dumps({"k": [1]}), queue="q", exchange="x", routing_key="rk",
               priority=7, headers=json.dumps({"h": "v"}), expire_seconds=30)
    got = entry(app, row)
    assert got.source == "django" and got.args == (1, "a") and got.kwargs == {"k": [1]}
    assert got.options == {"queue": "q", "exchange": "x", "routing_key": "rk",
                           "priority": 7, "headers": {"h": "v"}, "expires": 30.0}
    assert got.next_fire_after(T0) == T0 + timedelta(seconds=90)

    # crontab in its own time zone: 09:30 in New York is 14:30 UTC in January.
    tab = models.CrontabSchedule.objects.create(minute="30", hour="9",
                                                timezone="America/New_York")
    got = entry(app, task(models, "crontab", crontab=tab))
    assert got.next_fire_after(T0) == datetime(2030, 1, 1, 14, 30, tzinfo=UTC)

    sun = models.SolarSchedule.objects.create(event="sunrise", latitude=48.85, longitude=2.35)
    got = entry(app, task(models, "solar", solar=sun))
    first = got.next_fire_after(T0)
    assert T0 < first < T0 + timedelta(days=1)
    assert got.next_fire_after(first) > first + timedelta(hours=20)

    # clocked: once at its time; seen only after it, once when first seen.
    at = T0 + timedelta(minutes=5)
    clock = models.ClockedSchedule.objects.create(clocked_time=at)
    got = entry(app, task(models, "clocked", clocked=clock, one_off=True))
    assert got.first_fire_after(T0) == at and got.next_fire_after(at) == NEVER
    assert got.first_fire_after(at + timedelta(hours=1)) == at + timedelta(hours=1)

    # one_off: the schedule's first tick after the row was saved, then never.
    row = task(models, "one-off", interval=every, one_off=True)
    got = entry(app, row)
    single = row.date_changed.astimezone(UTC) + timedelta(seconds=90)
    assert abs((got.first_fire_after(T0 - timedelta(days=9999)) - single).total_seconds()) < 1e-3
    assert got.next_fire_after(single) == NEVER

    # start_time: an interval fires at the start, then every interval; expires ends it.
    start, end = T0 + timedelta(hours=1), T0 + timedelta(hours=1, seconds=200)
    got = entry(app, task(models, "window", interval=every, start_time=start, expires=end))
    assert got.first_fire_after(T0) == start
    assert got.next_fire_after(start) == start + timedelta(seconds=90)
    assert got.next_fire_after(start + timedelta(seconds=180)) == NEVER
    assert got.options["expires"] == end


def test_a_bad_row_is_skipped_with_one_line_naming_it(models: Any, app: Celery,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from celery_leader.contrib.django_beat import read_rows

    every = models.IntervalSchedule.objects.create(every=5, period="seconds")
    task(models, "good", interval=every)
    task(models, "bad-args", interval=every, args="[1,")
    tab = models.CrontabSchedule.objects.create(minute="61")
    task(models, "bad-cron", crontab=tab)
    skipped: list[str] = []
    entries, _ = read_rows(app, skipped=lambda row, exc: skipped.append(f"{row.name}: {exc}"))
    assert sorted(entries) == ["good"]
    assert len(skipped) == 2
    assert "bad-args" in skipped[0] and "args is not valid JSON" in skipped[0], skipped
    assert "bad-cron" in skipped[1], skipped


def runner_reads(source: Any) -> dict[str, Any]:
    """``source.entries()`` as the runner reads it, without the source's thread
    (the tests run its cycles)."""
    source._start = lambda: None
    return dict(source.entries())


def dispatch(redis_url: str, election_name: str, source: Any,
             *ticks: tuple[Any, datetime]) -> None:
    """Claim and send ``ticks`` as a leader's runner reading ``source`` does
    (the herd's script, which counts each sent tick in its claim)."""
    from celery_leader.schedule.herd import Claim
    from celery_leader.schedule.store import to_ms
    from tests.test_atomic_publish import Rig

    rig = Rig(redis_url, election_name)
    try:
        lock, term = rig.lead("leader")
        runner = rig.runner(lock)
        runner.source = source
        assert runner.herd.dispatch([Claim(e, to_ms(fire), True) for e, fire in ticks], term)
    finally:
        rig.close()


def test_source_rereads_only_when_last_update_moves_and_writes_progress_back(
        models: Any, app: Celery, caplog: pytest.LogCaptureFixture, redis_url: str,
        election_name: str) -> None:
    from celery_leader.contrib.django_beat import DjangoBeatSource
    from celery_leader.schedule_api import ScheduleStore

    every = models.IntervalSchedule.objects.create(every=1, period="seconds")
    row = task(models, "a", interval=every, total_run_count=5)
    store = ScheduleStore.for_app(app)
    source = DjangoBeatSource(app, store, poll=3600)
    woken: list[int] = []
    source.watch(lambda: woken.append(1))
    source.cycle()
    assert list(source._entries) == ["a"] and woken == [1]
    version = source._version

    reads: list[int] = []
    original = source._reload
    source._reload = lambda: (reads.append(1), original())[1]  # type: ignore[method-assign]
    source.cycle()  # nothing changed: the table is not read
    assert reads == [] and source._version == version
    # A change made without save() (no last_update bump) is not seen...
    models.PeriodicTask.objects.filter(pk=row.pk).update(task="proj.other")
    source.cycle()
    assert reads == []
    # ...a save (the admin) is, once.
    fresh = models.PeriodicTask.objects.get(pk=row.pk)
    fresh.save()
    source.cycle()
    assert reads == [1] and source._version == version + 1
    assert source._entries["a"].task == "proj.other"

    # Two sent ticks: counted in Redis by their claims, written back to the row.
    fired = T0 + timedelta(seconds=3)
    held = runner_reads(source)["a"]
    dispatch(redis_url, election_name, source, (held, T0), (held, fired))
    source.cycle()
    fresh = models.PeriodicTask.objects.get(pk=row.pk)
    assert fresh.total_run_count == 7 and fresh.last_run_at == fired


def test_a_tick_claimed_from_entries_read_before_its_row_was_disabled_is_counted(
        models: Any, app: Celery, redis_url: str, election_name: str) -> None:
    """The source re-reads the table in its own thread: the runner may claim a tick
    of a row the source has just dropped (disabled), and that run must count.
    Once the runner has read the entries again, the row is no longer kept."""
    from celery_leader.contrib.django_beat import DjangoBeatSource
    from celery_leader.schedule_api import ScheduleStore

    every = models.IntervalSchedule.objects.create(every=1, period="seconds")
    row = task(models, "a", interval=every, total_run_count=5)
    source = DjangoBeatSource(app, ScheduleStore.for_app(app), poll=3600)
    source.cycle()
    entry = runner_reads(source)["a"]  # what the runner holds
    fresh = models.PeriodicTask.objects.get(pk=row.pk)
    fresh.enabled = False
    fresh.save()
    source.cycle()
    assert "a" not in source._entries
    dispatch(redis_url, election_name, source, (entry, T0))
    source.cycle()
    assert models.PeriodicTask.objects.get(pk=row.pk).total_run_count == 6
    # The runner reads the entries again: the disabled row is not among them,
    # and the source keeps nothing of it (rows are not kept forever).
    assert "a" not in runner_reads(source)
    assert source.run_record(entry) is None


def test_database_outage_keeps_the_entries_and_logs_once(
        models: Any, app: Celery, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_leader.contrib import django_beat

    every = models.IntervalSchedule.objects.create(every=1, period="seconds")
    task(models, "a", interval=every)
    from celery_leader.schedule_api import ScheduleStore

    source = django_beat.DjangoBeatSource(app, ScheduleStore.for_app(app), poll=3600)
    source.cycle()

    import django.db

    def unavailable() -> Any:
        raise django.db.OperationalError("could not connect to server")

    monkeypatch.setattr(django_beat, "last_update", unavailable)
    with caplog.at_level(logging.ERROR, "celery_leader.django_beat"):
        for _ in range(3):
            source.cycle()
    assert list(source.entries()) == ["a"]
    assert sum("database unavailable" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, "celery_leader.django_beat"):
        source.cycle()
    assert any("database reachable again" in r.getMessage() for r in caplog.records)


def test_setting_without_the_extra_fails_with_one_line(
        app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "django_celery_beat" else real(name, *a))
    with pytest.raises(ConfigurationError) as error:
        read_settings(app)
    message = str(error.value)
    assert "\n" not in message and "leader_django_celery_beat" in message
    assert "pip install django-celery-beat" in message
    assert "'/path/to/celery-leader[django]'" in message


def test_cli_schedule_lists_rows_marked_by_source(models: Any, app: Celery) -> None:
    from celery_leader.cli import schedule_table
    from celery_leader.schedule_api import schedule_report

    every = models.IntervalSchedule.objects.create(every=5, period="seconds")
    task(models, "db-row", interval=every)
    task(models, "db-off", interval=every, enabled=False)
    app.conf.beat_schedule = {"conf": {"task": "proj.t", "schedule": 10}}
    rows = {row["name"]: row for row in schedule_report(app)}
    assert rows["db-row"]["source"] == "django" and rows["conf"]["source"] == "beat_schedule"
    assert rows["db-off"]["enabled"] is False
    table = schedule_table(list(rows.values()))
    assert table.splitlines()[0].split()[-1] == "source"
    assert any(line.startswith("db-row") and line.endswith("django")
               for line in table.splitlines())


def test_a_skipped_row_is_named_once(models: Any, app: Celery,
                                     caplog: pytest.LogCaptureFixture) -> None:
    from celery_leader.contrib.django_beat import DjangoBeatSource
    from celery_leader.schedule_api import ScheduleStore

    every = models.IntervalSchedule.objects.create(every=5, period="seconds")
    task(models, "bad-args", interval=every, args="[1,")
    source = DjangoBeatSource(app, ScheduleStore.for_app(app), poll=3600)
    with caplog.at_level(logging.ERROR, "celery_leader.django_beat"):
        source.cycle()
    [line] = [r.getMessage() for r in caplog.records if "bad-args" in r.getMessage()]
    assert line.count("bad-args") == 1 and line.count("django-celery-beat task") == 1, line
    assert line.startswith("celery-leader: skipping django-celery-beat task 'bad-args': args "
                           "is not valid JSON"), line


def test_rows_are_changed_in_the_admin_not_through_the_schedule_api(
        models: Any, app: Celery) -> None:
    from celery_leader.contrib.django_beat import SOURCE
    from celery_leader.schedule.entries import EntryError
    from celery_leader.schedule_api import ScheduleStore, schedule_report
    from celery_leader.sources import DJANGO_SOURCE

    assert SOURCE == DJANGO_SOURCE
    every = models.IntervalSchedule.objects.create(every=5, period="seconds")
    task(models, "dj-cron", interval=every)
    assert [row["source"] for row in schedule_report(app) if row["name"] == "dj-cron"] == [
        "django"]
    store = ScheduleStore.for_app(app)
    for change in (store.disable, store.enable, store.remove, store.get,
                   lambda name: store.update(name, enabled=False)):
        with pytest.raises(EntryError) as error:
            change("dj-cron")
        assert str(error.value).startswith("'dj-cron' is a django-celery-beat task"), error.value
        assert "Django admin" in str(error.value)
    with pytest.raises(EntryError, match="no entry named 'nothing'"):
        store.disable("nothing")
    assert store.remove("nothing") is False


def test_rows_follow_the_default_catch_up_policy_the_readme_names(models: Any,
                                                                  app: Celery) -> None:
    """A row has no catch-up policy of its own: the leader's, "latest" by default,
    applies (what it drops at a fail-over: tests/test_observe.py counts it)."""
    every = models.IntervalSchedule.objects.create(every=1, period="seconds")
    assert entry(app, task(models, "every-second", interval=every)).catch_up is None
    assert read_settings(app).catch_up == "latest"
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert 'default `CELERY_LEADER_CATCH_UP = "latest"` the new leader sends, of the ticks ' \
           "each row missed meanwhile, only the last one, and drops the others" in readme
