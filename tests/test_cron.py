"""celery_leader.cron: parsing, time zones, DST, the Celery schedule protocol, beat.

Fixed clocks throughout (explicit datetimes or a ``nowfun``).  DST behaviour is
checked against an independent brute-force oracle that walks real instants
(every minute or second in UTC) rather than wall times.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shelve
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import celery
import pytest
import redis
from celery import Celery
from celery.schedules import crontab, maybe_schedule
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_leader.cron import cron

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
REPO_ROOT = Path(__file__).resolve().parent.parent


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fires(schedule: cron, start: datetime, count: int) -> list[datetime]:
    """The next ``count`` fire instants after ``start``, chained."""
    out: list[datetime] = []
    t = start
    for _ in range(count):
        t = schedule.next_fire_after(t)
        out.append(t)
    return out


class Clock:
    """A settable ``nowfun``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# -- expression forms --------------------------------------------------------------


def test_five_fields() -> None:
    c = cron("*/15 9-10 * * mon-fri")
    # 2026-01-02 is a Friday, 2026-01-03 a Saturday.
    assert fires(c, utc(2026, 1, 2, 10, 40), 3) == [
        utc(2026, 1, 2, 10, 45),
        utc(2026, 1, 5, 9, 0),
        utc(2026, 1, 5, 9, 15),
    ]


def test_six_fields_put_seconds_first() -> None:
    c = cron("15 * * * * *")  # second 15 of every minute (croniter would read minute 15)
    assert fires(c, utc(2026, 1, 1), 3) == [
        utc(2026, 1, 1, 0, 0, 15),
        utc(2026, 1, 1, 0, 1, 15),
        utc(2026, 1, 1, 0, 2, 15),
    ]
    assert fires(cron("*/20 30 8 * * *"), utc(2026, 1, 1), 4) == [
        utc(2026, 1, 1, 8, 30, 0),
        utc(2026, 1, 1, 8, 30, 20),
        utc(2026, 1, 1, 8, 30, 40),
        utc(2026, 1, 2, 8, 30, 0),
    ]


def test_every_second_keeps_sub_second_precision() -> None:
    c = cron("* * * * * *")
    assert c.next_fire_after(utc(2026, 1, 1, 0, 0, 0)) == utc(2026, 1, 1, 0, 0, 1)
    base = utc(2026, 1, 1, 0, 0, 0)
    for micro in (1, 500_000, 999_999):
        assert c.next_fire_after(base + timedelta(microseconds=micro)) == utc(2026, 1, 1, 0, 0, 1)
    # A 5-field schedule fires on the minute.
    assert cron("* * * * *").next_fire_after(utc(2026, 1, 1, 0, 0, 59, 999_999)) == utc(
        2026, 1, 1, 0, 1
    )


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("@hourly", [utc(2026, 5, 13, 11), utc(2026, 5, 13, 12)]),
        ("@daily", [utc(2026, 5, 14), utc(2026, 5, 15)]),
        ("@midnight", [utc(2026, 5, 14), utc(2026, 5, 15)]),
        ("@weekly", [utc(2026, 5, 17), utc(2026, 5, 24)]),  # Sundays
        ("@monthly", [utc(2026, 6, 1), utc(2026, 7, 1)]),
        ("@yearly", [utc(2027, 1, 1), utc(2028, 1, 1)]),
        ("@annually", [utc(2027, 1, 1), utc(2028, 1, 1)]),
        ("@DAILY", [utc(2026, 5, 14), utc(2026, 5, 15)]),
    ],
)
def test_aliases(alias: str, expected: list[datetime]) -> None:
    assert fires(cron(alias), utc(2026, 5, 13, 10, 30), 2) == expected


