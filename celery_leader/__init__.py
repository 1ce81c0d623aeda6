"""celery-leader: highly available leader election and periodic work for Celery.

Three layers, each importing only the ones below it (docs/design.md; checked
by tests/test_layers.py):

1. ``celery_leader.election``: client-go's leader election on a Redis lock
   with fencing terms.  No Celery import: usable, and importable, without it.
2. ``celery_leader.schedule``: the schedule dispatched by whoever leads, every
   tick claimed under the leader's term.  Takes a small options object, never
   the ``leader_*`` settings.
3. The Celery glue, the modules at this level: ``integration`` (``install``),
   ``settings``, ``worker`` and ``beat`` (the worker step and the beat
   scheduler), ``decorators`` (``@leader_only``), ``signals``, ``control``,
   ``cli``, ``leaderqueue``, ``state``, ``schedule_api``.

``celery_leader.testing`` holds tools for tests (an embedded Redis, a fake
clock).  The other modules at this level are the old names of moved modules,
kept so existing imports work.

Importing this package needs no Celery: the Celery-dependent names below
(``install``, ``leader_only``, ``NotLeaderError``, ``cron``) load on first use.
"""

# ruff: noqa: F405  (__all__ names the lazy names, which __getattr__ provides)
import importlib
import sys
import types
from collections.abc import Sequence
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Any

from . import election
from .election import *  # noqa: F403  (the election layer's public names)
from .state import current_term, is_leader

__version__ = "0.1.0"

# Public name -> (module, attribute), loaded on first use (PEP 562).
_LAZY = {
    "install": ("celery_leader.integration", "install"),
    "leader_only": ("celery_leader.decorators", "leader_only"),
    "NotLeaderError": ("celery_leader.decorators", "NotLeaderError"),
    "cron": ("celery_leader.schedule.cronexpr", "cron"),
    "FakeClock": ("celery_leader.testing", "FakeClock"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        __import__(module_name)
        value = getattr(sys.modules[module_name], attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'celery_leader' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


# Old module name -> its home since the package was split into layers.  The old
# name is the very module (its private names, any attribute set on it), so
# existing imports, and patches of module attributes, keep working.
MOVED_MODULES = {
    "celery_leader.config": "celery_leader.election.config",
    "celery_leader.cron": "celery_leader.schedule.cronexpr",
    "celery_leader.elections": "celery_leader.election.elections",
    "celery_leader.elector": "celery_leader.election.elector",
    "celery_leader.embedded": "celery_leader.testing",
    "celery_leader.entries": "celery_leader.schedule.entries",
    "celery_leader.healthz": "celery_leader.election.healthz",
    "celery_leader.metrics": "celery_leader.election.metrics",
    "celery_leader.publish": "celery_leader.schedule.publish",
    "celery_leader.record": "celery_leader.election.record",
    "celery_leader.redislock": "celery_leader.election.redislock",
    "celery_leader.resourcelock": "celery_leader.election.resourcelock",
    "celery_leader.scheduler": "celery_leader.schedule_api",
    "celery_leader.tickstart": "celery_leader.schedule.tickstart",
}


class _MovedModules(MetaPathFinder, Loader):
    """Imports an old module name as the module that now holds its code."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> ModuleSpec | None:
        return ModuleSpec(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec: ModuleSpec) -> types.ModuleType:
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # already executed under its new name


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


class _Package(types.ModuleType):
    """Keeps ``celery_leader.cron`` the class: importing the old module path
    ``celery_leader.cron`` (an alias of ``celery_leader.schedule.cronexpr``)
    would otherwise bind the module over the public name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "FakeClock",
    "NotLeaderError",
    "__version__",
    "cron",
    "current_term",
    "install",
    "is_leader",
    "leader_only",
]
__all__ += election.__all__
