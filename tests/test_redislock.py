"""The Lua scripts of RedisLock against a real redis-server."""

from __future__ import annotations

import json
import threading

import pytest
import redis
from redis.crc import key_slot

from celery_leader import (
    ClaimResult,
    LeaderElectionRecord,
    LockConflictError,
    Observation,
    RedisLock,
)
from celery_leader.redislock import FENCED
from tests.fakes import wait_until


def rec(holder: str, lease: float = 5.0, term: int = 0) -> LeaderElectionRecord:
    return LeaderElectionRecord(holder_identity=holder, lease_duration=lease, term=term)


def locks(client: redis.Redis, name: str, *identities: str) -> list[RedisLock]:
    return [RedisLock(client, name=name, identity=i) for i in identities]


def record_of(observation: Observation) -> LeaderElectionRecord:
    assert observation.record is not None, observation
    return observation.record


# ---------------------------------------------------------------- create / get


def test_get_of_absent_lease(redis_client: redis.Redis, election_name: str) -> None:
    (a,) = locks(redis_client, election_name, "a")
    assert a.get() == Observation(raw=None, record=None, ttl=None)


def test_create_writes_a_record_and_get_reads_it_back(redis_client: redis.Redis,
                                                      election_name: str) -> None:
    (a,) = locks(redis_client, election_name, "a")
    written = a.create(rec("a", lease=5.0))
    record = record_of(written)
    assert record.holder_identity == "a"
    assert record.lease_duration == 5.0
    assert record.term >= 1 and record.version == record.term
    assert record.leader_transitions == 0
    assert record.acquire_time == record.renew_time > 1_600_000_000
    assert written.raw == redis_client.get(a.lease_key)
    read = a.get()
    assert read.raw == written.raw and read.record == record
    assert read.ttl is not None and 4.0 < read.ttl <= 5.0