def test_attributes_and_repr() -> None:
    c = cron("  */5   * * * * ", tz="Europe/Berlin")
    assert c.expression == "*/5 * * * *"
    assert c.tz == BERLIN
    assert repr(c) == "cron('*/5 * * * *', tz='Europe/Berlin')"
    assert repr(cron("@Daily")) == "cron('@daily')"
    assert eval(repr(c), {"cron": cron}) == c


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "* * * *",
        "* * * * * * *",  # croniter's 7-field (year) form is not part of the API
        "61 * * * *",
        "* 24 * * *",
        "60 * * * * *",  # seconds first: 60 is out of range
        "* * * 13 *",
        "0 0 30 2 *",  # parses, never matches
        "@reboot",
        "@every 5m",
        "H * * * *",
        "R * * * *",
        "not a cron expression",
        "*/0 * * * *",
    ],
)
def test_invalid_expression_raises_value_error_naming_it(expr: str) -> None:
    with pytest.raises(ValueError, match="invalid cron expression") as info:
        cron(expr)
    assert repr(expr) in str(info.value)


def test_non_string_expression_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        cron(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "", "Europe/Berlinn", "../../etc/passwd"])
def test_unknown_time_zone_raises_value_error_naming_it(zone: str) -> None:
    with pytest.raises(ValueError, match="unknown time zone") as info:
        cron("* * * * *", tz=zone)
    assert repr(zone) in str(info.value)


# -- time zones ---------------------------------------------------------------------


def test_explicit_zone() -> None:
    # 09:00 Tokyo (UTC+9, no DST) is midnight UTC.
    assert cron("0 9 * * *", tz="Asia/Tokyo").next_fire_after(utc(2026, 7, 1, 12)) == utc(
        2026, 7, 2, 0
    )
    ny = cron("0 9 * * *", tz="America/New_York")
    assert ny.next_fire_after(utc(2026, 1, 10)) == utc(2026, 1, 10, 14)  # EST
    assert ny.next_fire_after(utc(2026, 7, 10)) == utc(2026, 7, 10, 13)  # EDT
    assert cron("0 9 * * *", tz=NEW_YORK) == ny  # a ZoneInfo works as well as its name


def test_result_is_utc_and_input_zone_does_not_matter() -> None:
    c = cron("30 8 * * *", tz="Europe/Berlin")
    instant = utc(2026, 7, 1, 5)
    same_in_tokyo = instant.astimezone(ZoneInfo("Asia/Tokyo"))
    result = c.next_fire_after(same_in_tokyo)
    assert result == utc(2026, 7, 1, 6, 30)
    assert result.tzinfo is UTC
    # Naive datetimes are taken to be UTC, as Celery does.
    assert c.next_fire_after(instant.replace(tzinfo=None)) == result


def test_default_zone_is_the_apps() -> None:
    app = Celery("cron-tz-test", set_as_current=False)
    app.conf.timezone = "Asia/Kolkata"
    c = cron("0 9 * * *", app=app)
    assert c.tz == ZoneInfo("Asia/Kolkata")
    assert c.next_fire_after(utc(2026, 7, 1)) == utc(2026, 7, 1, 3, 30)
    plain = cron("0 9 * * *", app=Celery("cron-utc-test", set_as_current=False))
    assert plain.next_fire_after(utc(2026, 7, 1)) == utc(2026, 7, 1, 9)
    # Beat hands its app to every schedule it loads.
    loaded = maybe_schedule(cron("0 9 * * *"), app=app)
    assert loaded.app is app
    assert loaded.tz == ZoneInfo("Asia/Kolkata")


# -- DST ---------------------------------------------------------------------------
# Europe/Berlin 2026: 2026-03-29 02:00 CET -> 03:00 CEST (at 01:00 UTC);
#                     2026-10-25 03:00 CEST -> 02:00 CET (at 01:00 UTC).
# America/New_York 2026: 2026-03-08 02:00 EST -> 03:00 EDT (07:00 UTC);
#                        2026-11-01 02:00 EDT -> 01:00 EST (06:00 UTC).


def test_berlin_spring_forward_nonexistent_time_fires_once_at_next_valid_instant() -> None:
    c = cron("30 2 * * *", tz="Europe/Berlin")
    assert fires(c, utc(2026, 3, 28, 12), 3) == [
        utc(2026, 3, 29, 1, 0),  # 02:30 does not exist: 03:00 CEST, the end of the gap
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
        utc(2026, 3, 31, 0, 30),
    ]


