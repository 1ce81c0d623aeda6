"""Runtime schedule entries: the ScheduleStore API and ``celery leader schedule``.

The first tests exercise the store against the real Redis without processes;
the last one runs 3 worker replicas of tests.apps.beat_app and changes the
schedule through the API and the CLI while they run.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_leader import cron
from celery_leader.entries import EntryError
from celery_leader.schedule import store as store_module
from celery_leader.scheduler import ScheduleStore, schedule_report
from tests.sched_procs import RETRY, Replicas, fire_second, wait_until

TICK = "tests.apps.beat_app.tick"


def api_app(redis_url: str, name: str, **conf: Any) -> Celery:
    """What a user's process would use: an app configured like the workers'."""
    app = Celery("runtime_api", broker=redis_url, set_as_current=False)
    app.conf.update(leader_name=name, **conf)
    return app


@pytest.fixture
def store(redis_url: str, election_name: str) -> Iterator[ScheduleStore]:
    store = ScheduleStore.for_app(api_app(redis_url, election_name))
    yield store
    store.client.close()


# ---------------------------------------------------------------- the API, no processes


def test_add_get_update_remove_round_trip(store: ScheduleStore) -> None:
    assert store.version() == 0
    entry = store.add("berlin", TICK, cron("30 2 * * *", tz="Europe/Berlin"), args=["b"],
                      kwargs={"k": 1}, options={"queue": "q"}, catch_up="all",
                      misfire_grace=5)
    assert entry.runtime and entry.enabled
    got = store.get("berlin")
    assert got == entry
    assert got.schedule == cron("30 2 * * *", tz="Europe/Berlin")
    assert (got.args, got.kwargs, got.options, got.catch_up, got.misfire_grace) == \
        (("b",), {"k": 1}, {"queue": "q"}, "all", 5.0)
    assert store.version() == 1

    store.add("every-5", TICK, 5)
    assert store.get("every-5").describe_schedule() == "every 5s"
    assert store.disable("every-5").enabled is False
    assert store.get("every-5").enabled is False
    assert store.enable("every-5").enabled is True
    updated = store.update("every-5", schedule=7.5, args=["x"])
    assert (updated.describe_schedule(), updated.args) == ("every 7.5s", ("x",))
    assert set(store.runtime_entries()) == {"berlin", "every-5"}
    assert store.version() == 5

    assert store.remove("every-5") is True
    assert store.remove("every-5") is False
    assert set(store.runtime_entries()) == {"berlin"}
    with pytest.raises(EntryError, match="no runtime entry named 'every-5'"):
        store.get("every-5")


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"schedule": "soon"}, "invalid schedule"),
    ({"schedule": 0}, "must be positive"),
    ({"task": ""}, "needs a task name"),
    ({"catch_up": "most"}, "catch_up"),
    ({"options": {"bogus": 1}}, "unknown option"),
    ({"name": ""}, "non-empty"),
])
def test_invalid_entries_are_rejected_before_anything_is_written(
        store: ScheduleStore, kwargs: dict[str, Any], fragment: str) -> None:
    call: dict[str, Any] = {"name": "bad", "task": TICK, "schedule": 1.0, **kwargs}
    with pytest.raises(EntryError, match=fragment):
        store.add(call.pop("name"), call.pop("task"), call.pop("schedule"), **call)
    assert store.client.hlen(store.entries_key) == 0
    assert store.version() == 0


def test_existing_entry_needs_update_or_replace(store: ScheduleStore) -> None:
    store.add("one", TICK, 1.0)
    with pytest.raises(EntryError, match="already exists"):
        store.add("one", TICK, 2.0)
    store.add("one", TICK, 2.0, replace_existing=True)
    assert store.get("one").describe_schedule() == "every 2s"
    with pytest.raises(EntryError, match="unknown field"):
        store.update("one", colour="red")


def test_schedule_report_merges_config_runtime_and_state_of_either_mode(
        redis_url: str, election_name: str) -> None:
    app = api_app(redis_url, election_name, beat_schedule={
        "conf": {"task": TICK, "schedule": cron("* * * * * *"), "args": ("c",)},
        "old": {"task": TICK, "schedule": 60.0}})
    store = ScheduleStore.for_app(app)
    store.add("rt", TICK, 60.0)
    store.add("off", TICK, 60.0, enabled=False)
    client = redis.Redis.from_url(redis_url)
    # One progress for both modes; each state says which election claimed it.
    client.hset(store.state_key, "conf", json.dumps(
        {"last": 2_000_000, "term": 9, "election": f"{election_name}-beat"}))
    client.hset(store.state_key, "old", json.dumps({"last": 1_000_000, "term": 3}))
    # Progress of a standalone beat of an older version, not merged yet: the later wins.
    client.hset(store.legacy_state_key, "old", json.dumps({"last": 1_500_000, "term": 5}))
    client.hset(store.state_key, "rt", "garbage")
    rows = {row["name"]: row for row in schedule_report(app)}
    client.close()
    assert set(rows) == {"conf", "old", "rt", "off"}
    assert rows["conf"]["last_fire_time"] == "1970-01-01T00:33:20+00:00"
    assert (rows["conf"]["term"], rows["conf"]["election"]) == (9, f"{election_name}-beat")
    assert rows["conf"]["runtime"] is False
    assert (rows["old"]["term"], rows["old"]["election"]) == (5, f"{election_name}-beat")
    assert rows["rt"]["last_fire_time"] is None and rows["rt"]["runtime"] is True
    assert rows["rt"]["schedule"] == "every 60s" and rows["rt"]["election"] is None
    assert rows["off"]["enabled"] is False and rows["off"]["next_fire_time"] is None


def test_schedule_report_next_fire_is_the_one_the_runner_computes(
        redis_url: str, election_name: str) -> None:
    """After the last claimed fire time, or (never fired) after the first-seen time;
    not "now + interval", which changes with every call."""
    app = api_app(redis_url, election_name, beat_schedule={
        "fired": {"task": TICK, "schedule": 10.0},
        "seen": {"task": TICK, "schedule": 10.0},
        "cron": {"task": TICK, "schedule": cron("*/15 * * * * *")}})
    store = ScheduleStore.for_app(app)
    now_ms = round(time.time() * 1000)
    store.client.hset(store.state_key, "fired", json.dumps({"last": now_ms - 5_000, "term": 1}))
    store.client.hset(store.first_seen_key, "seen", now_ms - 3_000)

    def iso_ms(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat()

    reports = []
    for _ in range(3):
        reports.append({row["name"]: row["next_fire_time"] for row in schedule_report(app)})
        time.sleep(0.01)  # later calls, the same answer
    assert reports[0] == reports[1] == reports[2]
    assert reports[0]["fired"] == iso_ms(now_ms + 5_000)
    assert reports[0]["seen"] == iso_ms(now_ms + 7_000)
    assert datetime.fromisoformat(reports[0]["cron"]).second % 15 == 0


def test_a_runtime_entry_may_not_take_a_beat_schedule_name(
        redis_url: str, election_name: str) -> None:
    app = api_app(redis_url, election_name,
                  beat_schedule={"nightly": {"task": "proj.report", "schedule": 60.0}})
    store = ScheduleStore.for_app(app)
    for replace_existing in (False, True):
        with pytest.raises(EntryError) as info:
            store.add("nightly", TICK, 5.0, replace_existing=replace_existing)
        message = str(info.value)
        assert "runtime entry 'nightly'" in message and "beat_schedule entry 'nightly'" in message
        assert "'proj.report'" in message and repr(TICK) in message
    assert store.client.hlen(store.entries_key) == 0 and store.version() == 0
    with pytest.raises(EntryError, match="is a beat_schedule entry"):
        store.update("nightly", args=[1])
    with pytest.raises(EntryError, match="is a beat_schedule entry"):
        store.remove("nightly")
    with pytest.raises(EntryError, match="no entry named 'nope'"):
        store.disable("nope")


def test_beat_schedule_entries_are_disabled_and_enabled_by_an_override(
        redis_url: str, election_name: str) -> None:
    app = api_app(redis_url, election_name, beat_schedule={
        "nightly": {"task": "proj.report", "schedule": 60.0},
        "paused": {"task": "proj.report", "schedule": 60.0, "enabled": False}})
    store = ScheduleStore.for_app(app)
    assert store.disable("nightly").enabled is False
    assert store.enable("paused").enabled is True
    assert store.version() == 2
    rows = {row["name"]: row for row in schedule_report(app)}
    assert rows["nightly"]["enabled"] is False and rows["nightly"]["next_fire_time"] is None
    assert rows["paused"]["enabled"] is True and rows["paused"]["next_fire_time"] is not None
    assert store.static_entries()["nightly"].enabled is False
    # Back to what beat_schedule says: the override is gone.
    store.enable("nightly")
    store.disable("paused")
    assert store.client.hlen(store.overrides_key) == 0


def test_removing_a_runtime_entry_removes_its_progress(
        redis_url: str, election_name: str) -> None:
    app = api_app(redis_url, election_name,
                  beat_schedule={"nightly": {"task": "proj.report", "schedule": 60.0}})
    store = ScheduleStore.for_app(app)
    store.add("rt", TICK, 5.0)
    # A runtime entry named like a beat_schedule entry, stored by an older version.
    store.client.hset(store.entries_key, "nightly", store.client.hget(store.entries_key, "rt"))
    for name in ("rt", "nightly"):
        store.client.hset(store.state_key, name, json.dumps({"last": 1_000, "term": 1}))
        store.client.hset(store.first_seen_key, name, 500)
    assert store.remove("rt") is True
    assert not store.client.hexists(store.state_key, "rt")
    assert not store.client.hexists(store.first_seen_key, "rt")
    # The progress of "nightly" belongs to the beat_schedule entry: kept.
    assert store.remove("nightly") is True
    assert store.client.hexists(store.state_key, "nightly")
    assert store.client.hexists(store.first_seen_key, "nightly")


def test_cli_schedule_table_and_commands_on_beat_schedule_entries(
        tmp_path: Path, redis_url: str, election_name: str) -> None:
    r = Replicas(tmp_path, redis_url, election_name)  # only runs the CLI
    try:
        result = r.celery("leader", "schedule", "disable", "every-second")
        assert result.returncode == 0, result.stderr
        assert "disabled every-second (beat_schedule entry)" in result.stdout
        rows = json.loads(r.celery("leader", "schedule", "--json").stdout)
        assert [row["enabled"] for row in rows if row["name"] == "every-second"] == [False]
        result = r.celery("leader", "schedule", "enable", "every-second")
        assert result.returncode == 0 and "enabled every-second" in result.stdout, result.stderr
        result = r.celery("leader", "schedule", "add", "every-second", "--task", TICK,
                          "--every", "5")
        assert result.returncode != 0
        assert "runtime entry 'every-second'" in result.stderr
        assert "beat_schedule entry 'every-second'" in result.stderr
        result = r.celery("leader", "schedule", "remove", "every-second")
        assert result.returncode != 0 and "is a beat_schedule entry" in result.stderr

        # The table: nothing truncated, columns apart, each term with its election.
        store = ScheduleStore.for_app(api_app(redis_url, election_name))
        long_name = "reconcile-customer-invoices-across-regions"
        zone = "America/Argentina/Buenos_Aires"
        store.add(long_name, TICK, cron("*/15 * * * * *", tz=zone))
        r.client.hset(store.state_key, "every-second", json.dumps(
            {"last": 1_700_000_000_123, "term": 7, "election": f"{election_name}-beat"}))
        result = r.celery("leader", "schedule")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        header = next(line for line in lines if line.startswith("name"))
        body = lines[lines.index(header) + 1:]
        assert len(body) == 2
        row = {line.split()[0]: re.split(r"\s{2,}", line) for line in body}
        assert row[long_name][:2] == [long_name, f"cron('*/15 * * * * *', tz='{zone}')"]
        assert row[long_name][-1] == "-"
        assert row["every-second"][3:] == ["2023-11-14 22:13:20.123",
                                           f"7 ({election_name}-beat)"]
        assert all(len(re.split(r"\s{2,}", line)) == 5 for line in [header, *body])
    finally:
        r.stop()


# ---------------------------------------------------------------- live replicas



def label_ticks(r: Replicas, label: str) -> list[dict[str, Any]]:
    return [t for t in r.ticks() if t["label"] == label]


def check_on_time(ticks: list[dict[str, Any]], every: int, added: tuple[float, float],
                  slack: float) -> list[int]:
    """Fire times are the scheduled ones (multiples of ``every``, consecutive, each
    once), the first is the first one after the runner picked the entry up (within
    a retry period of the write, made between ``added[0]`` and ``added[1]``), and
    each ran within ~1 s of its fire time."""
    seconds = sorted(fire_second(t) for t in ticks)
    assert all(s % every == 0 for s in seconds), seconds
    assert seconds == list(range(seconds[0], seconds[0] + every * len(seconds), every)), seconds
    picked_up_by = added[1] + RETRY + slack
    first_due = (int(picked_up_by) // every + 1) * every
    assert added[0] < seconds[0] <= first_due, (seconds, added)
    late = [round(t["at"] - fire_second(t), 3) for t in ticks]
    assert all(-0.05 <= delay < 1.0 for delay in late), late
    return seconds


@pytest.mark.integration
def test_runtime_entries_through_api_and_cli_on_three_workers(
        replicas: Replicas, redis_url: str, election_name: str) -> None:
    r = replicas
    for _ in range(3):
        r.worker()
    r.wait_workers_ready()
    r.wait_ticks(2, timeout=60)
    store = ScheduleStore.for_app(api_app(redis_url, election_name))
    slack = 0.5  # a loaded 2-core machine

    # -- added through the API: fires on its own schedule, on time.
    added = time.time()
    store.add("rt-api", TICK, cron("*/2 * * * * *"), args=["rt-api"])
    added_by = time.time()
    wait_until(lambda: len(label_ticks(r, "rt-api")) >= 3, 15, "3 ticks of rt-api", r.logs)
    check_on_time(label_ticks(r, "rt-api"), 2, (added, added_by), slack)

    # -- disabled through the API: nothing fires after one retry period.
    disabled = time.time()
    store.disable("rt-api")
    time.sleep(RETRY + slack + 2.5)  # a measurement window covering >= 1 scheduled tick
    after_disable = [fire_second(t) for t in label_ticks(r, "rt-api")
                     if fire_second(t) > disabled + RETRY + slack]
    assert after_disable == [], after_disable

    # -- the CLI shows both entries and the current state.
    result = r.celery("leader", "schedule", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"every-second", "rt-api"}
    leader = r.lease(election_name)
    assert leader is not None
    assert rows["every-second"]["enabled"] and not rows["every-second"]["runtime"]
    assert rows["every-second"]["term"] == leader["term"]
    assert rows["every-second"]["schedule"] == "cron('* * * * * *')"
    assert rows["rt-api"]["runtime"] and rows["rt-api"]["enabled"] is False
    assert rows["rt-api"]["next_fire_time"] is None
    assert rows["rt-api"]["last_fire_time"] is not None

    # -- added through the CLI: fires on time.
    added = time.time()
    result = r.celery("leader", "schedule", "add", "rt-cli", "--task", TICK,
                      "--cron", "*/3 * * * * *", "--args", '["rt-cli"]')
    added_by = time.time()
    assert result.returncode == 0, result.stderr
    assert "added rt-cli" in result.stdout
    wait_until(lambda: len(label_ticks(r, "rt-cli")) >= 2, 15, "2 ticks of rt-cli", r.logs)
    check_on_time(label_ticks(r, "rt-cli"), 3, (added, added_by), slack)
    result = r.celery("leader", "schedule", "--json")
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["rt-cli"]["enabled"] and rows["rt-cli"]["schedule"] == "cron('*/3 * * * * *')"
    assert rows["rt-cli"]["last_fire_time"] is not None
    assert store.get("rt-cli").args == ("rt-cli",)

    # -- disabled through the CLI: stops; removed through the CLI: gone.
    result = r.celery("leader", "schedule", "disable", "rt-cli")
    disabled = time.time()
    assert result.returncode == 0 and "disabled rt-cli" in result.stdout, result.stderr
    assert store.get("rt-cli").enabled is False
    result = r.celery("leader", "schedule", "remove", "rt-cli")
    assert result.returncode == 0 and "removed rt-cli" in result.stdout, result.stderr
    result = r.celery("leader", "schedule", "--json")
    assert {row["name"] for row in json.loads(result.stdout)} == {"every-second", "rt-api"}
    result = r.celery("leader", "schedule", "remove", "rt-cli")
    assert result.returncode != 0 and "no runtime entry named 'rt-cli'" in result.stderr
    late = [fire_second(t) for t in label_ticks(r, "rt-cli")
            if fire_second(t) > disabled + RETRY + slack]
    assert late == [], late

    # The built-in entry ran every second, once, throughout.
    seconds = sorted(r.seconds())
    assert seconds == list(range(seconds[0], seconds[0] + len(seconds))), seconds
    ids = [t["task_id"] for t in r.ticks()]
    assert len(ids) == len(set(ids))


def test_the_leader_reads_runtime_entries_in_chunks_each_once(
        redis_url: str, election_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """HSCAN, not one HGETALL of 100,000 entries; a field HSCAN returns twice (it
    may, while the hash grows) is loaded once."""
    monkeypatch.setattr(store_module, "RUNTIME_CHUNK", 20)
    app = api_app(redis_url, election_name)
    store = ScheduleStore.for_app(app)
    store.client.hset(store.entries_key, mapping={
        f"e{i}": json.dumps({"task": TICK, "schedule": {"type": "interval", "seconds": 60}})
        for i in range(300)})  # past listpack size: HSCAN returns chunks
    real_hscan = store.client.hscan
    calls: list[int] = []

    def hscan(key: str, cursor: int = 0, **kwargs: Any) -> Any:
        calls.append(cursor)
        next_cursor, fields = real_hscan(key, cursor, **kwargs)
        if len(calls) == 2:
            fields = {**fields, b"e0": store.client.hget(key, "e0")}  # a repeat
        return next_cursor, fields

    monkeypatch.setattr(store.client, "hscan", hscan)
    loaded: dict[str, str] = {}
    names = [d[0] for batch in store.runtime_definitions({}, loaded) for d in batch]
    assert len(calls) > 3
    assert sorted(names) == sorted(f"e{i}" for i in range(300)) and len(loaded) == 300


def test_without_hscan_runtime_entries_are_read_at_once_with_one_warning(
        redis_url: str, election_name: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    app = api_app(redis_url, election_name)
    store = ScheduleStore.for_app(app)
    store.add("a", TICK, 60.0)
    store.add("b", TICK, 60.0)

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.NoPermissionError(
            "this user has no permissions to run the 'hscan' command")

    monkeypatch.setattr(store.client, "hscan", refused)
    with caplog.at_level("WARNING", logger="celery_leader"):
        for _ in range(2):
            loaded: dict[str, str] = {}
            assert sorted(d[0] for batch in store.runtime_definitions({}, loaded)
                          for d in batch) == ["a", "b"]
    assert caplog.text.count("may not run HSCAN") == 1
