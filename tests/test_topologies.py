"""celery-leader on real Redis topologies: Sentinel failover, Cluster, ACL.

Every server is a child process on a free 127.0.0.1 port (tests/topologies.py),
with its data under ``tmp_path``, stopped by PID in teardown.  Waits are
bounded polls on conditions.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_leader import (
    ClaimResult,
    LeaderCallbacks,
    LeaderElectionConfig,
    LeaderElectionRecord,
    LeaderElector,
    LockConflictError,
    RedisLock,
)
from celery_leader.decorators import TASK_START_LUA
from celery_leader.embedded import EmbeddedRedis
from celery_leader.entries import entry_from_config
from celery_leader.redislock import FENCED
from celery_leader.scheduler import ScheduleRunner, ScheduleStore
from celery_leader.settings import LeaderSettings, redis_client_from_url
from tests.dispatch import fire as dispatch_tick
from tests.topologies import HOST, MASTER_NAME, ClusterTopology, SentinelTopology, wait_for

pytestmark = pytest.mark.integration

UTC = timezone.utc

# What a Redis 6.2+ ACL user needs to run everything celery-leader does (the
# elector, fenced claims and scripts, leader-only tasks, the scheduler and its
# runtime-entry API, the CLI), and nothing outside its key prefix and channels.
# Lua scripts run with the caller's permissions, so the commands they call are
# listed too.  +select is only needed when the URL names a database other than
# 0; +ping serves redis-py's connection health checks.  Replace ``>secret``.
ACL_RULE = (
    "on >secret resetkeys ~celery-leader:* resetchannels &celery-leader:* -@all "
    "+evalsha +script|load +type +get +set +del +pttl +time +hincrby +hget +hset +hdel "
    "+hgetall +hscan +hexists +incrby +zadd +publish +subscribe +ping +select"
)
ACL_USER = "leader"
ACL_PASSWORD = "secret"


# ---------------------------------------------------------------- helpers


class WatchedLock(RedisLock):
    """A RedisLock that records every pub/sub wake-up it hands to the elector."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wakes: list[float] = []

    def subscribe(self, on_change: Callable[[], None]) -> Callable[[], None]:
        def woken() -> None:
            self.wakes.append(time.monotonic())
            on_change()

        return super().subscribe(woken)


@dataclass
class Member:
    identity: str
    elector: LeaderElector
    lock: WatchedLock
    client: Any
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    # (monotonic time, term) at every start of a leadership
    started: list[tuple[float, int]] = field(default_factory=list)
    stopped: list[float] = field(default_factory=list)


class Electors:
    """Electors in threads of this process; all stopped (and joined) in teardown."""

    def __init__(self) -> None:
        self.members: list[Member] = []

    def add(self, client: Any, name: str, identity: str, lease: float, renew: float,
            retry: float) -> Member:
        lock = WatchedLock(client, name=name, identity=identity)
        holder: list[Member] = []

        def started(stop: threading.Event) -> None:
            member = holder[0]
            term = member.elector.term
            if term:
                member.started.append((time.monotonic(), term))
            stop.wait()

        def stopped() -> None:
            holder[0].stopped.append(time.monotonic())

        config = LeaderElectionConfig(
            lock=lock, callbacks=LeaderCallbacks(started, stopped), lease_duration=lease,
            renew_deadline=renew, retry_period=retry, release_on_cancel=True, name=name)
        member = Member(identity, LeaderElector(config), lock, client)
        holder.append(member)
        member.thread = threading.Thread(target=member.elector.run, args=(member.stop,),
                                         name=f"elector-{identity}", daemon=True)
        self.members.append(member)
        member.thread.start()
        return member

    def leaders(self) -> list[Member]:
        return [m for m in self.members if m.elector.is_leader()]

    def one_leader(self) -> Member | None:
        leaders = self.leaders()
        return leaders[0] if len(leaders) == 1 else None

    def starts(self) -> list[tuple[float, int, str]]:
        """Every start of a leadership, in time order: (time, term, identity)."""
        return sorted((t, term, m.identity) for m in self.members for t, term in m.started)

    def stop(self) -> None:
        for member in self.members:
            member.elector.stop()
        alive = []
        for member in self.members:
            if member.thread is not None:
                member.thread.join(10.0)
                if member.thread.is_alive():
                    alive.append(member.identity)
        for member in self.members:
            close = getattr(member.client, "close", None)
            if close is not None:
                close()
        assert not alive, f"electors did not stop within 10s: {alive}"


