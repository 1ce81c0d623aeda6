"""Entries from outside the app and Redis (e.g. a database table), merged into the
schedule the leader dispatches.

The runner only reads what a source already holds in memory: ``version()`` and
``entries()`` must be cheap and never wait on the outside (a source refreshes
itself in its own thread and calls the ``wake`` it was given when its entries
change).  Their ticks are claimed in Redis like every other entry's, so the
exactly-once guarantee and the catch-up policies do not depend on the source;
``claimed`` tells it afterwards (to write progress back where its users look).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from datetime import datetime
from typing import Protocol

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
        or with ``published`` False passed over it); must not block for long."""
