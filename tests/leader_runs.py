"""What must hold of the runs of leader-only messages, whatever the faults were.

Shared by tests/test_leader_queue_faults.py and the chaos suite.  Pure logic over
what the replicas recorded (``test:events``): leadership signals
(``started_leading`` / ``stopped_leading`` with ``identity``, ``term``, ``at``)
and one record per run of a leader-only task (``task_id``, ``label``, ``term``
the run was claimed under, ``current_term`` seen by the body, ``identity`` of the
replica, ``at``).  ``at`` is CLOCK_MONOTONIC, comparable across the processes of
one host.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# A run the fault caught between its start and the record of its end (the claim's
# "done" and the broker ack) is ambiguous to the system: it may run again under
# the next term, as every Celery task may after a crash.  The window of a no-op
# task is milliseconds; this bounds it generously on a loaded machine.
IN_FLIGHT = 1.0


@dataclass(frozen=True)
class Interruption:
    """A fault that cut a replica off at ``at``: its ``pid`` (the worker's main
    process), or None for one that hit every replica (Redis itself)."""

    pid: int | None
    at: float


def identity_pid(identity: str) -> int:
    """The pid in a default identity (``<hostname>:<pid>``)."""
    return int(identity.rsplit(":", 1)[1])


def leaderships(events: Iterable[dict[str, Any]]) -> dict[tuple[str, int], tuple[float, float]]:
    """(identity, term) -> (started at, stopped at, or +inf) of every leadership."""
    spans: dict[tuple[str, int], tuple[float, float]] = {}
    for event in events:
        if event["kind"] not in ("started_leading", "stopped_leading"):
            continue
        key = (event["identity"], event["term"])
        began, ended = spans.get(key, (float("-inf"), float("inf")))
        if event["kind"] == "started_leading":
            began = event["at"]
        else:
            ended = event["at"]
        spans[key] = (began, ended)
    return spans


def _interrupted(run: dict[str, Any], interruptions: Iterable[Interruption]) -> bool:
    """The run was in flight when a fault cut its replica off.  A body can start
    just after the cut too: its start claim's reply crossed before the cut (no
    claim can cross after it, and once the cut ends the term is over), so its
    end, not its start, was caught."""
    pid = identity_pid(run["identity"])
    return any((cut.pid is None or cut.pid == pid)
               and cut.at - IN_FLIGHT <= run["at"] <= cut.at + IN_FLIGHT
               for cut in interruptions)


def check_leader_runs(sent: dict[str, str], runs: list[dict[str, Any]],
                      events: list[dict[str, Any]],
                      interruptions: Iterable[Interruption] = ()) -> tuple[list[str], list[str]]:
    """(problems, excused) for the messages ``sent`` (task id -> label):

    - every message ran (lost otherwise);
    - none ran twice, except a run in flight when a fault interrupted its replica,
      run again under a later term (excused, listed);
    - every run was claimed under a non-zero term that its replica started leading
      under, at or after that start, not after that leadership stopped, and the
      body saw that same term (or 0 with that term's validity on the page just
      past: the guard checks the term after its fenced claim, so the run started
      within it, and the validity ran out before the body's first line read it;
      recorded where the app reports ``page_term``/``page_lapsed``).
    """
    interruptions = list(interruptions)
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        if run["task_id"] in sent:
            by_id[run["task_id"]].append(run)
    spans = leaderships(events)
    problems: list[str] = []
    excused: list[str] = []

    lost = sorted((label for task_id, label in sent.items() if task_id not in by_id),
                  key=natural)
    if lost:
        problems.append(f"lost {len(lost)} of {len(sent)} leader-only messages: {lost}")

    twice = []
    for task_id, same in by_id.items():
        if len(same) < 2:
            continue
        same.sort(key=lambda run: run["at"])
        first, rest = same[0], same[1:]
        if (len(rest) == 1 and rest[0]["term"] > first["term"]
                and _interrupted(first, interruptions)):
            excused.append(f"{sent[task_id]} (in flight on {first['identity']} under term "
                           f"{first['term']} when a fault hit it; ran again under term "
                           f"{rest[0]['term']})")
        else:
            twice.append(f"{sent[task_id]} x{len(same)} (terms {[r['term'] for r in same]})")
    if twice:
        problems.append(f"ran more than once: {sorted(twice, key=natural)}")

    outside = []
    for run in (run for same in by_id.values() for run in same):
        span = spans.get((run["identity"], run["term"]))
        lapsed = (run["current_term"] == 0 and run.get("page_term") == run["term"]
                  and run.get("page_lapsed") is True)
        if (not run["term"] or span is None or not span[0] <= run["at"] <= span[1]
                or (run["current_term"] != run["term"] and not lapsed)):
            outside.append(f"{run['label']} on {run['identity']} under term {run['term']} "
                           f"(body saw term {run['current_term']}; leadership {span})")
    if outside:
        problems.append(f"ran outside a leadership of its replica: {outside}")
    return problems, excused


def natural(label: str) -> tuple[str, int]:
    """Sort key: "s10" after "s9" (the first word of ``label`` counts)."""
    word = label.split(" ", 1)[0]
    head = word.rstrip("0123456789")
    digits = word[len(head):]
    return head, int(digits) if digits else -1
