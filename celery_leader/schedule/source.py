"""Entries from outside the app and Redis (e.g. a database table), merged into the
schedule the leader dispatches.

The runner only reads what a source already holds in memory: ``version()`` and
``entries()`` must be cheap and never wait on the outside (a source refreshes
itself in its own thread and calls the ``wake`` it was given when its entries
change).  Their ticks are claimed in Redis like every other entry's, so the
exactly-once guarantee and the catch-up policies do not depend on the source;
``claimed`` tells it afterwards (to write progress back where its users look).

A source that counts its entries' runs (:class:`RecordsRuns`) has each sent tick
counted by the very script call that claims it (herd.py, HERD_DISPATCH_LUA): a
leader killed right after a claim cannot leave its run uncounted, nor count a
run it did not claim.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from .entries import Entry


class EntrySource(Protocol):
    """What a :class:`~celery_leader.schedule.runner.ScheduleRunner` asks an
    external source of entries."""

    def watch(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever ``version()`` changes (the runner re-reads then)."""

    def version(self) -> Hashable:
        """Changes whenever ``entries()`` would return something else; cheap."""

    def entries(self) -> dict[str, Entry]:
        """The source's entries (each with ``Entry.source`` set), as last read."""

    def claimed(self, entry: Entry, fire: datetime, published: bool) -> None:
        """This leadership claimed ``entry``'s tick at ``fire`` in Redis (sent it,
        or with ``published`` False passed over it); must not block for long.
        Not the place to count runs: a leader may die before it is called
        (see :class:`RecordsRuns`)."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """Where the claim of an entry's sent tick counts it: in the hash ``key`` (in
    the schedule's hash slot), field = the entry's name, value JSON
    ``{"pk": identity, "base": base, "count": runs counted, "last": latest fire
    ms}``.  A record of another ``identity`` (the entry's row was deleted and
    made again under its name) starts afresh from ``base``."""

    key: str
    identity: str  # e.g. the row's primary key
    base: int  # the runs the outside already knew of when counting began


@runtime_checkable
class RecordsRuns(Protocol):
    """An :class:`EntrySource` that counts its entries' sent ticks (optional)."""

    def run_record(self, entry: Entry) -> RunRecord | None:
        """Where a sent tick of ``entry`` is counted (None: not counted); called
        while the claim is prepared, so cheap and never waiting on the outside."""


@runtime_checkable
class RunRecordsHash(Protocol):
    """A :class:`RecordsRuns` source whose run records all live in one hash
    (optional): the leader forgets there the records of entries gone from the
    schedule for a day (forget.py), so the hash does not keep every row that
    ever existed."""

    runs_key: str
