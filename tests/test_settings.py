"""``leader_*`` settings: read through Celery's config (Django ``CELERY_`` namespace
included), validated at start-up, every error naming the setting and its value.

Real worker processes stopping on a bad setting are in test_celery_worker.py.
"""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from celery_leader import ConfigurationError
from celery_leader.integration import controller_for_worker
from celery_leader.settings import LeaderSettings, read_settings

BROKER = "redis://127.0.0.1:6390/2"


def django_app(**settings: Any) -> Celery:
    """An app configured the Django way: ``config_from_object(obj, namespace="CELERY")``."""
    config = SimpleNamespace(**settings)
    app = Celery("proj", set_as_current=False)
    app.config_from_object(config, namespace="CELERY")
    return app


@pytest.fixture(autouse=True)
def _no_broker_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)


def test_django_namespace_settings_take_effect() -> None:
    app = django_app(
        CELERY_BROKER_URL=BROKER,
        CELERY_LEADER_REDIS_URL="redis://127.0.0.1:6391/5",
        CELERY_LEADER_REDIS_OPTIONS={"socket_keepalive": True},
        CELERY_LEADER_NAME="billing",
        CELERY_LEADER_KEY_PREFIX="ha",
        CELERY_LEADER_LEASE_DURATION=4,
        CELERY_LEADER_RENEW_DEADLINE=timedelta(seconds=3),
        CELERY_LEADER_RETRY_PERIOD="1.5",  # strings, as from an environment variable
        CELERY_LEADER_RELEASE_ON_CANCEL="false",
        CELERY_LEADER_IDENTITY="pod-7",
        CELERY_LEADER_BEAT="no",
        CELERY_LEADER_QUEUE="leader_only",
        CELERY_LEADER_HEALTHZ_PORT="8081",
        CELERY_LEADER_CATCH_UP="all",
        CELERY_LEADER_MISFIRE_GRACE=30,
    )
    settings = read_settings(app)
    assert (settings.redis_url, settings.redis_options) == (
        "redis://127.0.0.1:6391/5", {"socket_keepalive": True})
    assert (settings.name, settings.key_prefix, settings.identity) == ("billing", "ha", "pod-7")
    assert (settings.lease_duration, settings.renew_deadline, settings.retry_period) == (
        4.0, 3.0, 1.5)
    assert settings.release_on_cancel is False and settings.beat is False
    assert (settings.queue, settings.healthz_port) == ("leader_only", 8081)
    assert (settings.catch_up, settings.misfire_grace) == ("all", 30.0)
    assert settings.default_identity("w1@host") == "pod-7"


def test_plain_lowercase_settings_take_effect() -> None:
    app = Celery("proj", set_as_current=False)
    app.conf.update(broker_url=BROKER, leader_name="plain", leader_lease_duration=3.0,
                    leader_renew_deadline=2.0, leader_retry_period=0.5)
    settings = read_settings(app)
    assert (settings.name, settings.lease_duration, settings.renew_deadline,
            settings.retry_period) == ("plain", 3.0, 2.0, 0.5)


def test_defaults_and_broker_fallback() -> None:
    settings = read_settings(django_app(CELERY_BROKER_URL=BROKER))
    assert settings == LeaderSettings(redis_url=BROKER, name="proj")
    assert (settings.lease_duration, settings.renew_deadline, settings.retry_period) == (
        15.0, 10.0, 2.0)
    assert settings.default_identity("w1@host").startswith("w1@host:")


def test_reading_never_shadows_a_config_loaded_later() -> None:
    """Defaults are not written back into app.conf (the add_defaults/setdefault trap)."""
    app = Celery("proj", set_as_current=False)
    app.conf.broker_url = BROKER
    assert read_settings(app).lease_duration == 15.0
    assert app.conf.get("leader_lease_duration") is None
    app.config_from_object(SimpleNamespace(CELERY_LEADER_LEASE_DURATION=6.0,
                                           CELERY_LEADER_RENEW_DEADLINE=4.0,
                                           CELERY_BROKER_URL=BROKER), namespace="CELERY")
    assert (read_settings(app).lease_duration, read_settings(app).renew_deadline) == (6.0, 4.0)