def test_berlin_spring_forward_skipped_times_collapse_into_one_fire() -> None:
    c = cron("*/15 * * * *", tz="Europe/Berlin")
    assert fires(c, utc(2026, 3, 29, 0, 40), 4) == [
        utc(2026, 3, 29, 0, 45),  # 01:45 CET
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST, standing in for 02:00..02:45 as well
        utc(2026, 3, 29, 1, 15),  # 03:15 CEST
        utc(2026, 3, 29, 1, 30),
    ]


def test_berlin_fall_back_repeated_time_fires_once() -> None:
    c = cron("30 2 * * *", tz="Europe/Berlin")
    assert fires(c, utc(2026, 10, 24, 12), 3) == [
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST, the first occurrence only
        utc(2026, 10, 26, 1, 30),  # 02:30 CET the next day
        utc(2026, 10, 27, 1, 30),
    ]
    # Asked from inside the repeated hour (02:10 CET, second pass): already fired.
    assert c.next_fire_after(utc(2026, 10, 25, 1, 10)) == utc(2026, 10, 26, 1, 30)


def test_berlin_fall_back_interval_schedule_does_not_repeat_wall_times() -> None:
    c = cron("*/30 * * * *", tz="Europe/Berlin")
    assert fires(c, utc(2026, 10, 24, 23, 10), 5) == [
        utc(2026, 10, 24, 23, 30),  # 01:30 CEST
        utc(2026, 10, 25, 0, 0),  # 02:00 CEST
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 2, 0),  # 03:00 CET: 02:00 and 02:30 CET are repeats
        utc(2026, 10, 25, 2, 30),
    ]
    assert c.next_fire_after(utc(2026, 10, 25, 1, 45)) == utc(2026, 10, 25, 2, 0)


def test_new_york_both_changes() -> None:
    spring = cron("30 2 * * *", tz="America/New_York")
    assert fires(spring, utc(2026, 3, 7, 12), 2) == [
        utc(2026, 3, 8, 7, 0),  # 02:30 does not exist: 03:00 EDT
        utc(2026, 3, 9, 6, 30),  # 02:30 EDT
    ]
    fall = cron("30 1 * * *", tz="America/New_York")
    assert fires(fall, utc(2026, 10, 31, 12), 2) == [
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT, first occurrence
        utc(2026, 11, 2, 6, 30),  # 01:30 EST next day; not 01:30 EST on Nov 1
    ]


def test_per_second_schedule_across_spring_gap() -> None:
    c = cron("* * * * * *", tz="Europe/Berlin")
    assert fires(c, utc(2026, 3, 29, 0, 59, 58), 4) == [
        utc(2026, 3, 29, 0, 59, 59),  # 01:59:59 CET
        utc(2026, 3, 29, 1, 0, 0),  # 03:00:00 CEST (all of 02:xx:xx collapses here)
        utc(2026, 3, 29, 1, 0, 1),
        utc(2026, 3, 29, 1, 0, 2),
    ]


# -- brute-force oracle ---------------------------------------------------------------


def _values(field: str, low: int, high: int) -> set[int]:
    out: set[int] = set()
    for part in field.split(","):
        rng, _, step = part.partition("/")
        if rng == "*":
            start, stop = low, high
        elif "-" in rng:
            a, b = rng.split("-")
            start, stop = int(a), int(b)
        else:
            start = stop = int(rng)
        out.update(range(start, stop + 1, int(step or 1)))
    return out


def _matcher(expr: str) -> functools.partial[bool]:
    """An independent matcher for expressions restricted to second/minute/hour."""
    fields = {"@hourly": "0 * * * *"}.get(expr, expr).split()
    if len(fields) == 5:
        fields = ["0", *fields]
    assert fields[3:] == ["*", "*", "*"], "oracle supports second/minute/hour fields only"
    allowed = (_values(fields[0], 0, 59), _values(fields[1], 0, 59), _values(fields[2], 0, 23))
    return functools.partial(_matches, allowed)


