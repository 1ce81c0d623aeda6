"""Send tasks from a plain (non-worker) process that imports an app module.

    python -m tests.apps.sender tests.apps.leader_app \
        '[{"task": "leader_work", "args": ["t{i}", 0.1], "count": 50}]'

REDIS_URL (read by the app module at import) must be set.  Routing is the app's
own: leader-only tasks go to the leader queue through celery_leader's router
unless ``options`` names a queue.  Prints the task ids as one JSON list.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any


def _format(value: Any, index: int) -> Any:
    return value.replace("{i}", str(index)) if isinstance(value, str) else value


def main(module_name: str, calls_json: str) -> None:
    module = importlib.import_module(module_name)
    ids: list[str] = []
    with module.app.producer_or_acquire() as producer:
        for call in json.loads(calls_json):
            task = getattr(module, call["task"])
            for index in range(int(call.get("count", 1))):
                args = [_format(arg, index) for arg in call.get("args", [])]
                result = task.apply_async(args=args, producer=producer,
                                          **call.get("options", {}))
                ids.append(result.id)
    print(json.dumps(ids))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
