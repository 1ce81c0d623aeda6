"""A resource lock on one Redis primary (or Cluster slot), fenced by a counter.

Keys of one election share the hash tag ``{name}``, so every multi-key script
runs in one Cluster slot, and two elections land in different slots:

- ``<prefix>:{<name>}:lease``: the JSON record, with a server-side TTL of one lease.
- ``<prefix>:{<name>}:counter``: a hash without TTL; ``version`` is bumped on
  every write and ``acquisitions`` on every change of holder.  Terms and CAS
  versions both come from ``version``, so neither ever repeats (no ABA after
  the lease key expires).
- ``<prefix>:{<name>}:<anything>``: claims made through :meth:`RedisLock.claim`.
- channel ``<prefix>:{<name>}:events``: wakes followers on release/acquire.

A lock built with ``hash_tag=<tag>`` (another election's name) keeps its keys
in that election's slot instead: ``<prefix>:{<tag>}:<name>:lease`` and so on,
so one script can read both elections' leases (the standalone beat election
lives in the workers' slot this way; see scheduler.py).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

import redis

from .record import LeaderElectionRecord, MalformedRecordError
from .redact import secret_safe_logger
from .resourcelock import ClaimResult, LockConflictError, Observation, ResourceLock

# Logger names are part of the interface (users configure them): the old module's.
log = secret_safe_logger("celery_leader.redislock")

# Shared by every script: reads the lease as a string; a key of another type
# reads as a marker so the ordinary CAS path can replace it.  ``holder`` is
# '<instance>:<identity>' (an instance holds no ':', so the first one splits): a
# term is held only by the one running elector that took it, even when another
# was given the same identity.
READ_LEASE_LUA = """
local function read_lease(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'table' and value.err then
    return '<wrongtype:' .. redis.call('TYPE', key)['ok'] .. '>'
  end
  return value
end
local function holds_term(key, holder, term)
  local instance, identity = string.match(holder, '^([^:]+):(.*)$')
  if not instance then return false end
  local current = read_lease(key)
  if not current then return false end
  local ok, rec = pcall(cjson.decode, current)
  return ok and type(rec) == 'table' and rec.holderIdentity == identity
     and rec.holderInstance == instance and rec.term == tonumber(term)
end
"""

# Guarantees one consistent read of the record together with its remaining TTL.
GET_LUA = READ_LEASE_LUA + """
local raw = read_lease(KEYS[1])
if not raw then return {'', -2} end
return {raw, redis.call('PTTL', KEYS[1])}
"""

# Guarantees compare-and-swap on the exact stored bytes ('' = must be absent);
# a new holder (identity ARGV[2] and instance ARGV[6]), or a term the caller
# does not present, takes a fresh term from the counter, so a term names
# exactly one leadership of one running elector.
WRITE_LUA = READ_LEASE_LUA + """
local current = read_lease(KEYS[1])
local expected = ARGV[1]
if (expected == '' and current) or (expected ~= '' and current ~= expected) then
  if not current then return {0, '', -2} end
  return {0, current, redis.call('PTTL', KEYS[1])}
end
local holder, lease_ms, want_term = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local instance = ARGV[6]
local prev = nil
if current then
  local ok, rec = pcall(cjson.decode, current)
  if ok and type(rec) == 'table' then prev = rec end
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local version = redis.pcall('HINCRBY', KEYS[2], 'version', 1)
-- INVARIANT: only a counter that is no hash of integers is called unusable; any
-- other refusal (NOREPLICAS, OOM, READONLY, MISCONF) is returned unchanged.
if type(version) == 'table' and not (string.find(tostring(version.err), 'WRONGTYPE', 1, true)
    or string.find(tostring(version.err), 'not an integer', 1, true)
    or string.find(tostring(version.err), 'overflow', 1, true)) then
  return version
end
if type(version) == 'table' then
  return redis.error_reply('celery-leader: term counter ' .. KEYS[2] .. ' is unusable (' ..
    tostring(version.err) .. '); repair it by hand: deleting it restarts terms at 1')
end
local term, acquire_ms, transitions
if want_term ~= 0 and prev and prev.holderIdentity == holder
   and (prev.holderInstance or '') == instance and prev.term == want_term then
  term = want_term
  acquire_ms = tonumber(prev.acquireTimeMs) or now_ms
  transitions = tonumber(prev.leaderTransitions) or 0
else
  term = version
  acquire_ms = now_ms
  transitions = redis.call('HINCRBY', KEYS[2], 'acquisitions', 1) - 1
end
local raw = cjson.encode({holderIdentity = holder, leaseDurationMs = lease_ms,
  acquireTimeMs = acquire_ms, renewTimeMs = now_ms, leaderTransitions = transitions,
  term = term, version = version, holderInstance = (instance ~= '' and instance) or nil})
redis.call('SET', KEYS[1], raw, 'PX', lease_ms)
if term == version then redis.call('PUBLISH', ARGV[5], 'acquired') end
return {1, raw, lease_ms}
"""

# Guarantees the lease is deleted only while it names this holder (ARGV[1] =
# '<instance>:<identity>') and term, so a stale leader can never clear a newer
# holder's lease; then wakes followers.
RELEASE_LUA = READ_LEASE_LUA + """
if not holds_term(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[3], 'released')
return 1
"""

# Wraps every fenced script (see fenced_lua): the body runs only if KEYS[1]
# names ARGV[1] ('<instance>:<identity>') as holder with term ARGV[2], checked
# in the same atomic step.  The reply is {0} when fenced, {1, <the body's
# reply>} otherwise, so no reply of a body can be mistaken for "fenced".
FENCE_LUA = READ_LEASE_LUA + """
if not holds_term(KEYS[1], ARGV[1], ARGV[2]) then return {0} end
"""


def fenced_lua(body: str) -> str:
    """The fenced script of ``body`` (a Lua chunk ending in its own ``return``).

    INVARIANT: the body runs inside the fence, and its reply travels as the
    second element of ``{1, ...}``: a fenced call is told apart by construction.
    """
    return FENCE_LUA + "local function body()\n" + body + "\nend\nreturn {1, body()}\n"


# Guarantees a claim key is written once (SET NX), and only inside the term.
CLAIM_LUA = fenced_lua("""
local set
if tonumber(ARGV[4]) > 0 then
  set = redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4])
