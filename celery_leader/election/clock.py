"""Clocks the elector reads.

Expiry is judged only on a local monotonic clock, so wall-clock jumps and skew
between hosts can never shorten or lengthen a lease.  Tests inject a fake
(:class:`celery_leader.testing.FakeClock`).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()