def _matches(allowed: tuple[set[int], set[int], set[int]], wall: datetime) -> bool:
    return wall.second in allowed[0] and wall.minute in allowed[1] and wall.hour in allowed[2]


@functools.cache
def oracle(
    expr: str, zone: str, start: datetime, end: datetime, step_s: int
) -> tuple[datetime, ...]:
    """Fire instants in [start, end), found by walking every instant ``step_s`` apart.

    An instant fires if its local wall time matches and is not a repeat of an
    earlier wall time, or if it is the first instant after a gap containing a
    matching (nonexistent) wall time.
    """
    z = ZoneInfo(zone)
    match = _matcher(expr)
    step = timedelta(seconds=step_s)
    out: list[datetime] = []
    u = start
    prev_wall = (u - step).astimezone(z).replace(tzinfo=None)
    while u < end:
        local = u.astimezone(z)
        wall = local.replace(tzinfo=None, fold=0)
        repeat = local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()
        fire = match(wall) and not repeat
        skipped = prev_wall + step
        while not fire and wall - prev_wall > step and skipped < wall:
            fire = match(skipped)
            skipped += step
        if fire:
            out.append(u)
        prev_wall, u = wall, u + step
    return tuple(out)


DST_DAYS = [
    ("Europe/Berlin", datetime(2026, 3, 29)),
    ("Europe/Berlin", datetime(2026, 10, 25)),
    ("America/New_York", datetime(2026, 3, 8)),
    ("America/New_York", datetime(2026, 11, 1)),
    ("Australia/Lord_Howe", datetime(2026, 4, 5)),  # falls back by 30 minutes
    ("Australia/Lord_Howe", datetime(2026, 10, 4)),  # springs forward by 30 minutes
]
MINUTE_EXPRESSIONS = [
    "30 2 * * *",
    "0 2 * * *",
    "0 3 * * *",
    "59 1 * * *",
    "15 1 * * *",
    "*/15 * * * *",
    "0,30 1-3 * * *",
    "45 */2 * * *",
    "* 1-3 * * *",
    "@hourly",
]


def _window(zone: str, day: datetime) -> tuple[datetime, datetime]:
    start = day.replace(tzinfo=ZoneInfo(zone)).astimezone(UTC) - timedelta(hours=2)
    return start, start + timedelta(hours=34)


@pytest.mark.parametrize(("zone", "day"), DST_DAYS)
@pytest.mark.parametrize("expr", MINUTE_EXPRESSIONS)
def test_dst_days_match_brute_force_oracle(expr: str, zone: str, day: datetime) -> None:
    start, end = _window(zone, day)
    expected = oracle(expr, zone, start, end, 60)
    c = cron(expr, tz=zone)
    got = []
    t = start - timedelta(seconds=1)
    while (t := c.next_fire_after(t)) < end:
        got.append(t)
    assert got == list(expected)


@pytest.mark.parametrize(("zone", "day"), DST_DAYS[:2])
def test_dst_per_second_schedule_matches_oracle(zone: str, day: datetime) -> None:
    # The hours around the change: from 01:00 local, three hours on.
    start = day.replace(hour=1, tzinfo=ZoneInfo(zone)).astimezone(UTC)
    end = start + timedelta(hours=3)
    expected = oracle("*/20 * * * * *", zone, start, end, 1)
    c = cron("*/20 * * * * *", tz=zone)
    got = []
    t = start - timedelta(microseconds=1)
    while (t := c.next_fire_after(t)) < end:
        got.append(t)
    assert got == list(expected)


@settings(max_examples=150, deadline=None)
@given(
    case=st.sampled_from([(e, z, d) for e in MINUTE_EXPRESSIONS for z, d in DST_DAYS]),
    offset_us=st.integers(min_value=0, max_value=26 * 3600 * 1_000_000),
)
def test_next_fire_after_any_instant_matches_oracle(
    case: tuple[str, str, datetime], offset_us: int
) -> None:
    expr, zone, day = case
    start, end = _window(zone, day)
    t = start + timedelta(microseconds=offset_us)
    expected = next(f for f in oracle(expr, zone, start, end, 60) if f > t)
    got = cron(expr, tz=zone).next_fire_after(t)
    assert got == expected
    assert got > t
    assert got.tzinfo is UTC


