"""An entry's ``options`` take every option Celery documents for ``apply_async``.

Checked against Celery's own list (``Task.apply_async``'s docstring, and the
kombu ``Producer.publish`` keywords it says it passes on), not against ours; the
few a schedule cannot carry are refused at start-up with one line naming the
entry, the option and why.  The accepted ones reach each tick's ``send_task`` on
both herd paths, against a real Redis used as lease store and broker.
"""

from __future__ import annotations

import inspect
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery
from celery.app.task import Task
from kombu import Producer, Queue

from celery_leader.schedule.entries import (
    OPTION_KEYS,
    REFUSED_OPTIONS,
    EntryError,
    entries_from_config,
    entry_from_config,
)
from tests.test_atomic_publish import PATHS, Rig, messages, rig  # noqa: F401  (fixture)

# A value of each accepted option, as a schedule would give it.
SAMPLES: dict[str, Any] = {
    "queue": "celery", "exchange": "celery", "routing_key": "celery", "priority": 3,
    "expires": 240, "headers": {"team": "billing"}, "serializer": "json",
    "compression": "zlib", "time_limit": 60, "soft_time_limit": 50, "countdown": 5,
    "eta": datetime(2031, 1, 1, tzinfo=timezone.utc), "link": {"task": "proj.after"},
    "link_error": {"task": "proj.failed"}, "immediate": False, "mandatory": False,
    "delivery_mode": 2, "ignore_result": True, "shadow": "nightly", "add_to_parent": False,
    "retry": True, "retry_policy": {"max_retries": 3, "interval_start": 0,
                                    "interval_step": 0.2, "interval_max": 1},
    "content_type": "application/json", "content_encoding": "utf-8", "expiration": 30,
    "timeout": 5, "confirm_timeout": 5,
}


def celery_documented_options() -> set[str]:
    """The option names Celery documents for apply_async, read from Celery itself."""
    doc = inspect.getdoc(Task.apply_async) or ""
    arguments = doc.split("Arguments:", 1)[1].split("Returns:", 1)[0]
    names = set(re.findall(r"^    (\w+) \(", arguments, re.MULTILINE))
    assert {"countdown", "retry", "retry_policy", "queue", "link"} <= names, names
    # "Also supports all keyword arguments supported by kombu.Producer.publish."
    assert "kombu.Producer.publish" in doc
    publish = inspect.signature(Producer.publish).parameters
    names |= {name for name, param in publish.items()
              if name not in ("self", "body") and param.kind is not param.VAR_KEYWORD}
    return names


def app() -> Celery:
    return Celery("opts", set_as_current=False, broker="memory://")


def test_every_option_celery_documents_is_accepted_or_refused_with_a_reason() -> None:
    documented = celery_documented_options()
    assert documented <= OPTION_KEYS | REFUSED_OPTIONS.keys(), (
        documented - OPTION_KEYS - REFUSED_OPTIONS.keys())
    assert OPTION_KEYS.isdisjoint(REFUSED_OPTIONS)
    assert set(SAMPLES) == OPTION_KEYS


def test_a_schedule_with_every_accepted_option_starts() -> None:
    """The issue's case first: retry and retry_policy stopped the worker."""
    the_app = app()
    the_app.conf.beat_schedule = {
        "retrying": {"task": "proj.job", "schedule": 60.0,
                     "options": {"retry": True, "retry_policy": SAMPLES["retry_policy"]}},
        "everything": {"task": "proj.job", "schedule": 60.0, "options": dict(SAMPLES)},
    }
    entries = entries_from_config(the_app)
    assert entries["retrying"].options["retry_policy"] == SAMPLES["retry_policy"]
    assert entries["everything"].options == SAMPLES


@pytest.mark.parametrize("option", sorted(REFUSED_OPTIONS))
def test_an_option_a_schedule_cannot_carry_is_refused_naming_entry_and_option(
        option: str) -> None:
    with pytest.raises(EntryError) as caught:
        entry_from_config("nightly", {"task": "proj.job", "schedule": 60.0,
                                      "options": {option: "x"}}, app())
    message = str(caught.value)
    assert "'nightly'" in message and repr(option) in message
    assert REFUSED_OPTIONS[option] in message and "\n" not in message


def test_an_option_value_that_cannot_wait_in_redis_is_refused() -> None:
    """A kombu Queue would have been sent as its repr (the pending copy is JSON)."""
    with pytest.raises(EntryError, match=r"'nightly'.*options\['queue'\] must be plain data"
                                         r".*give the name instead"):
        entry_from_config("nightly", {"task": "proj.job", "schedule": 60.0,
                                      "options": {"queue": Queue("reports")}}, app())
    assert entry_from_config("d", {"task": "proj.job", "schedule": 60.0,
                                   "options": {"countdown": timedelta(minutes=4)}}, app())


@pytest.mark.parametrize("path", PATHS)
def test_accepted_options_reach_each_ticks_publish(rig: Rig, path: str) -> None:  # noqa: F811
    lock, term = rig.lead("a")
    runner = rig.runner(lock, send_task=path == "send_task")
    sent: list[dict[str, Any]] = []
    send_task = runner.app.send_task

    def spy(*args: Any, **kwargs: Any) -> Any:
        sent.append(kwargs)
        return send_task(*args, **kwargs)

    runner.app.send_task = spy  # type: ignore[method-assign]
    options = {"retry": True, "retry_policy": SAMPLES["retry_policy"], "shadow": "nightly",
               "time_limit": 60, "soft_time_limit": 50, "headers": {"team": "billing"},
               "priority": 3, "queue": "ticks"}
    rig.fire(runner, term, options=options)
    assert sent, "send_task was never called"
    for call in sent:
        assert call["retry"] is True and call["retry_policy"] == SAMPLES["retry_policy"]
    [message] = messages(rig.client, "ticks\x06\x163")
    headers = message["headers"]
    assert (headers["shadow"], headers["timelimit"], headers["team"]) == (
        "nightly", [60, 50], "billing")
    assert runner.dispatched == 1
