"""The JSON lease record: exact round trip in milliseconds, and nothing but
MalformedRecordError for bytes it does not understand."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_leader import LeaderElectionRecord, MalformedRecordError

FULL = LeaderElectionRecord(
    holder_identity="worker-1@host",
    lease_duration=15.0,
    acquire_time=1_700_000_000.123,
    renew_time=1_700_000_010.456,
    leader_transitions=7,
    term=42,
    version=99,
)


def test_round_trip_preserves_every_field() -> None:
    assert LeaderElectionRecord.from_json(FULL.to_json()) == FULL
    assert LeaderElectionRecord.from_json(FULL.to_json().encode()) == FULL


def test_serialised_form_is_compact_sorted_json_in_milliseconds() -> None:
    raw = FULL.to_json()
    assert raw == json.dumps(json.loads(raw), separators=(",", ":"), sort_keys=True)
    assert json.loads(raw) == {
        "holderIdentity": "worker-1@host",
        "leaseDurationMs": 15000,
        "acquireTimeMs": 1_700_000_000_123,
        "renewTimeMs": 1_700_000_010_456,
        "leaderTransitions": 7,
        "term": 42,
        "version": 99,
    }


@pytest.mark.parametrize("lease", [0.5, 0.001, 0.25, 1.75])
def test_sub_second_lease_survives(lease: float) -> None:
    record = LeaderElectionRecord(holder_identity="a", lease_duration=lease, term=1)
    parsed = LeaderElectionRecord.from_json(record.to_json())
    assert parsed.lease_duration == lease
    assert parsed.lease_duration > 0


def test_durations_round_to_the_millisecond() -> None:
    record = LeaderElectionRecord(holder_identity="a", lease_duration=0.0015, term=1)
    assert json.loads(record.to_json())["leaseDurationMs"] == 2
    assert LeaderElectionRecord.from_json(record.to_json()).lease_duration == 0.002


def test_optional_fields_default() -> None:
    parsed = LeaderElectionRecord.from_json('{"holderIdentity":"a","leaseDurationMs":500,"term":3}')
    assert parsed == LeaderElectionRecord(holder_identity="a", lease_duration=0.5, term=3)


def test_empty_holder_is_a_valid_record() -> None:
    parsed = LeaderElectionRecord.from_json('{"holderIdentity":"","leaseDurationMs":1,"term":0}')
    assert parsed.holder_identity == ""


def test_holder_instance_is_a_field_beside_the_identity() -> None:
    record = LeaderElectionRecord(holder_identity="pod-0", holder_instance="9f3a",
                                  lease_duration=1.0, term=5)
    data = json.loads(record.to_json())
    assert (data["holderIdentity"], data["holderInstance"]) == ("pod-0", "9f3a")
    assert LeaderElectionRecord.from_json(record.to_json()) == record
    assert record.held_by("pod-0", "9f3a") and not record.held_by("pod-0", "other")
    # Without one (a record of an older version) the field is absent, not "".
    old = LeaderElectionRecord(holder_identity="pod-0", lease_duration=1.0, term=5)
    assert "holderInstance" not in json.loads(old.to_json())
    assert LeaderElectionRecord.from_json(old.to_json()).holder_instance == ""


def test_unicode_identity_round_trips() -> None:
    record = LeaderElectionRecord(holder_identity="wörker-☃", lease_duration=1.0, term=5)
    assert LeaderElectionRecord.from_json(record.to_json().encode("utf-8")) == record


BASE: dict[str, Any] = {"holderIdentity": "a", "leaseDurationMs": 1000, "term": 1}


def _with(**changes: Any) -> str:
    data = dict(BASE)
    for key, value in changes.items():
        if value is _MISSING:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


_MISSING = object()

MALFORMED: list[bytes | str] = [
    b"",
    b"not json",
    b"\xff\xfe\x00garbage",  # not UTF-8
    b"\x80\x81",
    "{",
    "null",
    "42",
    '"a string"',
    "[1, 2, 3]",
    "true",
    "<wrongtype:hash>",
    _with(holderIdentity=_MISSING),
    _with(holderIdentity=None),
    _with(holderIdentity=7),
    _with(holderIdentity=["a"]),
    _with(holderInstance=7),
    _with(holderInstance=None),
    _with(leaseDurationMs=_MISSING),
    _with(leaseDurationMs=None),
    _with(leaseDurationMs="1000"),
    _with(leaseDurationMs=True),
    _with(leaseDurationMs={"ms": 1}),
    _with(term=_MISSING),
    _with(term="1"),
    _with(term=False),
    _with(version="2"),
    _with(acquireTimeMs=None),
    _with(leaderTransitions=[]),
    # Non-finite and out-of-range numbers: Python's json accepts these.
    '{"holderIdentity":"a","leaseDurationMs":Infinity,"term":1}',
    '{"holderIdentity":"a","leaseDurationMs":-Infinity,"term":1}',
    '{"holderIdentity":"a","leaseDurationMs":NaN,"term":1}',
    '{"holderIdentity":"a","leaseDurationMs":1000,"term":NaN}',
    '{"holderIdentity":"a","leaseDurationMs":1e400,"term":1}',
    '{"holderIdentity":"a","leaseDurationMs":1' + "0" * 400 + ',"term":1}',
    '{"holderIdentity":"a","leaseDurationMs":1000,"term":1,"renewTimeMs":1' + "0" * 400 + "}",
    # Nesting deep enough to exhaust the decoder's recursion.
    "[" * 100_000,
    '{"a":' * 100_000,
]


@pytest.mark.parametrize("raw", MALFORMED, ids=lambda r: repr(r)[:40])
def test_malformed_input_raises_malformed_record_error(raw: bytes | str) -> None:
    with pytest.raises(MalformedRecordError):
        LeaderElectionRecord.from_json(raw)


def test_malformed_record_error_is_a_value_error() -> None:
    assert issubclass(MalformedRecordError, ValueError)


def _parse_or_malformed(raw: bytes | str) -> None:
    try:
        record = LeaderElectionRecord.from_json(raw)
    except MalformedRecordError:
        return
    assert isinstance(record, LeaderElectionRecord)
    assert isinstance(record.holder_identity, str)
    assert isinstance(record.term, int)
    assert isinstance(record.lease_duration, float)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_bytes_never_raise_anything_else(raw: bytes) -> None:
    _parse_or_malformed(raw)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_text_never_raise_anything_else(raw: str) -> None:
    _parse_or_malformed(raw)


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**500), max_value=10**500)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=10,
)
FIELDS = ["holderIdentity", "leaseDurationMs", "acquireTimeMs", "renewTimeMs",
          "leaderTransitions", "term", "version", "holderInstance"]


NUMBERS = (
    st.integers(min_value=-(2**64), max_value=2**64)
    | st.sampled_from([10**308, 10**400, -(10**400)])
    | st.floats(allow_nan=True, allow_infinity=True)
)
FIELD_VALUES = NUMBERS | JSON_SCALARS | JSON_VALUES


@st.composite
def record_shaped(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed records with one or more fields replaced or removed."""
    data: dict[str, Any] = {"holderIdentity": draw(st.text(max_size=8))}
    for name in FIELDS[1:-1]:
        data[name] = draw(NUMBERS)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        if draw(st.booleans()):
            data.pop(name, None)
        else:
            data[name] = draw(FIELD_VALUES)
    return data