# -- value semantics --------------------------------------------------------------------


def test_equality_and_hash() -> None:
    same = [
        cron("0 0 * * *"),
        cron("@daily"),
        cron("@MIDNIGHT"),
        cron("0 0 0 * * *"),
        cron(" 0  0 * * * "),
    ]
    for a in same:
        for b in same:
            assert a == b
            assert hash(a) == hash(b)
    assert len(set(same)) == 1
    berlin = cron("0 0 * * *", tz="Europe/Berlin")
    assert berlin == cron("0 0 * * *", tz=BERLIN)
    assert hash(berlin) == hash(cron("0 0 * * *", tz=BERLIN))
    different = [
        cron("0 1 * * *"),
        berlin,
        cron("0 0 * * *", tz="UTC"),  # explicit UTC does not follow the app's zone
        cron("0 0 * * *", nowfun=lambda: utc(2026, 1, 1)),
    ]
    for other in different:
        assert cron("0 0 * * *") != other
    assert cron("0 0 * * *") != crontab(minute=0, hour=0)
    assert cron("0 0 * * *") != "0 0 * * *"
    assert {cron("@hourly"): 1}[cron("0 * * * *")] == 1


def test_pickle_round_trip() -> None:
    for original in [
        cron("*/5 * * * *"),
        cron("15 */10 * * * mon", tz="Europe/Berlin"),
        cron("@weekly", tz=NEW_YORK),
        cron("0 9 * * *", tz=timezone(timedelta(hours=5, minutes=30))),
    ]:
        copy = pickle.loads(pickle.dumps(original))
        assert copy == original
        assert hash(copy) == hash(original)
        assert repr(copy) == repr(original)
        assert copy.tz == original.tz
        t = utc(2026, 10, 25, 0, 45)
        assert copy.next_fire_after(t) == original.next_fire_after(t)
    # A schedule without an explicit zone keeps following the (new) app's zone.
    app = Celery("cron-pickle", set_as_current=False)
    app.conf.timezone = "Asia/Tokyo"
    loaded = pickle.loads(pickle.dumps(cron("0 9 * * *")))
    loaded.app = app
    assert loaded.tz == ZoneInfo("Asia/Tokyo")


# -- Celery schedule protocol ------------------------------------------------------------


def test_is_due_and_remaining_estimate() -> None:
    clock = Clock(utc(2026, 5, 1, 10, 4, 59))
    c = cron("*/5 * * * *", nowfun=clock)
    last = utc(2026, 5, 1, 10, 0, 0, 300_000)

    assert c.remaining_estimate(last) == timedelta(seconds=1)
    assert c.is_due(last) == (False, 1.0)

    clock.now = utc(2026, 5, 1, 10, 5)
    assert c.remaining_estimate(last) == timedelta(0)
    due, next_s = c.is_due(last)
    assert due is True
    assert next_s == 300.0

    clock.now = utc(2026, 5, 1, 10, 7, 30)  # beat was late
    assert c.remaining_estimate(last) == timedelta(seconds=-150)
    assert c.is_due(last) == (True, 150.0)
    # Having run at 10:07:30, the next run is 10:10.
    assert c.is_due(clock.now) == (False, 150.0)
    assert c.is_due(last)._fields == ("is_due", "next")  # Celery's schedstate


def test_is_due_keeps_fractions_of_a_second() -> None:
    clock = Clock(utc(2026, 5, 1, 10, 0, 0, 990_000))
    c = cron("* * * * * *", nowfun=clock)
    last = utc(2026, 5, 1, 10, 0, 0, 5_000)
    due, next_s = c.is_due(last)
    assert due is False
    assert next_s == pytest.approx(0.01)
    clock.now = utc(2026, 5, 1, 10, 0, 1, 2_000)
    due, next_s = c.is_due(last)
    assert due is True
    assert next_s == pytest.approx(0.998)


