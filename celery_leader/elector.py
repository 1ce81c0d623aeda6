"""Moved to :mod:`celery_leader.election.elector`; this name stays for existing imports.

The old name is the very same module object (its names, private ones too, and
any attribute set on it), not a copy.
"""

import sys

from .election import elector as _moved
from .election.elector import *  # noqa: F403  (the names, for type checkers and readers)

sys.modules[__name__] = _moved
