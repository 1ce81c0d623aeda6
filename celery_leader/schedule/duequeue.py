"""The runner's entries by next fire time, compact for herds.

Problem.  A heap of ``(fire time, name)`` tuples costs ~64 bytes per entry:
6 MB for 100,000 entries, most of them sharing a handful of fire times
(per-customer reports at the top of the hour).

Mechanism.  A heap of the *distinct* fire times, and for each the names due
then (one name as itself, several in a list, in the order they were pushed).
An entry costs a list slot when it shares its fire time, about a dict slot when
it does not.  Popping the earliest time hands over every name due then at once,
which is how the runner dispatches a herd anyway.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from datetime import datetime


class DueQueue:
    """Entry names by next fire time (aware datetimes)."""

    __slots__ = ("_names", "_times")

    def __init__(self, items: Iterable[tuple[datetime, str]] = ()) -> None:
        self._times: list[datetime] = []
        self._names: dict[datetime, str | list[str]] = {}
        for at, name in items:
            if self._add(at, name):
                self._times.append(at)
        heapq.heapify(self._times)

    def __bool__(self) -> bool:
        return bool(self._times)

    def first(self) -> datetime:
        """The earliest fire time (IndexError when empty)."""
        return self._times[0]

    def push(self, at: datetime, name: str) -> None:
        if self._add(at, name):
            heapq.heappush(self._times, at)

    def _add(self, at: datetime, name: str) -> bool:
        """File ``name`` under ``at``; True when ``at`` is a new time, for the caller
        to put in the heap."""
        names = self._names.get(at)
        if names is None:
            self._names[at] = name
            return True
        if isinstance(names, str):
            self._names[at] = [names, name]
        else:
            names.append(name)
        return False

    def pop_first(self) -> tuple[datetime, list[str]]:
        """The earliest fire time and the names due then, removed."""
        at = heapq.heappop(self._times)
        names = self._names.pop(at)
        return at, [names] if isinstance(names, str) else names

    def fire_times(self) -> dict[str, datetime]:
        """Each name's fire time (a new dict: for a reload, not the loop)."""
        found: dict[str, datetime] = {}
        for at, names in self._names.items():
            if isinstance(names, str):
                found[names] = at
            else:
                found.update(dict.fromkeys(names, at))
        return found

    def within(self, after: datetime | None, until: datetime) -> list[tuple[datetime, str]]:
        """Every (time, name) with ``after`` < time <= ``until`` (any time up to
        ``until`` when ``after`` is None), in no particular order: a walk down
        the heap that stops at the first later time of each branch."""
        found: list[tuple[datetime, str]] = []
        times, size, stack = self._times, len(self._times), [0]
        while stack:
            index = stack.pop()
            if index >= size or times[index] > until:
                continue
            at = times[index]
            if after is None or at > after:
                names = self._names[at]
                if isinstance(names, str):
                    found.append((at, names))
                else:
                    found += [(at, name) for name in names]
            stack += (2 * index + 1, 2 * index + 2)
        return found