def test_is_due_across_fall_back_fires_once() -> None:
    """Drive is_due the way beat does: run when due, remember when it ran."""
    clock = Clock(utc(2026, 10, 24, 23, 0))
    c = cron("30 2 * * *", tz="Europe/Berlin", nowfun=clock)
    last = clock.now
    runs = []
    while clock.now < utc(2026, 10, 26, 3, 0):
        due, next_s = c.is_due(last)
        if due:
            runs.append(clock.now)
            last = clock.now
        clock.now += timedelta(seconds=max(next_s, 0.001))
    assert runs == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_is_due_uses_naive_last_run_as_utc_and_app_clock_by_default() -> None:
    app = Celery("cron-now", set_as_current=False)
    c = cron("0 0 1 1 *", app=app)  # once a year: never due right after a run
    now = app.now()
    due, next_s = c.is_due(now.astimezone(UTC).replace(tzinfo=None))
    assert due is False
    assert 0 < next_s <= 366 * 86400


# -- stock celery beat ---------------------------------------------------------------------


@pytest.fixture
def beat_process(redis_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    schedule_file = tmp_path / "beat-schedule"
    log = (tmp_path / "beat.log").open("wb")
    env = {**os.environ, "CRON_TEST_BROKER_URL": redis_url, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_cron_app",
            "beat",
            "-S",
            "celery.beat:PersistentScheduler",
            "-s",
            str(schedule_file),
            "--max-interval",
            "1",
            "-l",
            "info",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc, schedule_file
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        log.close()


@pytest.mark.integration
def test_stock_celery_beat_runs_a_per_second_cron(
    beat_process: tuple[subprocess.Popen[bytes], Path], redis_client: redis.Redis, tmp_path: Path
) -> None:
    proc, schedule_file = beat_process
    started = time.monotonic()
    deadline = started + 15
    wanted = 3
    while redis_client.llen("celery") < wanted:
        assert proc.poll() is None, (tmp_path / "beat.log").read_text()
        assert time.monotonic() < deadline, (
            f"only {redis_client.llen('celery')} messages; log:\n"
            + (tmp_path / "beat.log").read_text()
        )
        time.sleep(0.05)  # polling interval, not a wait for the outcome

    # Stop beat (SIGTERM makes it sync its schedule file) and look at what it sent.
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    elapsed = time.monotonic() - started
    messages = [json.loads(raw) for raw in redis_client.lrange("celery", 0, -1)]
    assert len(messages) >= wanted
    # One message per second at most: no duplicate ticks.
    assert len(messages) <= elapsed + 1, (len(messages), elapsed)
    for message in messages:
        assert message["headers"]["task"] == "celery_cron_app.tick"
        if celery.VERSION >= (5, 7):  # stock beat marks what it sends from Celery 5.7 on
            assert message["headers"].get("celery_beat_task") is True
    assert len({m["headers"]["id"] for m in messages}) == len(messages)

    # The entry went through beat's shelve (pickle) and came back equal.
    with shelve.open(str(schedule_file)) as db:
        entry = db["entries"]["every-second"]
    assert entry.schedule == cron("* * * * * *")
    assert entry.total_run_count >= wanted


@pytest.mark.parametrize(("expr", "tz"), [
    ("7 */3 * * 1-5", "Europe/Berlin"), ("30 2 * * *", "America/New_York"),
    ("*/5 * * * * *", None), ("0 0 29 2 *", None), ("15 1 L * *", "Australia/Lord_Howe")])
def test_the_reused_croniter_answers_as_a_fresh_one(expr: str, tz: str | None) -> None:
    """One croniter per expression, moved to each start: the same fire times as a
    croniter built afresh per call (as before), in any order of questions."""
    reused = cron(expr, tz)
    instants = [datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=s)
                for s in (0, 3_600 * 24 * 300, 59, 3_600 * 24 * 88 + 1, 7, 3_600 * 24 * 230,
                          3_600 * 24 * 302 + 1_800, 1)]
    for at in instants + instants[::-1]:
        fresh = cron(expr, tz)  # a new instance: its first call builds its croniter
        assert reused.next_fire_after(at) == fresh.next_fire_after(at), at