class LeaderSampler:
    """Samples every elector's is_leader() every few milliseconds in a thread of
    its own, and records every instant at which more than one said yes."""

    def __init__(self, electors: Electors, interval: float = 0.002) -> None:
        self.electors = electors
        self.interval = interval
        self.samples = 0
        self.overlaps: list[tuple[float, list[str]]] = []
        self._started = self._ended = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader-sampler", daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            leading = [m.identity for m in self.electors.members if m.elector.is_leader()]
            self.samples += 1
            if len(leading) > 1:
                self.overlaps.append((time.monotonic(), leading))
            self._done.wait(self.interval)

    def mean_gap(self) -> float:
        return (self._ended - self._started) / max(1, self.samples)

    def __enter__(self) -> LeaderSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5.0)
        self._ended = time.monotonic()


@pytest.fixture
def electors() -> Iterator[Electors]:
    group = Electors()
    try:
        yield group
    finally:
        group.stop()


def _record(identity: str, lease: float = 5.0, term: int = 0) -> LeaderElectionRecord:
    return LeaderElectionRecord(holder_identity=identity, lease_duration=lease, term=term)


# A fenced script with keys of its own next to the lease: records a value in a
# hash and counts the calls, only while the caller's term is current.
FENCED_EXTRA_KEYS_LUA = """
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return redis.call('HINCRBY', KEYS[3], 'calls', 1)
"""


def exercise_lock(client: Any, name: str) -> int:
    """Every RedisLock script against ``client``; returns the first term taken."""
    alice = RedisLock(client, name=name, identity="alice")
    bob = RedisLock(client, name=name, identity="bob")
    assert alice.get().raw is None
    created = alice.create(_record("alice"))
    assert created.record is not None
    term = created.record.term
    assert term >= 1
    renewed = alice.update(_record("alice", term=term), created.raw or b"")
    assert renewed.record is not None
    assert renewed.record.term == term, "a renew keeps the term"
    assert renewed.record.version > created.record.version
    with pytest.raises(LockConflictError):
        bob.create(_record("bob"))
    with pytest.raises(LockConflictError):
        bob.update(_record("bob"), created.raw or b"")  # stale bytes
    observed = bob.get()
    assert observed.raw == renewed.raw
    assert observed.ttl is not None and 0 < observed.ttl <= 5.0

    assert alice.claim("tick:1", term) is ClaimResult.CLAIMED
    assert alice.claim("tick:1", term) is ClaimResult.ALREADY_CLAIMED
    assert alice.claim("tick:2", term, ttl=5.0) is ClaimResult.CLAIMED
    assert alice.claim("tick:3", term + 1) is ClaimResult.FENCED
    assert bob.claim("tick:3", term) is ClaimResult.FENCED

    script = alice.fenced_script(FENCED_EXTRA_KEYS_LUA)
    extra = [alice.key("extra:hash"), alice.key("extra:calls")]
    assert script(term, keys=extra, args=["field", "value"]) == 1
    assert script(term, keys=extra, args=["field", "value"]) == 2
    assert script(term + 1, keys=extra, args=["field", "value"]) == FENCED
    assert bob.fenced_script(FENCED_EXTRA_KEYS_LUA)(term, keys=extra, args=["f", "v"]) == FENCED

    assert not bob.release(term)
    assert not alice.release(term + 1)
    assert alice.release(term)
    assert alice.get().raw is None
    taken = bob.create(_record("bob"))
    assert taken.record is not None and taken.record.term > term, "terms never repeat"
    assert alice.claim("tick:4", term) is ClaimResult.FENCED, "the old term is over"
    assert bob.release(taken.record.term)
    return term


