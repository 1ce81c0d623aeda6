"""Moved: :mod:`celery_leader.election.clock` (``Clock``, ``SystemClock``) and
:mod:`celery_leader.testing` (``FakeClock``); this name stays for existing imports."""

from .election.clock import Clock, SystemClock
from .testing import FakeClock

__all__ = ["Clock", "FakeClock", "SystemClock"]
