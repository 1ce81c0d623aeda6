"""Moved to :mod:`celery_leader.schedule.tickstart`; this name stays for existing imports.

The old name is the very same module object (its names, private ones too, and
any attribute set on it), not a copy.
"""

import sys

from .schedule import tickstart as _moved
from .schedule.tickstart import *  # noqa: F403  (the names, for type checkers and readers)

sys.modules[__name__] = _moved