@dataclass
class SentTask:
    name: str
    options: dict[str, Any]


def exercise_schedule(client: Any, name: str) -> None:
    """ScheduleStore's runtime-entry API and the scheduler's fenced tick claim,
    pending-message adoption and publish, against ``client``."""
    # A broker that is not Redis (nothing to connect to): the herd sends each tick
    # through send_task, recorded here.
    app = Celery("topologies", broker="memory://", set_as_current=False)
    sent: list[SentTask] = []

    def send_task(task: str, **options: Any) -> None:
        sent.append(SentTask(task, options))

    app.send_task = send_task
    lock = RedisLock(client, name=name, identity="scheduler")
    store = ScheduleStore(app, lock, entries_name=name)
    store.add("every-minute", "tasks.ping", 60.0, args=[1], kwargs={"x": 2})
    assert set(store.runtime_entries()) == {"every-minute"}
    assert store.disable("every-minute").enabled is False
    assert store.get("every-minute").enabled is False
    assert store.enable("every-minute").enabled is True
    assert store.version() == 3
    # A beat_schedule entry's override; a runner's load, and the runtime entry
    # read again as it comes near.
    app.conf.beat_schedule = {"nightly": {"task": "tasks.ping", "schedule": 86400.0}}
    assert store.disable("nightly").enabled is False
    assert store.enable("nightly").enabled is True
    loading = ScheduleRunner(app, lock, LeaderSettings(redis_url="redis://unused", name=name))
    loaded = loading._load(datetime.now(UTC))
    assert set(loaded.queue.fire_times()) == {"nightly", "every-minute"}
    assert not loading.store._warned_no_hscan, "runtime entries read in chunks (HSCAN)"
    loading._near.clear()
    assert loading._entry(loaded, "every-minute") == store.get("every-minute")
    app.conf.beat_schedule = {}
    assert store.version() == 5

    first = lock.create(_record("scheduler")).record
    assert first is not None
    leading = [True]
    settings = LeaderSettings(redis_url="redis://unused", name=name)
    runner = ScheduleRunner(app, lock, settings, entries={},
                            still_leading=lambda: leading[0])
    entry = store.get("every-minute")
    fire = datetime(2030, 1, 1, tzinfo=UTC)
    assert dispatch_tick(runner, entry, fire, first.term)
    assert [s.name for s in sent] == ["tasks.ping"]
    assert sent[0].options["headers"]["leader_term"] == first.term
    assert dispatch_tick(runner, entry, fire, first.term)
    assert len(sent) == 1, "a tick is claimed and sent once"
    assert not dispatch_tick(runner, entry, fire + timedelta(minutes=1), first.term + 1), \
        "another term is fenced"
    assert store.states()["every-minute"]["last"] == round(fire.timestamp() * 1000)
    assert not client.hgetall(store.pending_key)

    # Claimed but not sent (leadership ended in between): the next term adopts it.
    leading[0] = False
    later = fire + timedelta(minutes=1)
    assert dispatch_tick(runner, entry, later, first.term)
    assert len(sent) == 1 and len(client.hgetall(store.pending_key)) == 1
    assert lock.release(first.term)
    second = lock.create(_record("scheduler")).record
    assert second is not None and second.term > first.term
    leading[0] = True
    assert runner._recover_pending(second.term)
    assert len(sent) == 2 and sent[1].options["headers"]["leader_term"] == second.term
    assert not client.hgetall(store.pending_key)
    assert lock.release(second.term)

    assert store.remove("every-minute")
    assert store.runtime_entries() == {}
    assert store.version() == 6