def test_create_fails_if_a_record_exists(redis_client: redis.Redis, election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    first = a.create(rec("a"))
    with pytest.raises(LockConflictError) as info:
        b.create(rec("b"))
    # The conflict carries what is there now, so the caller need not read again.
    assert info.value.observation.raw == first.raw
    assert record_of(info.value.observation).holder_identity == "a"
    assert info.value.observation.ttl is not None
    assert redis_client.get(a.lease_key) == first.raw


def test_update_needs_expected_bytes(redis_client: redis.Redis, election_name: str) -> None:
    (a,) = locks(redis_client, election_name, "a")
    with pytest.raises(ValueError, match="create"):
        a.update(rec("a"), b"")


# ---------------------------------------------------------------- update: CAS and terms


def test_update_is_a_cas_on_the_exact_bytes(redis_client: redis.Redis, election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    first = a.create(rec("a"))
    term = record_of(first).term
    renewed = a.update(rec("a", term=term), first.raw or b"")
    assert renewed.raw != first.raw

    # b read the record before a renewed: its bytes are stale now.
    with pytest.raises(LockConflictError) as info:
        b.update(rec("b"), first.raw or b"")
    assert info.value.observation.raw == renewed.raw
    assert record_of(info.value.observation).holder_identity == "a"
    assert redis_client.get(a.lease_key) == renewed.raw

    # Same content, one byte off: still a conflict.
    tampered = (renewed.raw or b"").replace(b'"a"', b'"a" ')
    with pytest.raises(LockConflictError):
        b.update(rec("b"), tampered)

    # With the current bytes the update goes through.
    taken = b.update(rec("b"), renewed.raw or b"")
    assert record_of(taken).holder_identity == "b"


def test_update_of_absent_lease_is_a_conflict(redis_client: redis.Redis,
                                              election_name: str) -> None:
    (a,) = locks(redis_client, election_name, "a")
    first = a.create(rec("a"))
    redis_client.delete(a.lease_key)
    with pytest.raises(LockConflictError) as info:
        a.update(rec("a", term=record_of(first).term), first.raw or b"")
    assert info.value.observation == Observation(raw=None, record=None, ttl=None)
    assert redis_client.get(a.lease_key) is None


def test_term_is_kept_on_renew_and_changes_with_holder_or_term_zero(
        redis_client: redis.Redis, election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    o = a.create(rec("a"))
    t1 = record_of(o).term
    acquired_at = record_of(o).acquire_time

    # Renew: same holder presenting its term keeps term, acquire time, transitions.
    o = a.update(rec("a", term=t1), o.raw or b"")
    r = record_of(o)
    assert (r.term, r.acquire_time, r.leader_transitions) == (t1, acquired_at, 0)
    assert r.version > t1

    # Same holder asking for term 0: a new leadership.
    o = a.update(rec("a", term=0), o.raw or b"")
    r = record_of(o)
    assert r.term > t1 and r.term == r.version
    assert r.leader_transitions == 1
    t2 = r.term

    # Same holder presenting a wrong term: also a new term, never the presented one.
    o = a.update(rec("a", term=t1), o.raw or b"")
    r = record_of(o)
    assert r.term > t2 and r.term != t1
    t3 = r.term

    # Another holder presenting the current term cannot inherit it.
    o = b.update(rec("b", term=t3), o.raw or b"")
    r = record_of(o)
    assert r.holder_identity == "b" and r.term > t3
    assert r.leader_transitions == 3


def test_terms_and_versions_never_repeat_after_the_lease_expires(
        redis_client: redis.Redis, election_name: str) -> None:
    """No ABA: a re-created lease never reuses a term or a version, so stale
    bytes or a stale term can never match it."""
    (a,) = locks(redis_client, election_name, "a")
    first = a.create(rec("a", lease=0.05))
    old = record_of(first)
    wait_until(lambda: a.get().raw is None, 5.0, message="short lease expired")
    assert redis_client.pttl(a.counter_key) == -1  # the counter itself never expires

    second = a.create(rec("a", lease=0.05))
    new = record_of(second)
    assert new.term > old.term and new.version > old.version
    assert second.raw != first.raw
    # A stale CAS with the first bytes must not match the new lease.
    with pytest.raises(LockConflictError):
        a.update(rec("a", term=old.term), first.raw or b"")
    # A stale release / claim with the first term must not touch it.
    assert not a.release(old.term)
    assert a.claim("tick", old.term) is ClaimResult.FENCED
    assert a.get().raw == second.raw


def test_durations_are_stored_in_milliseconds(redis_client: redis.Redis,
                                              election_name: str) -> None:
    (a,) = locks(redis_client, election_name, "a")
    written = a.create(rec("a", lease=0.35))
    stored = json.loads(redis_client.get(a.lease_key) or b"")
    assert stored["leaseDurationMs"] == 350
    assert record_of(written).lease_duration == 0.35
    pttl = redis_client.pttl(a.lease_key)
    assert 0 < pttl <= 350
    assert written.ttl is not None and written.ttl == 0.35


def test_tiny_lease_is_at_least_one_millisecond(redis_client: redis.Redis,
                                                election_name: str) -> None:
    (a,) = locks(redis_client, election_name, "a")
    written = a.create(rec("a", lease=0.0001))
    assert json.loads(written.raw or b"")["leaseDurationMs"] == 1


# ---------------------------------------------------------------- release


def test_release_needs_holder_and_term(redis_client: redis.Redis, election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    term = record_of(a.create(rec("a"))).term
    assert not a.release(term + 1)
    assert not a.release(0)
    assert not b.release(term)  # right term, wrong holder
    assert a.get().raw is not None
    assert a.release(term)
    assert a.get().raw is None
    assert not a.release(term)  # twice: nothing left


def test_stale_leader_cannot_release_a_newer_holders_lease(
        redis_client: redis.Redis, election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    old = a.create(rec("a"))
    old_term = record_of(old).term
    # a is partitioned; its lease is taken over by b.
    newer = b.update(rec("b"), old.raw or b"")
    assert not a.release(old_term)
    assert a.get().raw == newer.raw

    # Even when a itself re-acquired (same identity, new term), the old term is dead.
    current = a.update(rec("a"), newer.raw or b"")
    assert not a.release(old_term)
    assert a.get().raw == current.raw


# ---------------------------------------------------------------- claims and fenced scripts


def test_claim_results(redis_client: redis.Redis, election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    assert a.claim("tick", 1) is ClaimResult.FENCED  # no lease at all
    term = record_of(a.create(rec("a"))).term
    assert a.claim("tick", term) is ClaimResult.CLAIMED
    assert a.claim("tick", term) is ClaimResult.ALREADY_CLAIMED
    assert a.claim("tick-2", term + 1) is ClaimResult.FENCED
    assert b.claim("tick-2", term) is ClaimResult.FENCED
    assert redis_client.get(a.key("tick")) == b"1"
    assert redis_client.get(a.key("tick-2")) is None
    assert a.claim("with-value", term, value="payload") is ClaimResult.CLAIMED
    assert redis_client.get(a.key("with-value")) == b"payload"


def test_claim_after_takeover_is_fenced(redis_client: redis.Redis, election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    first = a.create(rec("a"))
    old_term = record_of(first).term
    new_term = record_of(b.update(rec("b"), first.raw or b"")).term
    assert a.claim("tick-9", old_term) is ClaimResult.FENCED
    assert b.claim("tick-9", new_term) is ClaimResult.CLAIMED
    assert a.claim("tick-9", old_term) is ClaimResult.FENCED  # not ALREADY_CLAIMED either


def test_claim_ttl(redis_client: redis.Redis, election_name: str) -> None:
    (a,) = locks(redis_client, election_name, "a")
    term = record_of(a.create(rec("a"))).term
    assert a.claim("forever", term) is ClaimResult.CLAIMED
    assert redis_client.pttl(a.key("forever")) == -1
    assert a.claim("minute", term, ttl=60.0) is ClaimResult.CLAIMED
    assert 59_000 < redis_client.pttl(a.key("minute")) <= 60_000
    assert a.claim("short", term, ttl=0.05) is ClaimResult.CLAIMED
    wait_until(lambda: redis_client.exists(a.key("short")) == 0, 5.0, message="claim expired")
    assert a.claim("short", term, ttl=0.05) is ClaimResult.CLAIMED  # claimable again


def test_fenced_script_runs_only_inside_the_term(redis_client: redis.Redis,
                                                 election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    bump = a.fenced_script(
        "redis.call('INCRBY', KEYS[2], ARGV[3])\nreturn redis.call('GET', KEYS[2])"
    )
    counter = a.key("work-counter")
    assert bump(1, keys=[counter], args=[5]) == FENCED  # no lease
    first = a.create(rec("a"))
    term = record_of(first).term
    assert bump(term, keys=[counter], args=[5]) == b"5"
    assert bump(term, keys=[counter], args=[2]) == b"7"
    assert bump(term + 1, keys=[counter], args=[100]) == FENCED
    b.update(rec("b"), first.raw or b"")
    assert bump(term, keys=[counter], args=[100]) == FENCED
    assert redis_client.get(counter) == b"7"  # nothing ran after the fence


# ---------------------------------------------------------------- two locks, one identity


def test_two_locks_with_one_identity_are_two_holders(redis_client: redis.Redis,
                                                     election_name: str) -> None:
    # A copy-pasted identity: b must not release, claim, fence or renew under a's term.
    a, b = locks(redis_client, election_name, "same", "same")
    assert a.instance() != b.instance()
    written = a.create(rec("same"))
    term = record_of(written).term
    assert record_of(written).holder_instance == a.instance()
    assert b.claim("tick", term) is ClaimResult.FENCED
    assert b.fenced_script("return 1")(term) == FENCED
    assert not b.release(term)
    assert a.get().raw == written.raw
    # b writing over a's bytes while presenting a's term is a new holder: new term.
    taken = record_of(b.update(LeaderElectionRecord(
        holder_identity="same", holder_instance=b.instance(), lease_duration=5.0, term=term),
        written.raw or b""))
    assert taken.term > term and taken.holder_instance == b.instance()
    assert a.claim("tick", term) is ClaimResult.FENCED
    assert b.claim("tick", taken.term) is ClaimResult.CLAIMED


def test_the_stored_record_keeps_the_identity_readable_by_older_versions(
        redis_client: redis.Redis, election_name: str) -> None:
    (a,) = locks(redis_client, election_name, "pod-0")
    a.create(rec("pod-0"))
    stored = json.loads(redis_client.get(a.lease_key) or b"")
    # What an older reader looks at is unchanged; the instance is a field of its own.
    assert stored["holderIdentity"] == "pod-0"
    assert stored["holderInstance"] == a.instance()
    assert {"leaseDurationMs", "term", "version"} <= stored.keys()


def test_a_record_without_an_instance_is_another_holders(redis_client: redis.Redis,
                                                         election_name: str) -> None:
    # Written by an older celery-leader under our identity: not ours to fence with.
    (a,) = locks(redis_client, election_name, "pod-0")
    redis_client.set(a.lease_key, json.dumps(
        {"holderIdentity": "pod-0", "leaseDurationMs": 5000, "term": 3, "version": 3}))
    assert a.claim("tick", 3) is ClaimResult.FENCED
    assert not a.release(3)


# ---------------------------------------------------------------- foreign data in the lease key


def test_malformed_json_lease_is_reported_and_replaceable(redis_client: redis.Redis,
                                                          election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    redis_client.set(a.lease_key, b"{this is not json")
    observed = b.get()
    assert observed.raw == b"{this is not json"
    assert observed.record is None
    assert observed.error and "not JSON" in observed.error
    assert observed.ttl is None  # no TTL on a hand-written key
    assert a.claim("tick", 1) is ClaimResult.FENCED
    assert not a.release(1)
    with pytest.raises(LockConflictError):
        b.create(rec("b"))
    written = b.update(rec("b"), observed.raw or b"")
    assert record_of(written).holder_identity == "b"
    assert record_of(b.get()).holder_identity == "b"


@pytest.mark.parametrize("raw", [
    b'["a", 1]',
    b'{"holderIdentity": 5}',
    b'{"holderIdentity":"a","leaseDurationMs":Infinity,"term":1}',
    b'{"holderIdentity":"a","leaseDurationMs":1' + b"0" * 400 + b',"term":1}',
    b"[" * 50_000,
])
def test_record_shaped_garbage_is_reported_and_replaceable(
        raw: bytes, redis_client: redis.Redis, election_name: str) -> None:
    (b,) = locks(redis_client, election_name, "b")
    redis_client.set(b.lease_key, raw)
    observed = b.get()  # must not raise
    assert observed.raw == raw and observed.record is None and observed.error
    written = b.update(rec("b"), raw)
    assert record_of(written).holder_identity == "b"


@pytest.mark.parametrize("kind", ["hash", "list", "set", "zset"])
def test_wrong_typed_lease_key_is_reported_and_replaceable(
        kind: str, redis_client: redis.Redis, election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    key = a.lease_key
    if kind == "hash":
        redis_client.hset(key, mapping={"holderIdentity": "a", "term": "1"})
    elif kind == "list":
        redis_client.rpush(key, "a")
    elif kind == "set":
        redis_client.sadd(key, "a")
    else:
        redis_client.zadd(key, {"a": 1.0})
    observed = b.get()
    assert observed.record is None
    assert observed.raw == f"<wrongtype:{kind}>".encode()
    assert observed.error
    # Every script copes with the foreign type instead of a WRONGTYPE error.
    assert a.claim("tick", 1) is ClaimResult.FENCED
    assert not a.release(1)
    with pytest.raises(LockConflictError) as info:
        b.create(rec("b"))
    assert info.value.observation.raw == observed.raw
    written = b.update(rec("b"), observed.raw or b"")
    assert record_of(written).holder_identity == "b"
    assert redis_client.type(key) == b"string"


# ---------------------------------------------------------------- keys and slots


def test_all_keys_of_an_election_share_one_hash_slot(redis_client: redis.Redis) -> None:
    (a,) = locks(redis_client, "orders", "a")
    term = record_of(a.create(rec("a"))).term
    assert a.claim("tick:2024-01-01T00:00", term) is ClaimResult.CLAIMED
    keys = redis_client.keys("*")
    assert {a.lease_key.encode(), a.counter_key.encode(),
            a.key("tick:2024-01-01T00:00").encode()} == set(keys)
    names = [*keys, a.channel.encode()]
    assert all(b"{orders}" in k for k in names), names
    assert len({key_slot(k) for k in names}) == 1


def test_two_elections_land_in_different_slots(redis_client: redis.Redis) -> None:
    a = RedisLock(redis_client, name="alpha", identity="x")
    b = RedisLock(redis_client, name="beta", identity="x")
    assert key_slot(a.lease_key.encode()) == key_slot(b"{alpha}")
    assert key_slot(b.lease_key.encode()) == key_slot(b"{beta}")
    assert key_slot(a.lease_key.encode()) != key_slot(b.lease_key.encode())
    # And they are independent elections.
    a.create(rec("x"))
    b.create(rec("x"))


def test_key_prefix_is_configurable(redis_client: redis.Redis) -> None:
    lock = RedisLock(redis_client, name="n", identity="x", key_prefix="myapp")
    assert lock.lease_key == "myapp:{n}:lease"
    assert lock.counter_key == "myapp:{n}:counter"
    assert lock.channel == "myapp:{n}:events"


@pytest.mark.parametrize("name", ["", "a{b", "a}b", "{a}"])
def test_names_with_braces_are_rejected(redis_client: redis.Redis, name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        RedisLock(redis_client, name=name, identity="x")


def test_works_with_a_decoding_client(redis_url: str, election_name: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        a, b = locks(client, election_name, "a", "b")
        first = a.create(rec("a"))
        assert isinstance(first.raw, bytes)
        with pytest.raises(LockConflictError):
            b.update(rec("b"), b"stale")
        term = record_of(first).term
        assert a.claim("tick", term) is ClaimResult.CLAIMED
        assert a.release(term)
    finally:
        client.close()


# ---------------------------------------------------------------- pub/sub


def test_release_publishes_and_failed_release_does_not(redis_client: redis.Redis,
                                                       election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    term = record_of(a.create(rec("a"))).term
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(a.channel)
        wait_until(lambda: redis_client.pubsub_numsub(a.channel)[0][1] == 1, 5.0)
        assert not b.release(term)  # refused: must not wake anyone
        assert a.release(term)
        message = None

        def got_message() -> bool:
            nonlocal message
            message = pubsub.get_message(timeout=0.1)
            return message is not None

        wait_until(got_message, 5.0, message="a message on the events channel")
        assert message is not None and message["data"] == b"released"
        first = b.create(rec("b"))  # a new holder announces itself
        wait_until(got_message, 5.0)
        assert message["data"] == b"acquired"
        term_b = record_of(first).term
        b.update(rec("b", term=term_b), first.raw or b"")  # a renew is silent
        assert b.release(term_b)
        wait_until(got_message, 5.0)
        assert message["data"] == b"released"
    finally:
        pubsub.close()


def test_subscribe_calls_back_on_release(redis_client: redis.Redis, election_name: str) -> None:
    a, b = locks(redis_client, election_name, "a", "b")
    term = record_of(a.create(rec("a"))).term
    calls: list[int] = []
    lock = threading.Lock()

    def on_change() -> None:
        with lock:
            calls.append(1)

    unsubscribe = b.subscribe(on_change)
    try:
        # The subscription itself calls back once (messages may have been missed).
        wait_until(lambda: len(calls) >= 1, 5.0, message="subscribe confirmation")
        wait_until(lambda: redis_client.pubsub_numsub(b.channel)[0][1] == 1, 5.0)
        before = len(calls)
        assert a.release(term)
        wait_until(lambda: len(calls) > before, 5.0, message="callback after release")
    finally:
        unsubscribe()
    wait_until(lambda: redis_client.pubsub_numsub(b.channel)[0][1] == 0, 5.0,
               message="unsubscribed")


def test_default_subscribe_is_polling_only() -> None:
    from celery_leader.resourcelock import ResourceLock
    from tests.fakes import FakeStore

    lock: ResourceLock = FakeStore().lock("a")
    unsubscribe = lock.subscribe(lambda: None)
    unsubscribe()
