"""What keeps a large schedule small (issue 12: 100k idle entries in <= 30 MB).

- Entries alike share their schedule object (and their empty kwargs/options):
  100,000 entries with a few distinct schedules hold a few schedule objects,
  from beat_schedule and from Redis (runtime entries) alike.
- Message templates (~1.2 KB each) are built ahead only for the entries due
  within ``TEMPLATES_AHEAD`` and dropped after a tick unless the entry is due
  again within it; the herd at the top of the hour still finds them ready.
- first-seen times are recorded and read in chunks, each one script call with
  one string reply, and a malformed stored time is still reported per entry.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab

from celery_leader.schedule import store as store_module
from celery_leader.schedule.cronexpr import cron
from celery_leader.schedule.entries import (
    Entry,
    entries_from_config,
    entry_from_config,
    entry_to_json,
    interval_of,
)
from celery_leader.schedule.runner import TEMPLATES_AHEAD, ScheduleRunner
from celery_leader.schedule.store import ScheduleStore, to_ms
from celery_leader.settings import LeaderSettings
from tests.test_herd import FIRE, Rig, broker_ticks, rig  # noqa: F401  (rig: a fixture)

UTC = timezone.utc


def test_entries_alike_share_one_schedule_object_and_empty_mappings() -> None:
    app = Celery("memory", set_as_current=False)
    conf: dict[str, Any] = {}
    for i in range(50):
        # Separate, equal objects, as a loop building beat_schedule makes them.
        conf[f"tab-{i}"] = {"task": "proj.job", "schedule": crontab(minute=0), "args": [i]}
        conf[f"cron-{i}"] = {"task": "proj.job", "schedule": cron("0 * * * *")}
        conf[f"every-{i}"] = {"task": "proj.job", "schedule": 30.0}
        conf[f"delta-{i}"] = {"task": "proj.job", "schedule": timedelta(seconds=30)}
    conf["other"] = {"task": "proj.job", "schedule": 31.0, "kwargs": {"a": 1}}
    app.conf.beat_schedule = conf
    entries = entries_from_config(app)

    def schedules(prefix: str) -> set[int]:
        return {id(e.schedule) for name, e in entries.items() if name.startswith(prefix)}

    assert len(schedules("tab-")) == len(schedules("cron-")) == 1
    # Intervals are held as given: no object of their own (beat_schedule has them).
    for name in ("every-7", "delta-7", "other"):
        assert entries[name].schedule is conf[name]["schedule"]
    assert interval_of(entries["other"].schedule) == timedelta(seconds=31)
    assert entries["delta-3"].describe_schedule() == "every 30s"
    assert len({id(e.kwargs) for name, e in entries.items() if name != "other"}) == 1
    assert len({id(e.options) for e in entries.values()}) == 1
    assert entries["other"].kwargs == {"a": 1}
    # Shared, yet every entry computes its own fire times as before.
    after = datetime(2031, 3, 4, 5, 10, tzinfo=UTC)
    assert entries["tab-3"].next_fire_after(after) == datetime(2031, 3, 4, 6, 0, tzinfo=UTC)
    assert entries["every-3"].next_fire_after(after) == after + timedelta(seconds=30)


def test_runtime_entries_alike_share_one_schedule_object(rig: Rig) -> None:  # noqa: F811
    lock, _ = rig.lead("a")
    store = ScheduleStore(Celery("memory", set_as_current=False), lock)
    for i in range(30):
        store.add(f"hourly-{i}", "proj.job", cron("0 * * * *"), args=[i])
        store.add(f"tab-{i}", "proj.job", crontab(minute=5))
        store.add(f"every-{i}", "proj.job", 45.0)
    entries = store.runtime_entries()
    assert len(entries) == 90
    for prefix in ("hourly-", "tab-"):
        assert len({id(e.schedule) for name, e in entries.items()
                    if name.startswith(prefix)}) == 1, prefix
    assert {interval_of(e.schedule) for name, e in entries.items()
            if name.startswith("every-")} == {timedelta(seconds=45)}
    assert entries["hourly-7"].args == (7,) and entries["hourly-7"].runtime


def test_templates_are_built_only_for_entries_due_within_the_window(rig: Rig) -> None:  # noqa: F811
    """At 30 s before the hour: the hourly entries and the every-10-s ones get
    templates ahead; the entries due at noon do not.  After the hour's herd,
    the hourly entries (due again in an hour) drop theirs; the every-10-s ones
    (due again within the window) keep them."""
    assert TEMPLATES_AHEAD >= 40
    lock, term = rig.lead("a")
    runner = rig.runner(lock)
    started = FIRE - timedelta(seconds=30)
    clock = [started.timestamp()]
    runner._now = lambda: clock[0]  # type: ignore[method-assign]

    def make(prefix: str, schedule: Any) -> dict[str, Any]:
        return {f"{prefix}-{i}": entry_from_config(
            f"{prefix}-{i}", {"task": "proj.job", "schedule": schedule, "args": [i]}, runner.app)
            for i in range(20)}

    hourly, noon, every = make("hourly", crontab(minute=0)), make(
        "noon", crontab(minute=0, hour=12)), make("every", 10.0)
    runner.config_entries = {**hourly, **noon, **every}
    loaded = runner._load(started)
    assert {e.name for e in runner._cold} == set(hourly) | set(every)
    runner._warm_templates(time.monotonic() + 60)
    assert not runner._cold
    assert set(runner.herd._templates) == set(hourly) | set(every)

    now = FIRE + timedelta(seconds=1)
    clock[0] = now.timestamp()
    assert runner._fire_all_due(loaded, term, now, started)
    fired = broker_ticks(rig.client)
    assert {t for t, _, _ in fired} >= {f"{name}@{to_ms(FIRE)}" for name in hourly}
    assert not any(t.startswith("noon-") for t, _, _ in fired)
    assert set(runner.herd._templates) == set(every)


def test_first_seen_times_are_recorded_and_read_in_chunks(rig: Rig, monkeypatch: Any) -> None:  # noqa: F811
    lock, _ = rig.lead("a")
    app = Celery("memory", set_as_current=False)
    store = ScheduleStore(app, lock)
    monkeypatch.setattr(store_module, "FIRST_SEEN_CHUNK", 7)
    names = [f"e{i}" for i in range(30)]
    store.client.hset(store.first_seen_key, "e3", 1234)
    store.client.hset(store.first_seen_key, "e11", "not a time, with a comma")
    seen = store.first_seen(names, 5000)
    assert seen == {**{f"e{i}": 5000 for i in range(30)}, "e3": 1234}
    assert int(store.client.hget(store.first_seen_key, "e29")) == 5000
    assert store.first_seen(names, 9000, move=True) == {f"e{i}": 9000 for i in range(30)}


def _live_entries() -> int:
    gc.collect()
    return sum(1 for thing in gc.get_objects() if type(thing) is Entry)


@pytest.mark.parametrize("kind", ["beat_schedule", "runtime"])
def test_idle_entries_are_held_as_a_fire_time_only(rig: Rig, kind: str) -> None:  # noqa: F811
    """An Entry per entry repeated what beat_schedule (or Redis) holds: ~120 B
    each, with a slot object and two dicts ~350 B per entry (36 MB for
    100,000).  Only the entries due within TEMPLATES_AHEAD are built (a runtime
    one read again from Redis); an idle one costs its place in the due queue.
    The herd still finds the near ones built, fires them, and lets them go when
    they are not due again within the window."""
    lock, term = rig.lead("a")
    specs: dict[str, Any] = {f"idle-{i}": {"task": "proj.job", "schedule": 86400.0 + i,
                                           "args": [i]} for i in range(3000)}
    specs.update({f"hourly-{i}": {"task": "proj.job", "schedule": crontab(minute=0),
                                  "args": [i]} for i in range(20)})
    app = Celery("memory", broker=rig.lease_url, set_as_current=False)
    app.conf.update(leader_name=rig.name,
                    beat_schedule=specs if kind == "beat_schedule" else {})
    if kind == "runtime":
        store = ScheduleStore(app, lock)
        rig.client.hset(store.entries_key, mapping={
            name: entry_to_json(entry_from_config(name, spec, app))
            for name, spec in specs.items()})
    started = FIRE - timedelta(seconds=30)
    clock = [started.timestamp()]
    before = _live_entries()
    runner = ScheduleRunner(app, lock, LeaderSettings(redis_url=rig.lease_url, name=rig.name,
                                                      retry_period=0.1), now=lambda: clock[0])
    runner._load(started)  # once before measuring: the app's first task list imports modules
    tracemalloc.start()
    try:
        traced_before = tracemalloc.get_traced_memory()[0]
        loaded = runner._load(started)
        gc.collect()
        per_entry = (tracemalloc.get_traced_memory()[0] - traced_before) / len(specs)
    finally:
        tracemalloc.stop()
    # The due queue: a heap slot, a dict slot and a fire time (~110 B; ~260 B
    # before), and a runtime entry's name (~60 B: beat_schedule holds the others).
    assert per_entry < (160 if kind == "beat_schedule" else 230), \
        f"{per_entry:.0f} bytes per idle entry"
    assert len(loaded.queue.fire_times()) == len(specs)
    assert _live_entries() - before == 20  # the hourly ones, due within the window
    assert {e.name for e in runner._cold} == {f"hourly-{i}" for i in range(20)}

    now = FIRE + timedelta(seconds=1)
    clock[0] = now.timestamp()
    assert runner._fire_all_due(loaded, term, now, started)
    assert {t for t, _, _ in broker_ticks(rig.client)} == {
        f"hourly-{i}@{to_ms(FIRE)}" for i in range(20)}
    runner._cold.clear()
    assert _live_entries() - before == 0  # due again in an hour: built again then


def test_beat_schedule_entries_built_again_keep_their_overrides(rig: Rig) -> None:  # noqa: F811
    """An entry built again from beat_schedule is the one its override says:
    enabled at runtime though beat_schedule disables it (it fires), and the
    other way round (it does not)."""
    lock, term = rig.lead("a")
    app = Celery("memory", broker=rig.lease_url, set_as_current=False)
    app.conf.update(leader_name=rig.name, beat_schedule={
        "paused": {"task": "proj.job", "schedule": crontab(minute="*"), "enabled": False},
        "on": {"task": "proj.job", "schedule": crontab(minute="*")}})
    store = ScheduleStore(app, lock)
    store.enable("paused")
    store.disable("on")
    started = FIRE - timedelta(seconds=30)
    runner = ScheduleRunner(app, lock, LeaderSettings(redis_url=rig.lease_url, name=rig.name,
                                                      retry_period=0.1),
                            now=lambda: started.timestamp())
    loaded = runner._load(started)
    assert [e.name for e in runner._cold] == ["paused"] and runner._cold[0].enabled
    assert runner._fire_all_due(loaded, term, FIRE + timedelta(seconds=1), started)
    assert [t for t, _, _ in broker_ticks(rig.client)] == [f"paused@{to_ms(FIRE)}"]
