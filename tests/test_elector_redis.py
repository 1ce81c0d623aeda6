"""Electors in threads of one process, contending on a real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis

from celery_leader import LeaderCallbacks, LeaderElectionConfig, LeaderElector, RedisLock
from tests.fakes import observe, wait_until

LEASE = 1.0
RENEW = 0.7
RETRY = 0.2


@dataclass
class Replica:
    identity: str
    elector: LeaderElector
    client: redis.Redis
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    events: list[tuple[str, float]] = field(default_factory=list)
    new_leaders: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def last(self, name: str) -> float:
        return [t for n, t in self.events if n == name][-1]

    def leading_marker(self) -> str:
        marks = [n for n in self.names() if n in ("started", "stopped")]
        return marks[-1] if marks else ""


Work = Callable[[Replica, threading.Event], None]


def _idle(replica: Replica, stop: threading.Event) -> None:
    stop.wait()


class Cluster:
    def __init__(self, redis_url: str, name: str) -> None:
        self.redis_url = redis_url
        self.name = name
        self.replicas: list[Replica] = []

    def add(self, identity: str, work: Work = _idle, release_on_cancel: bool = True,
            start: bool = True) -> Replica:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2.0,
                                      socket_connect_timeout=2.0)
        lock = RedisLock(client, name=self.name, identity=identity)
        holder: list[Replica] = []

        def started(stop: threading.Event) -> None:
            replica = holder[0]
            replica.events.append(("started", time.monotonic()))
            work(replica, stop)
            replica.events.append(("work_returned", time.monotonic()))

        def stopped() -> None:
            holder[0].events.append(("stopped", time.monotonic()))

        def new_leader(identity: str) -> None:
            holder[0].new_leaders.append(identity)

        config = LeaderElectionConfig(
            lock=lock, callbacks=LeaderCallbacks(started, stopped, new_leader),
            lease_duration=LEASE, renew_deadline=RENEW, retry_period=RETRY,
            release_on_cancel=release_on_cancel, name=self.name,
        )
        replica = Replica(identity, LeaderElector(config), client)
        holder.append(replica)
        self.replicas.append(replica)
        if start:
            self.start(replica)
        return replica

    def start(self, replica: Replica) -> None:
        replica.thread = threading.Thread(target=replica.elector.run, args=(replica.stop,),
                                          name=f"elector-{replica.identity}", daemon=True)
        replica.thread.start()

    def leaders(self) -> list[Replica]:
        return [r for r in self.replicas if r.elector.is_leader()]

    def wait_for_leader(self, timeout: float, among: list[Replica] | None = None) -> Replica:
        candidates = among if among is not None else self.replicas
        found: list[Replica] = []

        def one() -> bool:
            leaders = [r for r in candidates if r.elector.is_leader()]
            found[:] = leaders
            # ...and its on_started_leading has run (it starts just after is_leader()).
            return len(leaders) == 1 and leaders[0].leading_marker() == "started"

        wait_until(one, timeout, message=f"exactly one leader among "
                   f"{[r.identity for r in candidates]}")
        return found[0]

    def settle(self, leader: Replica, timeout: float = 5.0) -> None:
        """Wait until every replica has seen ``leader`` and listens on pub/sub."""
        lock = leader.elector.lock
        assert isinstance(lock, RedisLock)

        def settled() -> bool:
            subscribers = leader.client.pubsub_numsub(lock.channel)[0][1]
            return subscribers == len(self.replicas) and all(
                r.elector.get_leader() == leader.identity for r in self.replicas)

        wait_until(settled, timeout, message="replicas settled on the leader")

    def stored_holder(self) -> str | None:
        record = self.replicas[0].elector.lock.get().record
        return record.holder_identity if record else None

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.elector.stop()
        for replica in self.replicas:
            if replica.thread is not None:
                replica.thread.join(RENEW + 3.0)
        alive = [r.identity for r in self.replicas if r.thread and r.thread.is_alive()]
        for replica in self.replicas:
            replica.client.close()
        assert not alive, f"elector threads still running: {alive}"


def assert_alternating(replica: Replica) -> None:
    """on_stopped_leading exactly once per leadership, in order."""
    names = [n for n in replica.names() if n in ("started", "stopped")]
    assert names == ["started", "stopped"] * (len(names) // 2), (replica.identity, names)


@pytest.fixture
def cluster(redis_url: str, election_name: str) -> Iterator[Cluster]:
    c = Cluster(redis_url, election_name)
    try:
        yield c
    finally:
        c.shutdown()
    for replica in c.replicas:
        assert_alternating(replica)


def test_three_electors_exactly_one_leads(cluster: Cluster) -> None:
    replicas = [cluster.add(f"r{i}") for i in range(3)]
    leader = cluster.wait_for_leader(5.0)
    version = cluster.replicas[0].elector.lock.get().record
    assert version is not None

    def one_stable_leader() -> None:
        assert cluster.leaders() == [leader]

    # Several leases long: the leader keeps renewing, nobody else takes over.
    observe(2 * LEASE, one_stable_leader)
    assert cluster.stored_holder() == leader.identity
    later = cluster.replicas[0].elector.lock.get().record
    assert later is not None and later.term == version.term and later.version > version.version
    assert sum(r.count("started") for r in replicas) == 1
    for r in replicas:
        assert r.elector.get_leader() == leader.identity
        assert leader.identity in r.new_leaders


def test_two_electors_with_one_identity_one_leads_the_other_follows(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    # A copy-pasted identity: both must not lead, not even in turns.
    first, second = cluster.add("same"), cluster.add("same")
    leaders_seen: set[int] = set()

    def at_most_one_and_always_the_same() -> None:
        leading = cluster.leaders()
        assert len(leading) <= 1, "both electors believe they lead"
        leaders_seen.update(id(r) for r in leading)
        assert len(leaders_seen) <= 1, "leadership moved between the two"

    # From start-up on, for five leases (25 retry periods).
    observe(5 * LEASE, at_most_one_and_always_the_same)
    leader = cluster.wait_for_leader(1.0)
    follower = second if leader is first else first
    assert leader.count("started") == 1 and follower.count("started") == 0
    wait_until(lambda: "in use by another running elector" in caplog.text, 2 * LEASE,
               message="the duplicate-identity warning")
    warnings = [r.getMessage() for r in caplog.records
                if "in use by another running elector" in r.getMessage()]
    assert len(warnings) == 1 and "'same'" in warnings[0], warnings
    # Callbacks and get_leader() speak of the configured identity.
    assert leader.new_leaders == ["same"] and follower.new_leaders == ["same"]
    assert follower.elector.get_leader() == "same" and cluster.stored_holder() == "same"

    # The follower is a real follower: it takes over when the leader stops.
    term = leader.elector.term
    leader.elector.stop()
    new = cluster.wait_for_leader(LEASE + 1.0, among=[follower])
    assert new.elector.term > term and follower.new_leaders == ["same", "same"]


def test_each_leadership_change_is_logged_once(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    only = cluster.add("solo")
    cluster.wait_for_leader(5.0)
    only.elector.stop()
    assert only.thread is not None
    only.thread.join(RENEW + 3.0)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("celery_leader")]
    became = [line for line in lines if "became leader" in line]
    assert len(became) == 1, lines
    assert became[0].startswith(f"leader election {cluster.name}: solo became leader (term ")
    ended = [line for line in lines if "stopped leading" in line or "released" in line]
    assert len(ended) == 1, lines


def test_graceful_stop_with_release_on_cancel_hands_over_quickly(cluster: Cluster) -> None:
    for i in range(3):
        cluster.add(f"r{i}")
    old = cluster.wait_for_leader(5.0)
    cluster.settle(old)
    old_term = old.elector.term
    stopped_at = time.monotonic()
    old.elector.stop()
    others = [r for r in cluster.replicas if r is not old]
    new = cluster.wait_for_leader(0.5, among=others)
    took = time.monotonic() - stopped_at
    assert took < 0.5, took
    assert new.elector.term > old_term
    assert old.thread is not None
    old.thread.join(2.0)
    assert not old.thread.is_alive()
    assert not old.elector.is_leader()
    assert old.names()[-2:] == ["work_returned", "stopped"]
    # The old leader stopped acting before the new one started.
    assert old.last("stopped") <= new.last("started")


def test_release_waits_for_on_started_leading_to_return(cluster: Cluster) -> None:
    stop_seen = threading.Event()
    finish = threading.Event()

    def stubborn(replica: Replica, stop: threading.Event) -> None:
        stop.wait()
        stop_seen.set()
        finish.wait(10.0)  # still flushing its work after being told to stop

    try:
        first = cluster.add("first", work=stubborn)
        cluster.wait_for_leader(5.0)
        assert first.elector.is_leader()
        followers = [cluster.add(f"f{i}") for i in range(2)]
        cluster.settle(first)

        first.elector.stop()
        wait_until(stop_seen.is_set, 2.0, message="work told to stop")

        def still_first() -> None:
            assert not any(f.elector.is_leader() for f in followers)
            assert cluster.stored_holder() == "first"
            assert first.count("stopped") == 0

        observe(RENEW - 0.2, still_first)  # the lease is held while the work runs
        finish.set()
        new = cluster.wait_for_leader(0.5, among=followers)
        assert first.names()[-2:] == ["work_returned", "stopped"]
        assert first.last("work_returned") <= first.last("stopped") <= new.last("started")
    finally:
        finish.set()


def test_release_waits_at_most_renew_deadline(cluster: Cluster) -> None:
    stop_seen = threading.Event()
    finish = threading.Event()
    stop_time: list[float] = []

    def wedged(replica: Replica, stop: threading.Event) -> None:
        stop.wait()
        stop_time.append(time.monotonic())
        stop_seen.set()
        finish.wait(10.0)  # ignores the stop request

    try:
        first = cluster.add("first", work=wedged)
        cluster.wait_for_leader(5.0)
        followers = [cluster.add(f"f{i}") for i in range(2)]
        cluster.settle(first)
        first.elector.stop()
        wait_until(stop_seen.is_set, 2.0)
        new = cluster.wait_for_leader(RENEW + 1.0, among=followers)
        waited = new.last("started") - stop_time[0]
        assert RENEW - 0.1 <= waited <= RENEW + 0.5, waited
        assert first.count("stopped") == 1
        assert first.last("stopped") <= new.last("started")
        assert first.count("work_returned") == 0  # released without it, as documented
    finally:
        finish.set()


def test_exception_in_on_started_leading_steps_down_and_keeps_contending(
        cluster: Cluster) -> None:
    go = threading.Event()
    runs: list[int] = []

    def fails_once(replica: Replica, stop: threading.Event) -> None:
        runs.append(1)
        if len(runs) == 1:
            go.wait(5.0)
            raise RuntimeError("scheduler crashed")
        stop.wait()

    a = cluster.add("a", work=fails_once)
    cluster.wait_for_leader(5.0)
    b = cluster.add("b")
    cluster.settle(a)
    go.set()
    wait_until(lambda: a.count("stopped") == 1, 2.0, message="a stepped down")
    new = cluster.wait_for_leader(RETRY + 1.0)
    assert new is b, "the failing leader retook the lease instead of letting b lead"
    assert a.count("work_returned") == 0
    assert a.thread is not None and a.thread.is_alive()  # still contending

    b.elector.stop()  # b hands over: a contends and leads again
    wait_until(lambda: a.elector.is_leader(), 2.0, message="a leads again")
    wait_until(lambda: len(runs) == 2, 2.0)
    assert a.names()[:2] == ["started", "stopped"]
    assert a.names()[2] == "started"


def test_step_down_hands_over_and_keeps_contending(cluster: Cluster) -> None:
    replicas = [cluster.add(f"r{i}") for i in range(3)]
    old = cluster.wait_for_leader(5.0)
    cluster.settle(old)
    old_term = old.elector.term
    old.elector.step_down()
    others = [r for r in replicas if r is not old]
    new = cluster.wait_for_leader(RETRY + 0.5, among=others)
    assert not old.elector.is_leader()
    assert new.elector.term > old_term
    assert old.count("stopped") == 1
    assert old.last("stopped") <= new.last("started")
    assert old.thread is not None and old.thread.is_alive()
    wait_until(lambda: old.elector.get_leader() == new.identity, 2.0)

    # step_down() on a follower is a no-op.
    before = old.names()
    old.elector.step_down()
    observe(2 * RETRY, lambda: None)
    assert old.names() == before
    assert cluster.leaders() == [new]


def test_on_stopped_leading_once_per_leadership_when_the_lease_is_lost(
        cluster: Cluster, redis_client: redis.Redis) -> None:
    a = cluster.add("a")
    cluster.wait_for_leader(5.0)
    lock = a.elector.lock
    assert isinstance(lock, RedisLock)
    terms = [a.elector.term]
    for _ in range(3):
        # Someone else overwrites the lease: a's next renew hits a conflict.
        started = a.count("started")
        redis_client.delete(lock.lease_key)
        wait_until(lambda n=started: a.count("started") == n + 1 and a.elector.is_leader(),
                   RETRY + LEASE + 1.0, message="a loses and regains the lease")
        terms.append(a.elector.term)
    assert terms == sorted(set(terms)), terms
    assert a.names().count("stopped") == 3
    assert a.elector.last_stop_reason == "lease lost"


def test_stop_without_release_keeps_the_lease_until_it_expires(cluster: Cluster) -> None:
    a = cluster.add("a", release_on_cancel=False)
    cluster.wait_for_leader(5.0)
    b = cluster.add("b")
    wait_until(lambda: b.elector.get_leader() == "a", 5.0)
    stopped_at = time.monotonic()
    a.elector.stop()
    wait_until(lambda: a.count("stopped") == 1, 2.0)
    assert not a.elector.is_leader()
    assert cluster.stored_holder() == "a"  # not released
    cluster.wait_for_leader(LEASE + 2.2 * RETRY + 0.5, among=[b])
    assert time.monotonic() - stopped_at >= LEASE - RETRY - 0.1