else
  set = redis.call('SET', KEYS[2], ARGV[3], 'NX')
end
if set then return 1 end
return 0
""")

FENCED = ClaimResult.FENCED
"""What a fenced script's call returns when the caller's term is not current
(compare with ``is``); any other value is the body's own reply."""


def unfenced(reply: Any) -> Any:
    """A fenced script's reply translated, once, at the call: FENCED, or the body's reply."""
    if not reply or int(reply[0]) == 0:
        return FENCED
    return reply[1] if len(reply) > 1 else None


def as_text(raw: Any) -> str:
    """A Redis reply (bytes, or str from a decoding client) as text; bytes that
    are not UTF-8 are replaced, never raised on."""
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def acl_denied(error: BaseException) -> bool:
    """Redis refused a command for the ACL user (NOPERM): raised before a script
    runs (its keys) or at its first denied command, before that command wrote."""
    return isinstance(error, redis.exceptions.NoPermissionError) or (
        isinstance(error, redis.exceptions.ResponseError)
        and ("NOPERM" in str(error) or "can't run this command" in str(error)
             or "No permissions" in str(error)))


# Redis's replies to credentials it does not accept (a password that changed,
# none where one is required, an ACL user without a grant): no retry fixes them.
CREDENTIAL_ERRORS = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid password",
                     "invalid username-password pair", "Authentication required",
                     "without any password configured")


def credentials_refused(error: BaseException) -> bool:
    """Redis refused this client's credentials or its ACL user's permissions."""
    if isinstance(error, (redis.exceptions.AuthenticationError,
                          redis.exceptions.AuthorizationError)) or acl_denied(error):
        return True
    return isinstance(error, redis.exceptions.ResponseError) and any(
        marker in str(error) for marker in CREDENTIAL_ERRORS)


