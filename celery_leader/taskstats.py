"""Leader-only task counters shared by every process of a worker.

A leader-only body starts (or is refused as a duplicate, or requeued) in a pool
child, but ``/metrics`` is served by the main process, so the counters live in
an anonymous MAP_SHARED page created before the pool forks (like state.py's
leadership page).  Row 0 holds the totals; with per-task labels (opted in,
``leader_metrics_per_task``) each task name takes a row the first time it is
counted, up to ``MAX_TASKS`` (later names count in the totals only).

Increments take a cross-process lock with a short timeout: a child killed while
holding it costs at most one count, never a stuck task.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct

from .election.metrics import Family

STARTED, DUPLICATE, REQUEUED = 0, 1, 2
OUTCOMES = ("started", "duplicate", "requeued")
MAX_TASKS = 128
_NAME = 96  # bytes of a task name kept (longer names are cut)
_ROW = struct.Struct(f"<{_NAME}s3q")
LOCK_TIMEOUT = 0.05


class TaskStats:
    def __init__(self, per_task: bool = False) -> None:
        self.per_task = per_task
        rows = 1 + (MAX_TASKS if per_task else 0)
        self._page = mmap.mmap(-1, max(mmap.PAGESIZE, rows * _ROW.size))
        self._rows = rows
        self._lock = multiprocessing.Lock()  # created before the fork: shared with children

    def count(self, task: str, outcome: int) -> None:
        """Called in whichever process ran the check (usually a pool child)."""
        if not self._lock.acquire(timeout=LOCK_TIMEOUT):
            return
        try:
            self._bump(0, b"", outcome)
            if self.per_task:
                row = self._row_of(task.encode()[:_NAME])
                if row is not None:
                    self._bump(row, task.encode()[:_NAME], outcome)
        finally:
            self._lock.release()

    def _bump(self, row: int, name: bytes, outcome: int) -> None:
        offset = row * _ROW.size
        _, *counts = _ROW.unpack_from(self._page, offset)
        counts[outcome] += 1
        _ROW.pack_into(self._page, offset, name, *counts)

    def _row_of(self, name: bytes) -> int | None:
        for row in range(1, self._rows):
            stored = _ROW.unpack_from(self._page, row * _ROW.size)[0].rstrip(b"\0")
            if stored == name or not stored:
                return row
        return None  # full: the totals still count it

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """Task name ('' for the totals) -> (started, duplicate, requeued)."""
        result: dict[str, tuple[int, int, int]] = {}
        for row in range(self._rows):
            raw, started, duplicate, requeued = _ROW.unpack_from(self._page, row * _ROW.size)
            name = raw.rstrip(b"\0").decode(errors="replace")
            if row and not name:
                break
            result[name] = (started, duplicate, requeued)
        return result

    def families(self, election: str) -> list[Family]:
        rows = self.snapshot()
        keyed: dict[tuple[str, ...], tuple[int, int, int]]
        if self.per_task:
            labels: tuple[str, ...] = ("name", "task")
            keyed = {(election, task): counts for task, counts in rows.items() if task}
        else:
            labels = ("name",)
            keyed = {(election,): rows.get("", (0, 0, 0))}
        helps = ("Leader-only task runs claimed and started by this worker",
                 "Deliveries refused because the run already ran or runs under this term",
                 "Leader-only messages a follower put back for the leader")
        names = ("celery_leader_tasks_started_total",
                 "celery_leader_tasks_duplicates_refused_total",
                 "celery_leader_tasks_requeued_total")
        return [Family(name, "counter", text, labels,
                       {key: float(counts[index]) for key, counts in keyed.items()})
                for index, (name, text) in enumerate(zip(names, helps, strict=True))]
