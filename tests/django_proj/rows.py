"""Change and read django-celery-beat's rows from outside the replicas, as an
admin would (``save()``/``delete()``: django-celery-beat bumps last_update).

``python -m tests.django_proj.rows '<json command>'`` (env as settings.py) prints
the JSON result; also importable once Django is set up.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from typing import Any

TICK = "tests.apps.django_app.tick"


def create(name: str, label: str, every: float | None = None, clocked_at: float | None = None,
           one_off: bool = False, enabled: bool = True) -> int:
    from django_celery_beat.models import ClockedSchedule, IntervalSchedule, PeriodicTask

    fields: dict[str, Any] = {"name": name, "task": TICK, "args": json.dumps([label]),
                              "one_off": one_off, "enabled": enabled}
    if every is not None:
        fields["interval"], _ = IntervalSchedule.objects.get_or_create(
            every=int(every), period=IntervalSchedule.SECONDS)
    if clocked_at is not None:
        fields["clocked"] = ClockedSchedule.objects.create(
            clocked_time=datetime.fromtimestamp(clocked_at, timezone.utc))
        fields["one_off"] = True
    return int(PeriodicTask.objects.create(**fields).pk)


def set_enabled(name: str, enabled: bool) -> None:
    from django_celery_beat.models import PeriodicTask

    task = PeriodicTask.objects.get(name=name)
    task.enabled = enabled
    task.save()


def dump() -> dict[str, dict[str, Any]]:
    from django_celery_beat.models import PeriodicTask

    return {t.name: {"enabled": t.enabled, "total_run_count": t.total_run_count,
                     "last_run_at": t.last_run_at.timestamp() if t.last_run_at else None}
            for t in PeriodicTask.objects.all()}


def main(command: dict[str, Any]) -> Any:
    op = command.pop("op")
    if op == "migrate":
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        return None
    if op == "create":
        return create(**command)
    if op == "enable":
        return set_enabled(command["name"], bool(command["enabled"]))
    if op == "dump":
        return dump()
    raise SystemExit(f"unknown op {op!r}")


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_proj.settings")
    import django

    django.setup()
    print(json.dumps(main(json.loads(sys.argv[1]))))
