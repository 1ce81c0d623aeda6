"""Elections as the command line sees them, and a step-down request that
reaches a leader without a Celery control consumer (a standalone beat).

Two keys per election, in its hash slot next to the lease:

- ``<prefix>:{<name>}:role``: ``"workers"`` or ``"beat"``, written by each new
  leader when its leadership starts, so ``celery leader status --all`` can say
  what an election found under the prefix is for (informational, not fenced).
- ``<prefix>:{<name>}:step-down``: a JSON request ``{"term", "identity"}``,
  with a TTL, asking the leader of exactly that term to hand over.  The leader
  takes it (deletes it) and steps down; the requester sees it gone.  A request
  naming an older term is ignored: it can never depose a newer leader.

Nothing here imports Celery.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .elector import LeaderElector
from .redact import secret_safe_logger
from .redislock import RedisLock, as_text, key_of

# Logger names are part of the interface (users configure them): the old module's.
log = secret_safe_logger("celery_leader.elections")

ROLE_WORKERS = "workers"
ROLE_BEAT = "beat"
ROLE_SUFFIX = "role"
STEP_DOWN_SUFFIX = "step-down"
# A request outlives the requester's wait by this much, so it cannot expire
# unseen while the requester still counts its disappearance as an answer.
REQUEST_TTL_MARGIN = 5.0

# Guarantees a request is deleted only while it is still the exact one the
# caller read: the leader's acknowledgement and the requester's withdrawal
# after its timeout can never both succeed, nor remove a newer request.
TAKE_REQUEST_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


BEAT_SUFFIX = "-beat"
"""A standalone beat election is named ``<leader_name>-beat``."""


def mark_role(lock: RedisLock, role: str) -> None:
    """Record what ``lock``'s election is for; a failure only costs the label."""
    try:
        lock.client.set(lock.key(ROLE_SUFFIX), role)
    except Exception as exc:  # Redis down, ACL: the election itself is unaffected
        log.debug("celery-leader: cannot record the role of %s: %s", lock.name, exc)


def read_role(lock: RedisLock) -> str | None:
    raw = lock.client.get(lock.key(ROLE_SUFFIX))
    if raw is None:
        return None
    return as_text(raw)


def election_names(client: Any, key_prefix: str) -> list[str]:
    """Every election that has a lease or a term counter under ``key_prefix``
    (a SCAN of the whole database: for the command line, not a hot path).
    Standalone beats' keys sit in their schedule's slot: ``{<name>}:<name>-beat:``."""
    escaped = re.sub(r"([*?\[\]\\])", r"\\\1", key_prefix)
    names: set[str] = set()
    for suffix in ("lease", "counter"):
        for raw in client.scan_iter(match=f"{escaped}:{{*:{suffix}", count=1000):
            key = as_text(raw)
            middle = key[len(key_prefix) + 2:-len(suffix) - 1]  # "<tag>}" or "<tag>}:<name>"
            tag, _, rest = middle.partition("}")
            if not tag or "{" in tag:
                continue
            if rest == "":
                names.add(tag)
            elif rest == f":{tag}{BEAT_SUFFIX}":
                names.add(f"{tag}{BEAT_SUFFIX}")
            # Anything else is a claim key such as <prefix>:{x}:job:lease.
    return sorted(names)


def beat_hash_tag(client: Any, key_prefix: str, name: str) -> str | None:
    """The hash tag of election ``name``: a standalone beat election
    (``<tag>-beat``) keeps its keys in its schedule's slot, if it has keys there."""
    if not name.endswith(BEAT_SUFFIX) or len(name) == len(BEAT_SUFFIX):
        return None
    tag = name[:-len(BEAT_SUFFIX)]
    for suffix in ("lease", "counter"):
        if client.exists(key_of(key_prefix, name, tag, suffix)):
            return tag
    return None


class StepDownRequests:
    """The requester's side: ask the leader of ``term`` to hand over, and wait
    until it took the request."""

    def __init__(self, lock: RedisLock, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = lock
        self.key = lock.key(STEP_DOWN_SUFFIX)
        self._take = lock.client.register_script(TAKE_REQUEST_LUA)
        self._clock = clock

    def request(self, term: int, identity: str, timeout: float, poll: float = 0.05) -> bool:
        """True once the leader of ``term`` took the request; False (and the
        request withdrawn) if it did not within ``timeout`` seconds."""
        client = self.lock.client
        value = json.dumps({"term": term, "identity": identity, "id": uuid.uuid4().hex},
                           sort_keys=True)
        client.set(self.key, value, px=max(1, round((timeout + REQUEST_TTL_MARGIN) * 1000)))
        client.publish(self.lock.channel, "step-down")  # wakes the leader's listener
        deadline = self._clock() + timeout
        while self._clock() < deadline:
            if client.get(self.key) is None:
                return True
            time.sleep(poll)
        # Withdraw it; if that finds it gone, the leader took it just now.
        return not self._take(keys=[self.key], args=[value])


class StepDownListener:
    """The leader's side, for a process with no control consumer: on every
    message on the election's channel (the requester publishes one) and every
    ``poll`` seconds while leading, take a request naming the current term and
    step down."""

    def __init__(self, elector: LeaderElector, lock: RedisLock, poll: float) -> None:
        self.elector = elector
        self.lock = lock
        self.key = lock.key(STEP_DOWN_SUFFIX)
        self._take = lock.client.register_script(TAKE_REQUEST_LUA)
        self._poll = poll
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"celery-leader-step-down-{self.lock.name}")
        self._thread.start()
        self._unsubscribe = self.lock.subscribe(self._wake.set)

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self._poll)
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                self.check()
            except Exception as exc:  # Redis unreachable: the elector reports that
                log.debug("celery-leader: step-down check on %s failed: %s", self.key, exc)

    def check(self) -> bool:
        """Take a request for this leadership and step down; True if it did."""
        term = self.elector.term
        if not term:
            return False
        raw = self.lock.client.get(self.key)
        if raw is None:
            return False
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return False
        if not isinstance(request, dict) or request.get("term") != term:
            return False  # an older leadership's request: never depose a newer one
        if not self._take(keys=[self.key], args=[raw]):
            return False  # withdrawn (the requester gave up) or taken already
        log.info("leader election %s: step-down requested from the command line; "
                 "handing over (term %d)", self.lock.name, term)
        self.elector.step_down()
        return True
