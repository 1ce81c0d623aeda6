"""Validation of LeaderElectionConfig: each rule rejects a bad value by name."""

from __future__ import annotations

import math
import threading
from datetime import timedelta
from typing import Any

import pytest

from celery_leader import ConfigurationError, LeaderCallbacks, LeaderElectionConfig
from tests.fakes import FakeStore


def _noop_start(stop: threading.Event) -> None:
    pass


def _noop_stop() -> None:
    pass


def callbacks() -> LeaderCallbacks:
    return LeaderCallbacks(on_started_leading=_noop_start, on_stopped_leading=_noop_stop)


def make(**overrides: Any) -> LeaderElectionConfig:
    kwargs: dict[str, Any] = {
        "lock": FakeStore().lock("me"),
        "callbacks": callbacks(),
        "lease_duration": 1.0,
        "renew_deadline": 0.7,
        "retry_period": 0.2,
    }
    kwargs.update(overrides)
    return LeaderElectionConfig(**kwargs)


def test_valid_config_is_accepted_and_durations_are_floats() -> None:
    config = make(lease_duration=15, renew_deadline=10, retry_period=2)
    assert (config.lease_duration, config.renew_deadline, config.retry_period) == (15.0, 10.0, 2.0)
    assert all(type(v) is float
               for v in (config.lease_duration, config.renew_deadline, config.retry_period))


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)


def test_timedelta_durations_are_accepted_as_seconds() -> None:
    config = make(
        lease_duration=timedelta(seconds=1, milliseconds=500),
        renew_deadline=timedelta(milliseconds=900),
        retry_period=timedelta(milliseconds=250),
    )
    assert config.lease_duration == pytest.approx(1.5)
    assert config.renew_deadline == pytest.approx(0.9)
    assert config.retry_period == pytest.approx(0.25)


@pytest.mark.parametrize("lease", [0.7, 0.5])
def test_lease_must_exceed_renew_deadline(lease: float) -> None:
    with pytest.raises(ConfigurationError, match=r"lease_duration .* renew_deadline"):
        make(lease_duration=lease, renew_deadline=0.7)


def test_renew_deadline_must_exceed_jitter_times_retry_period() -> None:
    # 1.2 x 1.0 == 1.2 exactly in floating point: equality is rejected...
    with pytest.raises(ConfigurationError, match=r"renew_deadline .* 1.2 x retry_period"):
        make(lease_duration=5.0, renew_deadline=1.2, retry_period=1.0)
    with pytest.raises(ConfigurationError, match=r"renew_deadline"):
        make(lease_duration=5.0, renew_deadline=1.0, retry_period=1.0)
    # ...and anything above it is fine.
    make(lease_duration=5.0, renew_deadline=1.21, retry_period=1.0)


@pytest.mark.parametrize("field", ["lease_duration", "renew_deadline", "retry_period"])
@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, timedelta(0), timedelta(seconds=-3)])
def test_each_duration_must_be_positive(field: str, bad: object) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{field} must be greater than zero"):
        make(**{field: bad})


@pytest.mark.parametrize("field", ["lease_duration", "renew_deadline", "retry_period"])
@pytest.mark.parametrize("bad", ["1", None, True, False, [1], b"1"])
def test_each_duration_must_be_a_number(field: str, bad: object) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{field} must be a number of seconds"):
        make(**{field: bad})


@pytest.mark.parametrize("field", ["lease_duration", "renew_deadline", "retry_period"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_each_duration_must_be_finite(field: str, bad: float) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{field} must be finite"):
        make(**{field: bad})


def test_missing_callbacks_object() -> None:
    with pytest.raises(ConfigurationError, match="on_started_leading"):
        make(callbacks=None)


def test_missing_on_started_leading() -> None:
    cbs = LeaderCallbacks(on_started_leading=None, on_stopped_leading=_noop_stop)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="on_started_leading"):
        make(callbacks=cbs)


def test_missing_on_stopped_leading() -> None:
    cbs = LeaderCallbacks(on_started_leading=_noop_start, on_stopped_leading=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="on_stopped_leading"):
        make(callbacks=cbs)


def test_on_new_leader_must_be_callable_when_given() -> None:
    cbs = LeaderCallbacks(_noop_start, _noop_stop, on_new_leader="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="on_new_leader"):
        make(callbacks=cbs)
    make(callbacks=LeaderCallbacks(_noop_start, _noop_stop, on_new_leader=print))


def test_lock_is_required() -> None:
    with pytest.raises(ConfigurationError, match="lock must not be None"):
        make(lock=None)


def test_lock_identity_must_not_be_empty() -> None:
    with pytest.raises(ConfigurationError, match="identity"):
        make(lock=FakeStore().lock(""))


def test_durations_are_checked_before_their_relations() -> None:
    # client-go order: a negative renew deadline is reported as such, not as
    # "lease must exceed renew deadline" or a jitter violation.
    with pytest.raises(ConfigurationError, match=r"^retry_period must be greater than zero"):
        make(retry_period=-1)


def test_validate_catches_later_mutation() -> None:
    config = make()
    config.renew_deadline = 2.0
    with pytest.raises(ConfigurationError, match="lease_duration"):
        config.validate()
    config.renew_deadline = "soon"
    with pytest.raises(ConfigurationError, match=r"^renew_deadline must be a number"):
        config.validate()