def hand_over_by_pubsub(electors: Electors, client_factory: Callable[[], Any], name: str,
                        lease: float, renew: float, retry: float) -> dict[str, float]:
    """Two electors: the first leads and renews; on step_down the follower is
    woken by pub/sub and takes over well before its own poll could."""
    first = electors.add(client_factory(), name, "first", lease, renew, retry)
    wait_for(lambda: first.elector.is_leader(), 5 * retry + lease, "first elector leading")
    second = electors.add(client_factory(), name, "second", lease, renew, retry)
    wait_for(lambda: second.lock.wakes, 5.0, "follower subscribed (confirmation received)")
    term = first.elector.term
    start = first.lock.get().record
    assert start is not None and start.term == term

    def renewed_three_times() -> bool:
        record = first.lock.get().record
        return record is not None and record.term == term and record.version >= start.version + 3

    wait_for(renewed_three_times, 10 * retry, "three renewals with the same term")
    assert not second.elector.is_leader()
    assert second.elector.get_leader() == "first"

    wakes_before = len(second.lock.wakes)
    released_at = time.monotonic()
    first.elector.step_down()
    took = wait_for(lambda: second.elector.is_leader(), lease + 2 * retry,
                    "follower taking over after step_down")
    assert len(second.lock.wakes) > wakes_before, "the follower was not woken by pub/sub"
    woken_at = second.lock.wakes[wakes_before]
    assert woken_at >= released_at
    assert second.elector.term > term
    assert took < retry, (
        f"hand-over took {took:.3f}s: not the pub/sub wake-up (retry period {retry}s)")
    return {"hand_over": took, "wake_after_release": woken_at - released_at}


# ---------------------------------------------------------------- Sentinel

LEASE, RENEW, RETRY = 2.0, 1.4, 0.3


@pytest.fixture
def sentinel_topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    topology = SentinelTopology(tmp_path)
    try:
        topology.start()
    except BaseException:
        print(topology.logs())
        topology.stop()
        raise
    try:
        yield topology
    finally:
        topology.stop()


def _counter(port: int, name: str) -> int | None:
    """The election's version counter as the server on ``port`` has it."""
    lock_key = f"celery-leader:{{{name}}}:counter"
    with redis.Redis(HOST, port, socket_timeout=2.0, socket_connect_timeout=2.0) as client:
        raw = client.hget(lock_key, "version")
    return int(raw) if raw is not None else None


