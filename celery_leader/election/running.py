"""Running an elector in a thread, and work in threads for as long as a leadership lasts.

Both the worker step and the standalone beat do exactly this; here it is
written once.  Nothing here imports Celery.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from .elector import LeaderElector
from .redact import secret_safe_logger

# Logger names are part of the interface (users configure them).
log = secret_safe_logger("celery_leader.elector")

LeadershipHook = Callable[[int, threading.Event], None]
"""Work run while leading: ``hook(term, stop)`` returns soon after ``stop`` is set."""


def run_elector(elector: LeaderElector, stop: threading.Event) -> None:
    """The elector thread: warn once about server settings that weaken the
    guarantees (off the start-up path: Redis may be slow or down), then elect."""
    for warning in elector.lock.server_warnings():
        log.warning("celery-leader: %s", warning)
    elector.run(stop)


def start_elector_thread(elector: LeaderElector, stop: threading.Event) -> threading.Thread:
    """Start :func:`run_elector` in a daemon thread and return it."""
    thread = threading.Thread(target=run_elector, args=(elector, stop),
                              name="celery-leader-elector", daemon=True)
    thread.start()
    return thread


def run_while_leading(hooks: Sequence[LeadershipHook], term: int, stop: threading.Event,
                      join_timeout: float, on_stop: Callable[[], None] = lambda: None,
                      name: str = "celery-leader-hook") -> None:
    """Run each hook in its own thread until ``stop`` is set (the leadership
    ended or a hand-over began), then call ``on_stop`` (wake sleeping work) and
    wait up to ``join_timeout`` for each: the lease is released only after this
    returns (``on_started_leading`` semantics), so no follower starts while the
    old leader's work still runs."""
    threads = [threading.Thread(target=hook, args=(term, stop), daemon=True,
                                name=f"{name}-{index}")
               for index, hook in enumerate(hooks)]
    for thread in threads:
        thread.start()
    stop.wait()
    on_stop()
    for thread in threads:
        thread.join(join_timeout)
