"""The checker of leader-only runs (tests/leader_runs.py) finds each kind of violation."""

from __future__ import annotations

from typing import Any

from tests.leader_runs import Interruption, check_leader_runs

A, B = "w1@host:101", "w2@host:102"
EVENTS = [
    {"kind": "started_leading", "identity": A, "term": 1, "at": 10.0},
    {"kind": "stopped_leading", "identity": A, "term": 1, "at": 20.0},
    {"kind": "started_leading", "identity": B, "term": 3, "at": 22.0},
]


def run(task_id: str, at: float, identity: str = A, term: int = 1,
        seen: int | None = None) -> dict[str, Any]:
    return {"task_id": task_id, "label": task_id, "at": at, "identity": identity,
            "term": term, "current_term": term if seen is None else seen}


def test_good_runs_pass() -> None:
    sent = {"m1": "m1", "m2": "m2"}
    runs = [run("m1", 11.0), run("m2", 23.0, B, 3)]
    assert check_leader_runs(sent, runs, EVENTS) == ([], [])


def test_each_violation_is_named() -> None:
    sent = {"m1": "m1", "m2": "m2", "m3": "m3", "m4": "m4", "m5": "m5"}
    runs = [run("m2", 11.0), run("m2", 12.0),   # twice under one term
            run("m3", 21.0),                    # after term 1 stopped
            run("m4", 23.0, B, 1),              # a term B never led under
            run("m5", 23.0, B, 3, seen=0)]      # the body saw no term
    problems, excused = check_leader_runs(sent, runs, EVENTS)
    text = "\n".join(problems)
    assert "lost 1 of 5 leader-only messages: ['m1']" in text
    assert "ran more than once: ['m2 x2 (terms [1, 1])']" in text
    assert "m3 on" in text and "m4 on" in text and "m5 on" in text
    assert excused == []


def test_a_run_caught_in_flight_by_a_fault_may_run_again_under_a_later_term() -> None:
    sent = {"m1": "m1"}
    runs = [run("m1", 19.5), run("m1", 23.0, B, 3)]
    assert check_leader_runs(sent, runs, EVENTS)[0] != []
    problems, excused = check_leader_runs(sent, runs, EVENTS, [Interruption(101, 19.6)])
    assert problems == [] and len(excused) == 1
    # Not if the fault hit another replica, or long after the run ended.
    assert check_leader_runs(sent, runs, EVENTS, [Interruption(102, 19.6)])[0] != []
    assert check_leader_runs(sent, runs, EVENTS, [Interruption(101, 25.0)])[0] != []


def test_a_body_that_read_its_terms_validity_just_past_is_not_outside() -> None:
    """The guard checks its term after the fenced claim; the page's validity may
    run out before the body's first line reads it (0).  That run started within
    its leadership; a 0 with another term, or none, on the page still fails."""
    sent = {"m1": "m1", "m2": "m2", "m3": "m3"}
    edge = dict(run("m1", 19.9, seen=0), page_term=1, page_lapsed=True)
    other = dict(run("m2", 19.9, seen=0), page_term=2, page_lapsed=True)
    valid = dict(run("m3", 19.9, seen=0), page_term=1, page_lapsed=False)
    problems, _ = check_leader_runs(sent, [edge, other, valid], EVENTS)
    text = "\n".join(problems)
    assert "m1 on" not in text and "m2 on" in text and "m3 on" in text