def test_sentinel_failover_one_leader_and_terms_increase(
        sentinel_topology: SentinelTopology, electors: Electors) -> None:
    """Three electors reach the primary through three sentinels.  The primary is
    SIGKILLed; after the replica's promotion exactly one leader continues, no
    two electors ever say is_leader() at the same sampled instant, and every
    new leadership has a larger term than any before."""
    topology = sentinel_topology
    name = "failover"
    url = topology.url()
    with LeaderSampler(electors) as sampler:
        for i in range(3):
            client = redis_client_from_url(url, {"master_name": MASTER_NAME}, RETRY)
            electors.add(client, name, f"elector-{i}", LEASE, RENEW, RETRY)
        wait_for(electors.one_leader, 10.0, "a first leader through Sentinel")
        before = electors.one_leader()
        assert before is not None
        term_before = before.elector.term

        def renewed_twice() -> bool:
            record = before.lock.get().record
            return record is not None and record.version >= term_before + 2

        wait_for(renewed_twice, 5.0, "two renewals through Sentinel")
        wait_for(lambda: _counter(topology.replica.port, name) == _counter(
            topology.primary.port, name), 5.0, "replica caught up with the counter")

        counter_at_kill = _counter(topology.primary.port, name)
        replica_at_kill = _counter(topology.replica.port, name)
        killed_at = time.monotonic()
        topology.primary.kill()
        promoted = topology.wait_sentinels_agree(topology.replica.port, timeout=30.0)

        def new_leader_on_new_primary() -> bool:
            leader = electors.one_leader()
            if leader is None:
                return False
            with topology.replica.client() as client:
                raw = client.get(leader.lock.lease_key)
            return raw is not None and leader.identity.encode() in raw

        wait_for(new_leader_on_new_primary, 30.0,
                 "one leader again, its lease on the promoted replica")
        recovered = time.monotonic() - killed_at
        after = electors.one_leader()
        assert after is not None
        term_after = after.elector.term

        # Exactly one leader continues: the same leadership for more than a
        # lease, and every other elector follows it.
        def same_single_leader() -> None:
            assert electors.one_leader() is after and after.elector.term == term_after
            for member in electors.members:
                if member is not after:
                    assert not member.elector.is_leader()

        deadline = time.monotonic() + LEASE + RETRY
        while time.monotonic() < deadline:
            same_single_leader()
            time.sleep(0.01)
        wait_for(lambda: all(m.elector.get_leader() == after.identity
                             for m in electors.members), 5.0, "every elector following")
        counter_after = _counter(topology.replica.port, name)

    starts = electors.starts()
    terms = [term for _, term, _ in starts]
    timeline = [(round(t - killed_at, 2), term, who) for t, term, who in starts]
    print(f"\nSENTINEL: primary SIGKILL -> sentinels agree on the replica {promoted:.2f}s, "
          f"-> one leader on it {recovered:.2f}s; counter at kill: primary "
          f"{counter_at_kill}, replica {replica_at_kill}; term before {term_before} "
          f"({before.identity}), after {term_after} ({after.identity}); counter now "
          f"{counter_after}; leadership starts (s after kill, term, who) {timeline}; "
          f"{sampler.samples} samples every {sampler.mean_gap() * 1000:.1f} ms, "
          f"{len(sampler.overlaps)} overlaps")
    assert not sampler.overlaps, f"two leaders at once: {sampler.overlaps[:5]}"
    assert sampler.mean_gap() < 0.02, "is_leader() was not sampled densely enough"
    assert terms == sorted(set(terms)), f"terms repeated or went backwards: {starts}"
    assert term_after > term_before
    assert [t for t, _, _ in starts if t > killed_at], "no new leadership after the failover"


FROZEN_BOUND = 2.0


def test_frozen_sentinel_costs_at_most_one_timeout(sentinel_topology: SentinelTopology) -> None:
    """A sentinel that accepts connections but never answers (SIGSTOP) must
    delay master discovery by about one socket timeout, not stall it."""
    topology = sentinel_topology
    client = redis_client_from_url(topology.url(), {"master_name": MASTER_NAME}, 0.5)
    frozen = topology.sentinels[0]
    assert frozen.pid is not None
    results: list[object] = []

    def write() -> None:
        try:
            results.append(client.set("celery-leader:{frozen}:probe", "1"))
        except Exception as exc:
            results.append(exc)

    thread = threading.Thread(target=write, name="frozen-sentinel-probe", daemon=True)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        thread.start()
        thread.join(FROZEN_BOUND)
        elapsed = time.monotonic() - started
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
        thread.join(120.0)
        client.close()
    assert results == [True], f"the write failed: {results}"
    assert elapsed < FROZEN_BOUND, (
        f"a write through Sentinel with one frozen sentinel took {elapsed:.1f}s")


# ---------------------------------------------------------------- Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    topology = ClusterTopology(tmp_path_factory.mktemp("cluster"))
    try:
        topology.start()
    except BaseException:
        print(topology.logs())
        topology.stop()
        raise
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture
def cluster_client(cluster: ClusterTopology) -> Iterator[Any]:
    client = cluster.client()
    try:
        yield client
    finally:
        client.close()


