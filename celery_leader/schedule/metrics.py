"""What the schedule runner counts (ticks, lateness, entries), read at scrape time.

Per-entry labels only when asked for (``per_entry``): a schedule of 100k
entries must not become 100k series by default.  Without them every series
carries the schedule's name only; the per-entry view is the status page.

Every counter is exported at 0 for its known label values from start-up, not
at its first event: Prometheus's ``increase()`` over a series that starts
absent and then reads 1 gives 0, so a counter that appears at 1 hides its
first event from every alert and panel built on ``increase()``/``rate()``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..election.metrics import LATENESS_BUCKETS, Family, Histogram

SKIPPED_POLICY = "catch_up_policy"
SKIPPED_GRACE = "misfire_grace"
SKIPPED_REASONS = (SKIPPED_POLICY, SKIPPED_GRACE)
ALL_ENTRIES = ""  # the key of the totals when per-entry labels are off


@dataclass(frozen=True)
class SentTick:
    entry: str
    fire_time: float  # wall clock seconds
    sent_at: float
    term: int

    @property
    def lateness(self) -> float:
        return max(0.0, self.sent_at - self.fire_time)


class ScheduleStats:
    """Counters bumped by the runner's thread only."""

    def __init__(self, per_entry: bool = False, recent: int = 20) -> None:
        self.per_entry = per_entry
        self.dispatched: dict[str, int] = {}
        self.skipped: dict[tuple[str, str], int] = {}
        self.caught_up: dict[str, int] = {}
        self.republished: dict[str, int] = {}
        self.lateness: dict[str, Histogram] = {}
        self.entries_loaded = 0
        self.entries_invalid = 0
        self.last_dispatch = 0.0  # wall clock of the last tick sent by this replica
        self.recent: collections.deque[SentTick] = collections.deque(maxlen=recent)
        # The lateness of each entry's last tick sent here, for the status page.
        self.last_lateness: dict[str, float] = {}
        if not per_entry:
            self.known([ALL_ENTRIES])

    def known(self, entries: Iterable[str]) -> None:
        """Export every counter of these entries at 0 until it counts (module
        docstring).  Bounded by the schedule: per-entry keys are entry names."""
        for entry in entries:
            key = self._key(entry)
            self.dispatched.setdefault(key, 0)
            self.caught_up.setdefault(key, 0)
            self.republished.setdefault(key, 0)
            for reason in SKIPPED_REASONS:
                self.skipped.setdefault((key, reason), 0)
            if key not in self.lateness:
                self.lateness[key] = Histogram(LATENESS_BUCKETS)

    def _key(self, entry: str) -> str:
        return entry if self.per_entry else ALL_ENTRIES

    def sent(self, tick: str, term: int, now: float | None = None) -> None:
        """A tick (``<entry>@<fire ms>``) reached the broker."""
        entry, _, fire_ms = tick.rpartition("@")
        sent_at = time.time() if now is None else now
        record = SentTick(entry, int(fire_ms) / 1000, sent_at, term)
        key = self._key(entry)
        self.dispatched[key] = self.dispatched.get(key, 0) + 1
        histogram = self.lateness.get(key)
        if histogram is None:
            histogram = self.lateness[key] = Histogram(LATENESS_BUCKETS)
        histogram.observe(record.lateness)
        self.last_dispatch = sent_at
        self.last_lateness[entry] = record.lateness
        self.recent.append(record)

    def skipped_ticks(self, entry: str, reason: str, count: int) -> None:
        if count:
            key = (self._key(entry), reason)
            self.skipped[key] = self.skipped.get(key, 0) + count

    def caught_up_ticks(self, entry: str, count: int) -> None:
        if count:
            key = self._key(entry)
            self.caught_up[key] = self.caught_up.get(key, 0) + count

    def republished_tick(self, tick: str) -> None:
        key = self._key(tick.rpartition("@")[0])
        self.republished[key] = self.republished.get(key, 0) + 1

    def families(self, name: str, pending: Callable[[], int | None]) -> list[Family]:
        """``pending`` counts the ticks claimed but not yet sent (None if unknown)."""
        labels = ("name", "entry") if self.per_entry else ("name",)

        def key(entry: str) -> tuple[str, ...]:
            return (name, entry) if self.per_entry else (name,)

        families = [
            Family("celery_leader_schedule_ticks_dispatched_total", "counter",
                   "Ticks this replica sent to the broker", labels,
                   {key(e): float(n) for e, n in sorted(self.dispatched.items())}),
            Family("celery_leader_schedule_ticks_skipped_total", "counter",
                   "Due ticks not sent, by reason (catch_up_policy, misfire_grace)",
                   (*labels, "reason"),
                   {(*key(e), reason): float(n)
                    for (e, reason), n in sorted(self.skipped.items())}),
            Family("celery_leader_schedule_ticks_caught_up_total", "counter",
                   "Ticks sent late because no leader dispatched them on time (catch-up)",
                   labels, {key(e): float(n) for e, n in sorted(self.caught_up.items())}),
            Family("celery_leader_schedule_ticks_republished_total", "counter",
                   "Ticks claimed by an earlier leadership and sent again by this one "
                   "after a fail-over", labels,
                   {key(e): float(n) for e, n in sorted(self.republished.items())}),
            Family("celery_leader_schedule_dispatch_lateness_seconds", "histogram",
                   "Publish time minus fire time of each tick sent", labels,
                   {key(e): h for e, h in sorted(self.lateness.items())}),
            Family("celery_leader_schedule_entries", "gauge",
                   "Entries the schedule loaded last (state=loaded) and runtime entries "
                   "skipped as invalid (state=invalid)", ("name", "state"),
                   {(name, "loaded"): float(self.entries_loaded),
                    (name, "invalid"): float(self.entries_invalid)}),
            Family("celery_leader_schedule_last_dispatch_timestamp_seconds", "gauge",
                   "When this replica last sent a tick (Unix time; 0 if never)", ("name",),
                   {(name,): self.last_dispatch}),
            Family("celery_leader_schedule_seconds_since_last_dispatch", "gauge",
                   "Seconds since this replica last sent a tick (absent if never)", ("name",),
                   {(name,): max(0.0, time.time() - self.last_dispatch)}
                   if self.last_dispatch else {}),
        ]
        count = pending()
        if count is not None:
            families.append(Family(
                "celery_leader_schedule_pending_ticks", "gauge",
                "Ticks claimed but not yet sent (schedule:pending; the same on every replica)",
                ("name",), {(name,): float(count)}))
        return families
