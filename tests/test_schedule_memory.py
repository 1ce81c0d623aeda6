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

import time
from datetime import datetime, timedelta, timezone
from typing import Any

from celery import Celery
from celery.schedules import crontab

from celery_leader.schedule import store as store_module
from celery_leader.schedule.cronexpr import cron
from celery_leader.schedule.entries import entries_from_config, entry_from_config, interval_of
from celery_leader.schedule.runner import TEMPLATES_AHEAD
from celery_leader.schedule.store import ScheduleStore, to_ms
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
    slots = runner._load_slots(started)
    heap = runner._heap(slots)
    assert {e.name for e in runner._cold} == set(hourly) | set(every)
    runner._warm_templates(time.monotonic() + 60)
    assert not runner._cold
    assert set(runner.herd._templates) == set(hourly) | set(every)

    now = FIRE + timedelta(seconds=1)
    clock[0] = now.timestamp()
    assert runner._fire_all_due(heap, slots, term, now, started)
    fired = broker_ticks(rig.client)
    assert {t for t, _, _ in fired} >= {f"{name}@{to_ms(FIRE)}" for name in hourly}
    assert not any(t.startswith("noon-") for t, _, _ in fired)
    assert set(runner.herd._templates) == set(every)


def test_first_seen_times_are_recorded_and_read_in_chunks(rig: Rig, monkeypatch: Any) -> None:  # noqa: F811
    lock, _ = rig.lead("a")
    app = Celery("memory", set_as_current=False)
    store = ScheduleStore(app, lock)
    monkeypatch.setattr(store_module, "FIRST_SEEN_CHUNK", 7)
    entries = [entry_from_config(f"e{i}", {"task": "proj.job", "schedule": 60.0}, app)
               for i in range(30)]
    store.client.hset(store.first_seen_key, "e3", 1234)
    store.client.hset(store.first_seen_key, "e11", "not a time, with a comma")
    seen = store.first_seen(entries, 5000)
    assert seen == {**{f"e{i}": 5000 for i in range(30)}, "e3": 1234}
    assert int(store.client.hget(store.first_seen_key, "e29")) == 5000
    assert store.first_seen(entries, 9000, move=True) == {f"e{i}": 9000 for i in range(30)}
