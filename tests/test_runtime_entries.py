"""Runtime schedule entries: the ScheduleStore API and ``celery leader schedule``.

The first tests exercise the store against the real Redis without processes;
the last one runs 3 worker replicas of tests.apps.beat_app and changes the
schedule through the API and the CLI while they run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_leader import cron
from celery_leader.entries import EntryError
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


def test_schedule_report_merges_config_runtime_and_both_modes_state(
        redis_url: str, election_name: str) -> None:
    app = api_app(redis_url, election_name, beat_schedule={
        "conf": {"task": TICK, "schedule": cron("* * * * * *"), "args": ("c",)}})
    workers = ScheduleStore.for_app(app)
    beats = ScheduleStore.for_app(app, standalone=True)
    workers.add("rt", TICK, 60.0)
    workers.add("off", TICK, 60.0, enabled=False)
    client = redis.Redis.from_url(redis_url)
    # The worker election dispatched "conf" last at 1000 s, the beat election at 2000 s.
    client.hset(workers.state_key, "conf", json.dumps({"last": 1_000_000, "term": 3}))
    client.hset(beats.state_key, "conf", json.dumps({"last": 2_000_000, "term": 9}))
    client.hset(workers.state_key, "rt", "garbage")
    rows = {row["name"]: row for row in schedule_report(app)}
    client.close()
    assert set(rows) == {"conf", "rt", "off"}
    assert rows["conf"]["last_fire_time"] == "1970-01-01T00:33:20+00:00"
    assert rows["conf"]["term"] == 9 and rows["conf"]["runtime"] is False
    assert rows["rt"]["last_fire_time"] is None and rows["rt"]["runtime"] is True
    assert rows["rt"]["schedule"] == "every 60s"
    assert rows["off"]["enabled"] is False and rows["off"]["next_fire_time"] is None


# ---------------------------------------------------------------- live replicas


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str, election_name: str) -> Iterator[Replicas]:
    procs = Replicas(tmp_path, redis_url, election_name)
    try:
        yield procs
    finally:
        procs.stop()
        print(procs.logs())  # shown by pytest only when the test failed


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