INVALID = [
    # (setting without the CELERY_ prefix, value, expected message)
    ("LEADER_LEASE_DURATION", "soon", "leader_lease_duration must be a number of seconds, "
                                      "got 'soon'"),
    ("LEADER_LEASE_DURATION", True, "leader_lease_duration must be a number of seconds or a "
                                    "timedelta, got True"),
    ("LEADER_RETRY_PERIOD", [1], "leader_retry_period must be a number of seconds or a "
                                 "timedelta, got [1]"),
    ("LEADER_LEASE_DURATION", "nan", "leader_lease_duration must be finite, got nan"),
    ("LEADER_RENEW_DEADLINE", -1, "leader_renew_deadline must be greater than zero, got -1.0"),
    ("LEADER_RETRY_PERIOD", 0, "leader_retry_period must be greater than zero, got 0.0"),
    ("LEADER_LEASE_DURATION", 10, "leader_lease_duration (10.0) must be greater than "
                                  "leader_renew_deadline (10.0)"),
    ("LEADER_RETRY_PERIOD", 9, "leader_renew_deadline (10.0) must be greater than 1.2 x "
                               "leader_retry_period (9.0)"),
    ("LEADER_MISFIRE_GRACE", "0", "leader_misfire_grace must be greater than zero or None, "
                                  "got '0'"),
    ("LEADER_RELEASE_ON_CANCEL", "maybe", "leader_release_on_cancel must be a boolean, "
                                          "got 'maybe'"),
    ("LEADER_BEAT", 1, "leader_beat must be a boolean, got 1"),
    ("LEADER_NAME", "", "leader_name must be a non-empty string, got ''"),
    ("LEADER_NAME", "a{b}", "leader_name must not contain braces, got 'a{b}'"),
    ("LEADER_KEY_PREFIX", 5, "leader_key_prefix must be a non-empty string, got 5"),
    ("LEADER_QUEUE", None, "leader_queue must be a non-empty string, got None"),
    ("LEADER_IDENTITY", " ", "leader_identity must be a non-empty string, got ' '"),
    ("LEADER_HEALTHZ_PORT", 70000, "leader_healthz_port must be a TCP port (0-65535) or None, "
                                   "got 70000"),
    ("LEADER_HEALTHZ_PORT", "http", "leader_healthz_port must be a TCP port (0-65535) or "
                                    "None, got 'http'"),
    ("LEADER_HEALTHZ_PORT", True, "leader_healthz_port must be a TCP port (0-65535) or None, "
                                  "got True"),
    ("LEADER_REDIS_OPTIONS", "socket_timeout=1", "leader_redis_options must be a dict of "
                                                 "redis client options, got 'socket_timeout=1'"),
    ("LEADER_CATCH_UP", "sometimes", "leader_catch_up must be one of latest, all, none, "
                                     "got 'sometimes'"),
    ("LEADER_REDIS_URL", 42, "leader_redis_url must be a URL string, got 42"),
    ("LEADER_REDIS_URL", "http://127.0.0.1:6379/0", "leader_redis_url has an unknown scheme in "
                                                    "'http://127.0.0.1:6379/0'; use one of "),
    ("LEADER_REDIS_URL", "redis://a:1/0;http://b:2/0", "leader_redis_url has an unknown scheme "
                                                       "in 'redis://a:1/0;http://b:2/0'"),
    ("LEADER_REDIS_URL", "127.0.0.1:6379", "leader_redis_url has an unknown scheme in "
                                           "'127.0.0.1:6379'"),
]


@pytest.mark.parametrize(("name", "value", "message"), INVALID,
                         ids=[f"{name.lower()}={value!r}" for name, value, _ in INVALID])
def test_each_invalid_setting_is_a_clear_error(name: str, value: Any, message: str) -> None:
    app = django_app(CELERY_BROKER_URL=BROKER, **{f"CELERY_{name}": value})
    with pytest.raises(ConfigurationError) as caught:
        read_settings(app)
    text = str(caught.value)
    assert text.startswith(message), text
    assert name.lower() in text
    assert "\n" not in text


@pytest.mark.parametrize("broker", [None, "amqp://guest@127.0.0.1//", "memory://"])
def test_no_redis_url_anywhere_is_a_clear_error(broker: str | None) -> None:
    app = django_app(**({"CELERY_BROKER_URL": broker} if broker else {}))
    with pytest.raises(ConfigurationError) as caught:
        read_settings(app)
    text = str(caught.value)
    assert text.startswith("leader_redis_url is not set and broker_url ("), text
    assert repr(broker or "") in text
    assert "redis://" in text


def test_sentinel_url_without_master_name_is_a_clear_error() -> None:
    settings = read_settings(django_app(CELERY_BROKER_URL="sentinel://127.0.0.1:26379"))
    with pytest.raises(ConfigurationError, match=r"leader_redis_options\['master_name'\]"):
        settings.redis_client()


# ------------------------------------------------------------ at worker start


def fake_worker(app: Celery, pool: Any = "prefork") -> SimpleNamespace:
    return SimpleNamespace(app=app, pool_cls=pool, hostname="w1@host")


@pytest.mark.parametrize(("settings", "options", "expected"), [
    ({"CELERY_LEADER_RETRY_PERIOD": "often"}, {},
     "leader_retry_period must be a number of seconds, got 'often'"),
    ({}, {"leader_name": "a{b}"}, "--leader-name must not contain braces, got 'a{b}'"),
    ({}, {"leader_identity": " "}, "--leader-identity must be a non-empty string, got ' '"),
    ({}, {"leader_healthz_port": 70000},
     "--leader-healthz-port must be a TCP port (0-65535) or None, got 70000"),
], ids=["setting", "leader-name-flag", "leader-identity-flag", "healthz-port-flag"])
def test_worker_start_stops_with_one_line_naming_the_setting(
        capsys: pytest.CaptureFixture[str], settings: dict[str, Any], options: dict[str, Any],
        expected: str) -> None:
    app = django_app(CELERY_BROKER_URL=BROKER, **settings)
    with pytest.raises(SystemExit) as caught:
        controller_for_worker(fake_worker(app), options)
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"celery-leader: configuration error: {expected}\n"


def test_unsupported_pool_stops_the_worker(capsys: pytest.CaptureFixture[str]) -> None:
    app = django_app(CELERY_BROKER_URL=BROKER)
    with pytest.raises(SystemExit) as caught:
        controller_for_worker(fake_worker(app, pool="celery.concurrency.gevent:TaskPool"), {})
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        "celery-leader: configuration error: worker pool 'celery.concurrency.gevent:TaskPool' "
        "is not supported by celery-leader; use prefork, threads or solo\n")
