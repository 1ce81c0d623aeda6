"""Remote control command used by ``celery leader step-down``."""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command


@control_command(  # type: ignore[untyped-decorator]
    args=[("name", str), ("term", int)], signature="[name [term]]")
def leader_step_down(state: Any, name: str | None = None, term: int | None = None,
                     **kwargs: Any) -> dict[str, Any]:
    """Hand leadership over gracefully if this worker leads election ``name``
    (any, if not given) in ``term`` (the current one, if not given), so a
    broadcast never deposes the leader of another election or a newer term."""
    controller = getattr(state.consumer.controller, "celery_leader", None)
    if controller is None:
        return {"ok": "celery-leader not installed"}
    if name is not None and name != controller.settings.name:
        return {"ok": "not this election"}
    current = controller.elector.term
    if not controller.elector.is_leader() or (term is not None and term != current):
        return {"ok": "not leader"}
    controller.elector.step_down()
    return {"ok": "stepping down", "identity": controller.identity, "term": current}
