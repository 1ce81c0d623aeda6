"""Remote control command used by ``celery leader step-down``."""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command


@control_command()  # type: ignore[untyped-decorator]
def leader_step_down(state: Any) -> dict[str, Any]:
    """Hand leadership over gracefully if this worker leads."""
    controller = getattr(state.consumer.controller, "celery_leader", None)
    if controller is None:
        return {"ok": "celery-leader not installed"}
    if not controller.elector.is_leader():
        return {"ok": "not leader"}
    controller.elector.step_down()
    return {"ok": "stepping down", "identity": controller.identity,
            "term": controller.elector.term}