def key_of(key_prefix: str, name: str, hash_tag: str, suffix: str) -> str:
    """The key ``suffix`` of election ``name`` whose keys carry ``{hash_tag}``:
    the one key format of every election, schedule and claim key."""
    if hash_tag == name:
        return f"{key_prefix}:{{{name}}}:{suffix}"
    return f"{key_prefix}:{{{hash_tag}}}:{name}:{suffix}"


def server_of(client: Any, key: str) -> Any:
    """The client of the one server holding ``key``: a Cluster client's node
    for that key, any other client itself."""
    node_of = getattr(client, "get_node_from_key", None)
    return client if node_of is None else node_of(key).redis_connection


def script_then_wait(client: Any, script: Any, keys: Sequence[Any], args: Sequence[Any],
                     replicas: int, timeout: float) -> tuple[Any, bool]:
    """Run a registered script and, when ``replicas`` > 0, WAIT for that many
    replicas on the SAME connection; (the script's reply, acknowledged?).

    Redis's WAIT counts only the writes of the connection that sends it (one
    that wrote nothing is answered at once, acknowledged), and a pool may hand
    a separate ``client.wait`` another connection: so both go in one pipeline
    without MULTI.  A replica's acknowledgement covers everything before the
    write in the replication stream (e.g. the leader's claim of the tick).
    """
    if replicas <= 0:
        return script(keys=keys, args=args), True
    # INVARIANT: the write and its WAIT travel on one connection.
    pipe = server_of(client, str(keys[0])).pipeline(transaction=False)
    script(keys=keys, args=args, client=pipe)
    pipe.wait(replicas, max(1, round(timeout * 1000)))
    reply, acknowledged = pipe.execute()
    return reply, int(acknowledged) >= replicas


class ReplicationError(Exception):
    """A write was not acknowledged by the replicas ``wait_replicas`` asks for."""