def exercise_beat_schedule(client: Any, name: str) -> None:
    """The standalone beats' election (keys in the schedule's slot) takes the
    schedule over from the workers' ended leadership and claims a tick."""
    app = Celery("topologies-beat", broker="memory://", set_as_current=False)
    app.send_task = lambda task, **options: None
    beats = RedisLock(client, name=f"{name}-beat", identity="beat", hash_tag=name)
    record = beats.create(_record("beat")).record
    assert record is not None
    settings = LeaderSettings(redis_url="redis://unused", name=name)
    runner = ScheduleRunner(app, beats, settings, entries={})
    assert runner._take_schedule(record.term, threading.Event()) is not None
    entry = entry_from_config("job", {"task": "tasks.ping", "schedule": 60.0}, app)
    assert dispatch_tick(runner, entry, datetime(2030, 1, 1, tzinfo=UTC), record.term)
    assert runner.store.dispatcher() == {"election": f"{name}-beat", "identity": "beat",
                                         "holder": beats.holder(), "term": record.term}
    assert beats.release(record.term)


def test_cluster_every_script_runs_in_one_slot(cluster_client: Any) -> None:
    """create/update/get/release/claim and a fenced script with extra keys work
    through RedisCluster (no CROSSSLOT); all keys and the channel of one election
    share a slot, and two elections land in different slots on different nodes."""
    exercise_lock(cluster_client, "alpha")
    exercise_schedule(cluster_client, "alpha-schedule")
    exercise_beat_schedule(cluster_client, "alpha-schedule")

    alpha = RedisLock(cluster_client, name="alpha", identity="x")
    beta = RedisLock(cluster_client, name="beta", identity="x")
    store = ScheduleStore(Celery("slots", set_as_current=False), alpha)
    beats = RedisLock(cluster_client, name="alpha-beat", identity="x", hash_tag="alpha")
    keys = [alpha.lease_key, alpha.counter_key, alpha.channel, alpha.key("tick:1"),
            store.state_key, store.pending_key, store.entries_key, store.version_key,
            store.first_seen_key, store.overrides_key, store.dispatcher_key,
            beats.lease_key, beats.counter_key, beats.channel]
    slots = {key: cluster_client.cluster_keyslot(key) for key in keys}
    assert len(set(slots.values())) == 1, slots
    alpha_slot = slots[alpha.lease_key]
    beta_slot = cluster_client.cluster_keyslot(beta.lease_key)
    assert alpha_slot != beta_slot
    alpha_node = cluster_client.get_node_from_key(alpha.lease_key)
    beta_node = cluster_client.get_node_from_key(beta.lease_key)
    assert alpha_node.port != beta_node.port, "pick names served by different primaries"


def test_cluster_elector_renews_and_hands_over_by_pubsub(
        cluster: ClusterTopology, electors: Electors) -> None:
    """An elector acquires and renews through RedisCluster, and a follower
    subscribed through ClusterPubSub takes over at once on step_down."""
    timings = hand_over_by_pubsub(electors, cluster.client, "cluster-election",
                                  lease=4.0, renew=3.0, retry=1.0)
    print(f"\nCLUSTER: hand-over {timings['hand_over'] * 1000:.0f} ms, pub/sub wake "
          f"{timings['wake_after_release'] * 1000:.0f} ms after step_down")


# ---------------------------------------------------------------- ACL


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(data_dir=str(tmp_path))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _set_user(server: EmbeddedRedis, rule: str) -> None:
    with redis.Redis(HOST, server.port) as admin:
        admin.execute_command("ACL", "DELUSER", ACL_USER)
        admin.execute_command("ACL", "SETUSER", ACL_USER, *rule.split())
        admin.script_flush()  # so the user's first call must SCRIPT LOAD


def _user_client(server: EmbeddedRedis, db: int = 1, health_check: float = 0.05) -> Any:
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@{HOST}:{server.port}/{db}"
    return redis_client_from_url(url, {"health_check_interval": health_check}, 0.5)


