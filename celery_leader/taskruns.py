"""A leader-only task run claimed in Redis under the term: the start of the
protocol whose end is leaderqueue's FINISH_RUN_LUA (the claim marked ``done``,
or deleted so a retry may run it).

Claim key: ``task_claim_key(lock, task_id)`` (``<prefix>:{<name>}:task:<id>``),
``running:<term>:<attempt>`` while a run lasts (TASK_CLAIM_TTL_MS), ``done``
after it, for as long as a copy can still be delivered (:func:`done_ttl_ms`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import redis

from .election.redact import secret_safe_logger
from .election.redislock import FENCED, RedisLock
from .election.resourcelock import ClaimResult
from .leaderqueue import task_claim_key

# Logger names are part of the interface (users configure them): the old module's.
log = secret_safe_logger("celery_leader.decorators")

# Fenced (see redislock.FENCE_LUA): claims a task id for this term as
# ARGV[4] = 'running:<term>:<attempt token>'.  Returns 1 to run, 0 for a
# duplicate (finished, or running under this term by another delivery).  A run
# left by an older term is taken over (its leader is gone); the same attempt
# asking again (its first reply was lost) gets 1 again.
TASK_START_LUA = """
local current = redis.call('GET', KEYS[2])
if current == 'done' then return 0 end
if current == ARGV[4] then return 1 end
if current then
  local term = tonumber(string.match(current, '^running:(%d+)') or '0')
  if term >= tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
return 1
"""
TASK_STARTED, TASK_DUPLICATE = 1, 0

TASK_CLAIM_TTL_MS = 24 * 3600 * 1000
"""How long a run's ``running:`` claim lasts: longer than any body runs."""
DONE_AFTER_REDELIVERY_S = 300
"""Margin past the broker's redelivery delay during which ``done`` is kept."""


def done_ttl_ms(transport_options: Mapping[str, Any]) -> int:
    """How long a finished task id stays ``done``: as long as a copy of its
    message can still arrive, i.e. kombu's ``visibility_timeout`` (its redelivery
    of an unacknowledged message; 1 hour by default) plus a margin.  So the
    claims of finished runs are bounded by the leader-only messages finished in
    that window, not by every one that ever ran."""
    try:
        visibility = float(transport_options.get("visibility_timeout", 3600))
    except (TypeError, ValueError):
        visibility = 3600.0
    return int((max(visibility, 3600.0) + DONE_AFTER_REDELIVERY_S) * 1000)

# What is retried: the request may not have reached Redis, or its reply was
# lost.  Anything else (NOPERM, a script error) would fail the same way again.
RETRIED_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def claim_task_start(script: Callable[..., Any], lock: RedisLock, task_id: str, term: int,
                     term_lasts: Callable[[], bool]) -> ClaimResult:
    """Claim the start of ``task_id``'s run under ``term`` with ``script`` (the
    fenced TASK_START_LUA of ``lock``).  CLAIMED: run it.  FENCED: this replica
    does not lead under ``term``.  ALREADY_CLAIMED: a duplicate delivery (it
    ran, or runs, under this term)."""
    attempt = f"running:{term}:{uuid.uuid4().hex}"
    delay = 0.05
    while True:
        try:
            outcome = script(term, keys=[task_claim_key(lock, task_id)],
                             args=[TASK_CLAIM_TTL_MS, attempt])
            break
        except RETRIED_ERRORS as exc:
            # The claim may have been written even though its reply was lost, so
            # giving up now would make a redelivery under this term look like a
            # duplicate.  Ask again with the same attempt token while this term
            # lasts; once it is over, a later term re-runs the task anyway.
            if not term_lasts():
                log.warning("could not claim leader-only task %s (%s) and this "
                            "leadership ended; handing it to the next leader", task_id, exc)
                return ClaimResult.FENCED
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
    if outcome is FENCED:
        return ClaimResult.FENCED
    return ClaimResult.CLAIMED if outcome == TASK_STARTED else ClaimResult.ALREADY_CLAIMED