class FencedScript:
    """A Lua script that runs only while the caller holds a given term.

    The body sees KEYS[1] = lease, ARGV[1] = the holder, ARGV[2] = term; the
    caller's own keys and arguments follow.  A call returns :data:`FENCED`
    when the term is not current, else the body's reply, whatever it is.
    """

    def __init__(self, lock: RedisLock, body: str) -> None:
        self._lock = lock
        self._script = lock.client.register_script(fenced_lua(body))

    def __call__(self, term: int, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        lock = self._lock
        raw, acknowledged = lock.run_then_wait(
            self._script, [lock.lease_key, *keys], [lock.holder(), term, *args])
        result = unfenced(raw)
        if result is not FENCED and not acknowledged:
            lock.warn_unreplicated("a fenced write")
        return result

    # For a caller that sends several calls before reading their replies
    # (schedule/herd.py): the command of a call, and its reply translated.
    def command(self, term: int, keys: Sequence[str] = (),
                args: Sequence[Any] = ()) -> list[Any]:
        """The EVALSHA command of a call (the script must be loaded: :meth:`load`)."""
        lock = self._lock
        return ["EVALSHA", self._script.sha, 1 + len(keys), lock.lease_key, *keys,
                lock.holder(), term, *args]

    def reply(self, raw: Any) -> Any:
        """A raw reply of :meth:`command`, as a call returns it (no WAIT: a caller
        that sends several calls on its own connection must not pipeline while
        :attr:`waits_for_replicas`)."""
        return unfenced(raw)

    @property
    def waits_for_replicas(self) -> bool:
        """A call follows its write with WAIT (``wait_replicas`` > 0)."""
        return self._lock.wait_replicas > 0

    def load(self) -> None:
        """Make sure the server has the script (a sent command cannot reload it)."""
        self._lock.client.script_load(self._script.script)


class RedisLock(ResourceLock):
    def __init__(
        self,
        client: redis.Redis | Any,
        name: str,
        identity: str,
        key_prefix: str = "celery-leader",
        wait_replicas: int = 0,
        wait_timeout: float = 0.5,
        hash_tag: str | None = None,
    ) -> None:
        if not name or "{" in name or "}" in name:
            raise ValueError(f"name must be non-empty and free of braces, got {name!r}")
        if hash_tag is not None and (not hash_tag or "{" in hash_tag or "}" in hash_tag):
            raise ValueError(f"hash_tag must be non-empty and free of braces, got {hash_tag!r}")
        self.client = client
        self.name = name
        self.hash_tag = hash_tag or name
        self._identity = identity
        # INVARIANT: one instance id per lock object, never reused, so a second
        # elector given the same identity is a different holder (see instance()).
        self._instance = secrets.token_hex(8)
        self.key_prefix = key_prefix
        # Opt-in: after acquiring and after each claim, WAIT until this many
        # replicas acknowledged.  Narrows, never closes, the window in which a
        # Sentinel fail-over loses the write (replication stays asynchronous).
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self._pubsub_failing = False
        self.lease_key = self.key("lease")
        self.counter_key = self.key("counter")
        self.channel = self.key("events")
        self._get = client.register_script(GET_LUA)
        self._write = client.register_script(WRITE_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._claim = client.register_script(CLAIM_LUA)

    # The surface the schedule and the Celery glue build on (fenced scripts of
    # their own, keys in the election's slot): public, as much as the interface.

    def key(self, suffix: str) -> str:
        """A key of this election, in its hash slot."""
        return key_of(self.key_prefix, self.name, self.hash_tag, suffix)

    key_of = staticmethod(key_of)

    def fenced_script(self, body: str) -> FencedScript:
        return FencedScript(self, body)

    def identity(self) -> str:
        return self._identity

    def instance(self) -> str:
        return self._instance

    def holder(self) -> str:
        """This holder as the scripts check it (ARGV[1] of release, claim and fenced scripts)."""
        return f"{self._instance}:{self._identity}"

    def describe(self) -> str:
        return f"redis:{self.lease_key}"

    def get(self) -> Observation:
        raw, ttl_ms = self._get(keys=[self.lease_key])
        return _observation(raw, ttl_ms)

    def create(self, record: LeaderElectionRecord) -> Observation:
        return self._write_record(record, b"")

    def update(self, record: LeaderElectionRecord, expected_raw: bytes) -> Observation:
        if not expected_raw:
            raise ValueError("update needs the bytes last read; use create() for an absent record")
        return self._write_record(record, expected_raw)

    def _write_record(self, record: LeaderElectionRecord, expected: bytes) -> Observation:
        lease_ms = max(1, round(record.lease_duration * 1000))
        # A record naming this lock's identity without an instance is written
        # as this lock's own, so it can release, claim and fence with it.
        instance = record.holder_instance or (
            self._instance if record.holder_identity == self._identity else "")
        keys = [self.lease_key, self.counter_key]
        args: list[Any] = [expected, record.holder_identity, lease_ms, record.term, self.channel,
                           instance]
        if record.term == 0:
            # An acquisition (a new term): WAIT on the write's own connection.
            (written, raw, ttl_ms), acknowledged = self.run_then_wait(self._write, keys, args)
        else:  # a renewal keeps its term: nothing to wait for
            (written, raw, ttl_ms), acknowledged = self._write(keys=keys, args=args), True
        observation = _observation(raw, ttl_ms)
        if not written:
            raise LockConflictError(observation)
        stored = observation.record
        if stored is not None and stored.term == stored.version and not acknowledged:
            # A new term nobody replicated could vanish in a fail-over and be
            # handed out again: do not lead on it (the next attempt retries).
            raise ReplicationError(
                f"{self.describe()}: fewer than {self.wait_replicas} replica(s) acknowledged "
                f"term {stored.term} within {self.wait_timeout}s")
        return observation

    def run_then_wait(self, script: Any, keys: Sequence[Any],
                      args: Sequence[Any]) -> tuple[Any, bool]:
        """A script of this lock's client, then its WAIT (script_then_wait)."""
        return script_then_wait(self.client, script, keys, args,
                                self.wait_replicas, self.wait_timeout)

    def warn_unreplicated_unless(self, acknowledged: Any, what: str) -> None:
        if int(acknowledged) < self.wait_replicas:
            self.warn_unreplicated(what)

    def warn_unreplicated(self, what: str) -> None:
        if self.wait_replicas > 0:
            log.warning("%s: %s was not acknowledged by %d replica(s) within %.2fs; a "
                        "fail-over now could lose it", self.describe(), what,
                        self.wait_replicas, self.wait_timeout)

    def server_warnings(self) -> list[str]:
        """Server settings that weaken the guarantees, for a start-up warning."""
        warnings: list[str] = []
        try:
            policy = self.client.config_get("maxmemory-policy").get("maxmemory-policy")
            appendonly = self.client.config_get("appendonly").get("appendonly")
            save = self.client.config_get("save").get("save")
        except Exception as exc:  # CONFIG is often forbidden (ACL, managed Redis)
            log.debug("cannot read the Redis configuration: %s", exc)
            return warnings
        policy = as_text(policy) if policy is not None else policy
        if policy and policy != "noeviction":
            warnings.append(
                f"maxmemory-policy is {policy!r}: under memory pressure Redis may evict the "
                f"lease or the term counter of {self.describe()}; use 'noeviction'")
        appendonly = as_text(appendonly) if appendonly is not None else appendonly
        save = as_text(save) if save is not None else save
        if appendonly == "no" and not save:
            warnings.append(
                "Redis persistence is off (no AOF, no RDB): a restart resets the term "
                "counter, so fencing terms can repeat; enable appendonly")
        return warnings

    def release(self, term: int) -> bool:
        return bool(self._release(keys=[self.lease_key], args=[self.holder(), term, self.channel]))

    def claim(
        self, key: str, term: int, value: str = "1", ttl: float | None = None
    ) -> ClaimResult:
        ttl_ms = 0 if ttl is None else max(1, round(ttl * 1000))
        raw, acknowledged = self.run_then_wait(
            self._claim, [self.lease_key, self.key(key)], [self.holder(), term, value, ttl_ms])
        result = unfenced(raw)
        if result is FENCED:
            return ClaimResult.FENCED
        if result == 1:
            if not acknowledged:
                self.warn_unreplicated(f"claim {key!r}")
            return ClaimResult.CLAIMED
        return ClaimResult.ALREADY_CLAIMED

    def subscribe(self, on_change: Callable[[], None]) -> Callable[[], None]:
        stopped = threading.Event()
        thread = threading.Thread(
            target=self._listen,
            args=(on_change, stopped),
            name=f"celery-leader-pubsub-{self.name}",
            daemon=True,
        )
        thread.start()

        def unsubscribe() -> None:
            stopped.set()
            thread.join(timeout=2.0)

        return unsubscribe

    def _listen(self, on_change: Callable[[], None], stopped: threading.Event) -> None:
        backoff = 0.1
        while not stopped.is_set():
            pubsub = None
            try:
                pubsub = self.client.pubsub()
                pubsub.subscribe(self.channel)
                while not stopped.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    # The subscribe confirmation after every (re)connect wakes the
                    # elector too: messages published while disconnected are lost.
                    on_change()
                    backoff = 0.1
                    self._pubsub_failing = False
            except Exception as exc:  # never let the listener die
                # Warn once: hand-over falls back to polling (e.g. NOPERM from an ACL).
                level = logging.DEBUG if self._pubsub_failing else logging.WARNING
                self._pubsub_failing = True
                log.log(level, "pub/sub on %s failed (%s); hand-over falls back to polling "
                        "until it works again", self.channel, exc)
                stopped.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()


def _observation(raw: bytes | str, ttl_ms: int) -> Observation:
    if isinstance(raw, str):
        raw = raw.encode()
    if not raw:
        return Observation(raw=None, record=None, ttl=None)
    ttl = ttl_ms / 1000.0 if ttl_ms >= 0 else None
    try:
        return Observation(raw=raw, record=LeaderElectionRecord.from_json(raw), ttl=ttl)
    except MalformedRecordError as exc:
        return Observation(raw=raw, record=None, ttl=ttl, error=str(exc))