def _everything(client: Any, name: str) -> None:
    """Every call the library makes, as the restricted user."""
    exercise_lock(client, name)
    exercise_schedule(client, name)
    exercise_beat_schedule(client, name)
    lock = RedisLock(client, name=name, identity="task-runner")
    term = lock.create(_record("task-runner")).record.term  # type: ignore[union-attr]
    task_key = lock.key("task:some-id")
    assert lock.fenced_script(TASK_START_LUA)(
        term, keys=[task_key], args=[60000, f"running:{term}:attempt"]) == 1
    client.set(task_key, "done", px=60000)  # what @leader_only does after the run
    client.delete(task_key)
    assert lock.release(term)
    # A wrong-typed lease key (written by hand) is read through TYPE and replaced.
    client.hset(lock.lease_key, "garbage", "1")
    observed = lock.get()
    assert observed.record is None and observed.raw == b"<wrongtype:hash>"
    replaced = lock.update(_record("task-runner"), observed.raw).record
    assert replaced is not None and lock.release(replaced.term)
    client.time()  # `celery leader status`
    time.sleep(0.06)  # past the health-check interval: the next command PINGs first
    assert lock.get().raw is None
    wakes: list[float] = []
    unsubscribe = lock.subscribe(lambda: wakes.append(time.monotonic()))
    try:
        wait_for(lambda: wakes, 2.0, "subscribed to the election's channel")
    finally:
        unsubscribe()


def test_acl_user_runs_everything_and_nothing_else(
        acl_server: EmbeddedRedis, electors: Electors,
        caplog: pytest.LogCaptureFixture) -> None:
    """With ACL_RULE, elections, claims, scripts and the schedule API all work
    (no lock error or pub/sub failure is even logged), while every key and
    channel outside the prefix, and every other command, is refused."""
    caplog.set_level(logging.DEBUG, logger="celery_leader")
    _set_user(acl_server, ACL_RULE)
    client = _user_client(acl_server)
    try:
        _everything(client, "acl")
        hand_over_by_pubsub(electors, lambda: _user_client(acl_server), "acl-election",
                            lease=2.0, renew=1.4, retry=0.5)

        refused = {
            "SET outside the prefix": lambda: client.set("other:key", "1"),
            "GET outside the prefix": lambda: client.get("celery-leaderX"),
            "a lock under another prefix": lambda: RedisLock(
                client, name="acl", identity="x", key_prefix="other").create(_record("x")),
            "a script touching an undeclared key": lambda: client.eval(
                "return redis.call('GET', 'other:key')", 0),
            "PUBLISH outside the channels": lambda: client.publish("other:events", "x"),
            "FLUSHDB": client.flushdb,
            "KEYS": lambda: client.keys("*"),
            "CONFIG GET": lambda: client.config_get("*"),
        }
        allowed = []
        for what, call in refused.items():
            try:
                call()
            except redis.exceptions.NoPermissionError:
                continue
            allowed.append(what)
        assert not allowed, f"the ACL user could: {allowed}"
    finally:
        client.close()
    # The scheduler's warnings are the deliberate adoption in exercise_schedule.
    complaints = [r.getMessage() for r in caplog.records
                  if r.name in ("celery_leader.elector", "celery_leader.redislock")
                  and ("failed" in r.getMessage() or r.levelno >= logging.WARNING)]
    assert not complaints, complaints


def test_acl_rule_is_minimal(acl_server: EmbeddedRedis) -> None:
    """Every command in ACL_RULE is needed: without any one of them, something
    the library does is refused."""
    tokens = ACL_RULE.split()
    unneeded = []
    for i, token in enumerate(tokens):
        if not token.startswith("+"):
            continue
        _set_user(acl_server, " ".join(tokens[:i] + tokens[i + 1:]))
        client = _user_client(acl_server)
        try:
            _everything(client, f"minimal-{token.strip('+').replace('|', '-')}")
        except (redis.exceptions.RedisError, AssertionError, TimeoutError):
            continue
        finally:
            client.close()
        unneeded.append(token)
    assert not unneeded, f"not needed by anything the library does: {unneeded}"