@settings(max_examples=500, deadline=None)
@given(record_shaped())
def test_fuzz_record_shaped_json_never_raises_anything_else(data: dict[str, Any]) -> None:
    # Python's json emits NaN/Infinity and huge integers; so could a foreign writer.
    _parse_or_malformed(json.dumps(data))


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_fuzz_arbitrary_json_never_raises_anything_else(value: Any) -> None:
    _parse_or_malformed(json.dumps(value))


@settings(max_examples=200, deadline=None)
@given(
    holder=st.text(max_size=30),
    lease_ms=st.integers(min_value=1, max_value=10**9),
    acquire_ms=st.integers(min_value=0, max_value=10**13),
    renew_ms=st.integers(min_value=0, max_value=10**13),
    transitions=st.integers(min_value=0, max_value=10**9),
    term=st.integers(min_value=0, max_value=2**53),
    version=st.integers(min_value=0, max_value=2**53),
)
def test_fuzz_round_trip_of_millisecond_records(holder: str, lease_ms: int, acquire_ms: int,
                                                 renew_ms: int, transitions: int, term: int,
                                                 version: int) -> None:
    record = LeaderElectionRecord(
        holder_identity=holder,
        lease_duration=lease_ms / 1000.0,
        acquire_time=acquire_ms / 1000.0,
        renew_time=renew_ms / 1000.0,
        leader_transitions=transitions,
        term=term,
        version=version,
    )
    raw = record.to_json()
    assert LeaderElectionRecord.from_json(raw) == record
    assert LeaderElectionRecord.from_json(raw).to_json() == raw
