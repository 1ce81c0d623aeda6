"""Leadership transitions as Celery signals, sent in the worker's main process.

Receivers that raise are logged by Celery and never disturb the elector.
"""

from celery.utils.dispatch import Signal

started_leading = Signal(name="started_leading", providing_args={"identity", "term"})
stopped_leading = Signal(name="stopped_leading", providing_args={"identity", "term", "reason"})
new_leader = Signal(name="new_leader", providing_args={"identity", "term"})

__all__ = ["new_leader", "started_leading", "stopped_leading"]
