from __future__ import annotations

import redis

from celery_leader import ClaimResult, LeaderElectionRecord, RedisLock


def test_create_then_claim_is_fenced_by_term(redis_client: redis.Redis, election_name: str) -> None:
    lock = RedisLock(redis_client, name=election_name, identity="a")
    written = lock.create(LeaderElectionRecord(holder_identity="a", lease_duration=5.0))
    assert written.record is not None
    term = written.record.term
    assert lock.claim("tick", term) is ClaimResult.CLAIMED
    assert lock.claim("tick", term) is ClaimResult.ALREADY_CLAIMED
    assert lock.claim("other", term + 1) is ClaimResult.FENCED
