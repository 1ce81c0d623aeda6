"""The bounded wait every process-level test uses instead of sleep-and-hope."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str = "",
               describe: Callable[[], str] = lambda: "", interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), at most
    ``timeout`` seconds; otherwise fail naming ``what`` and ``describe()``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = describe()
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for "
                                 f"{what or predicate!r}" + (f"\n{detail}" if detail else ""))
        time.sleep(interval)
