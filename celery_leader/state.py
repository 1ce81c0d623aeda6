"""Leadership shared with every process of a worker, and the process-wide
registry of leader-only tasks.

Celery signals are process-local, so a prefork child cannot hear that the main
process stopped leading.  Instead the main process writes (term, valid_until)
into an anonymous MAP_SHARED page created before the pool forks; children
(including ones forked later for max-tasks-per-child) read it.  Because
``valid_until`` is on the system-wide monotonic clock, a child stops treating
itself as leader on time even if the main process is frozen.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time

# Task name -> on_follower policy: filled by @leader_only, read by the router
# installed by celery_leader.install() and by the leader queue.
LEADER_ONLY_TASKS: dict[str, str] = {}

# seq (odd while a write is in progress), term, valid_until (CLOCK_MONOTONIC).
_LAYOUT = struct.Struct("<qqd")


class SharedLeadership:
    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous + MAP_SHARED on Linux
        self._write_guard = threading.Lock()
        self._seq = 0

    def write(self, term: int, valid_until: float) -> None:
        """Called by the elector (main process) on acquire, renew and end: a write
        to the page, nothing is sent anywhere (``publish`` is the old name)."""
        with self._write_guard:
            self._seq += 1
            _LAYOUT.pack_into(self._page, 0, self._seq, term, valid_until)  # odd: writing
            self._seq += 1
            _LAYOUT.pack_into(self._page, 0, self._seq, term, valid_until)

    publish = write  # the old name, kept for existing callers

    def snapshot(self) -> tuple[int, float]:
        """(term, valid_until) as one consistent pair (a seqlock read)."""
        while True:
            seq, term, valid_until = _LAYOUT.unpack_from(self._page, 0)
            if seq % 2 == 0:
                again, _, _ = _LAYOUT.unpack_from(self._page, 0)
                if again == seq:
                    return term, valid_until
            time.sleep(0)

    def current_term(self) -> int:
        """The term this worker leads under right now; 0 when it does not lead."""
        term, valid_until = self.snapshot()
        return term if term and time.monotonic() < valid_until else 0

    def is_leader(self) -> bool:
        return self.current_term() != 0


_shared: SharedLeadership | None = None


def shared_leadership() -> SharedLeadership:
    """The process-wide page; create it in the main process before forking."""
    global _shared
    if _shared is None:
        _shared = SharedLeadership()
    return _shared


def is_leader() -> bool:
    """True in any process of a worker while that worker leads (False elsewhere)."""
    return _shared is not None and _shared.is_leader()


def current_term() -> int:
    """The fencing term this worker leads under, for fencing side effects; 0 if none."""
    return _shared.current_term() if _shared is not None else 0
