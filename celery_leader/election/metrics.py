"""Metrics: plain counters the layers keep, rendered for Prometheus at scrape time.

The elector and the schedule runner only bump integers and fill fixed histogram
buckets (no locks, no label look-ups, no prometheus_client): the cost on the
hot paths is a few attribute writes.  A scrape turns them into metric families
(:class:`Family`), and :func:`render` formats those with prometheus_client, an
optional extra imported only there.

The older process-wide provider (``enable_prometheus()``, client-go's metrics
provider) is kept for existing callers.
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

METRICS_EXTRA_MISSING = (
    "celery-leader metrics need prometheus_client, which is not installed: "
    "pip install prometheus-client (or reinstall celery-leader with its metrics extra: "
    "pip install '/path/to/celery-leader[metrics]' from a checkout), then restart "
    "this process\n")

# Seconds; a renew is one Redis round trip (ms), a lateness a loop wake-up (ms to s).
RENEW_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0)


class Histogram:
    """Fixed buckets; one writer thread (observations are not locked)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs, ``+Inf`` last, as Prometheus wants them."""
        counts = list(self.counts)
        running, pairs = 0, []
        for bound, count in zip((*map(_le, self.bounds), "+Inf"), counts, strict=True):
            running += count
            pairs.append((bound, float(running)))
        return pairs


def _le(bound: float) -> str:
    return repr(float(bound))


@dataclass
class Family:
    """One metric family: ``samples`` map label values (in ``labels`` order) to a
    value, or for a histogram to the Histogram itself."""

    name: str
    kind: str  # "gauge", "counter" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    samples: dict[tuple[str, ...], Any] = field(default_factory=dict)


Collect = Callable[[], Iterable[Family]]


def render(collectors: Iterable[Collect]) -> bytes:
    """The Prometheus text format of every family the collectors return.

    Raises ImportError when prometheus_client (the ``metrics`` extra) is missing.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector

    families = [family for collect in collectors for family in collect()]

    # A Collector by name: prometheus-client 0.17 types it as an ABC, later ones as a
    # Protocol, and register() wants one.
    class _Snapshot(Collector):
        def collect(self) -> Iterable[Any]:
            for family in families:
                labels = list(family.labels)
                if family.kind == "counter":
                    metric: Any = CounterMetricFamily(family.name, family.help, labels=labels)
                    for values, value in family.samples.items():
                        metric.add_metric(list(values), value)
                elif family.kind == "histogram":
                    metric = HistogramMetricFamily(family.name, family.help, labels=labels)
                    for values, hist in family.samples.items():
                        metric.add_metric(list(values), hist.cumulative(), hist.sum)
                else:
                    metric = GaugeMetricFamily(family.name, family.help, labels=labels)
                    for values, value in family.samples.items():
                        metric.add_metric(list(values), value)
                yield metric

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return bytes(generate_latest(registry))


# Why a leadership ended, as ``_end`` names it -> the ``reason`` label.
STOP_REASONS = {"stopped": "stopped", "released": "released", "lease lost": "lease_lost",
                "renew deadline exceeded": "renew_deadline_exceeded"}
ACQUIRED = "acquired"


@dataclass(frozen=True)
class Transition:
    """One change this replica saw: it started or stopped leading, or another
    holder appeared.  ``at`` is wall-clock seconds."""

    at: float
    event: str  # "started_leading", "stopped_leading" or "new_leader"
    identity: str
    term: int
    reason: str = ""


class ElectionStats:
    """What one elector counts; read by :func:`election_families` and the status page."""

    def __init__(self, recent: int = 20) -> None:
        # Every known reason at 0 from start-up: increase() over a series that
        # starts absent and then reads 1 gives 0, hiding a replica's first leadership.
        self.transitions: dict[str, int] = dict.fromkeys((ACQUIRED, *STOP_REASONS.values()), 0)
        self.renew_seconds = Histogram(RENEW_BUCKETS)
        self.renew_failures = 0
        self.lock_errors: dict[str, int] = {}
        self.credentials_refused = False  # the last lock call: Redis refused our credentials
        self.recent: collections.deque[Transition] = collections.deque(maxlen=recent)
        self.leading_since = 0.0  # wall clock; 0 while not leading

    def started(self, identity: str, term: int) -> None:
        self.transitions[ACQUIRED] = self.transitions.get(ACQUIRED, 0) + 1
        self.leading_since = time.time()
        self.recent.append(Transition(self.leading_since, "started_leading", identity, term))

    def stopped(self, identity: str, term: int, reason: str) -> None:
        label = STOP_REASONS.get(reason, reason.replace(" ", "_"))
        self.transitions[label] = self.transitions.get(label, 0) + 1
        self.leading_since = 0.0
        self.recent.append(Transition(time.time(), "stopped_leading", identity, term, reason))

    def new_holder(self, identity: str, term: int) -> None:
        self.recent.append(Transition(time.time(), "new_leader", identity, term))

    def lock_error(self, exc: BaseException) -> None:
        kind = type(exc).__name__  # bounded: the exception classes the client raises
        self.lock_errors[kind] = self.lock_errors.get(kind, 0) + 1


class ElectionView(Protocol):
    """What election_families reads from an elector (LeaderElector is one)."""

    stats: ElectionStats

    def is_leader(self) -> bool: ...
    def observed_term(self) -> int: ...
    def get_leader(self) -> str: ...
    def lease_remaining(self) -> float: ...


def election_families(name: str, elector: ElectionView) -> list[Family]:
    stats = elector.stats
    key = (name,)
    holder = elector.get_leader()
    return [
        Family("celery_leader_is_leader", "gauge", "1 while this replica leads the election",
               ("name",), {key: 1.0 if elector.is_leader() else 0.0}),
        Family("celery_leader_term", "gauge",
               "The election's current fencing term, as this replica last saw it",
               ("name",), {key: float(elector.observed_term())}),
        Family("celery_leader_transitions_total", "counter",
               "Times this replica started (reason=acquired) or stopped leading, by reason",
               ("name", "reason"),
               {(name, reason): float(n) for reason, n in sorted(stats.transitions.items())}),
        Family("celery_leader_lease_remaining_seconds", "gauge",
               "Seconds until the lease this replica last saw expires unless renewed",
               ("name",), {key: elector.lease_remaining()}),
        Family("celery_leader_renew_duration_seconds", "histogram",
               "Round trip of the leader's lease renewals (one Redis script call)",
               ("name",), {key: stats.renew_seconds}),
        Family("celery_leader_renew_failures_total", "counter",
               "Renewals by the leader that failed (error or lost lease)",
               ("name",), {key: float(stats.renew_failures)}),
        Family("celery_leader_lock_errors_total", "counter",
               "Lock calls that raised, by exception class (Redis down, timeouts, ...)",
               ("name", "kind"),
               {(name, kind): float(n) for kind, n in sorted(stats.lock_errors.items())}),
        Family("celery_leader_lock_credentials_refused", "gauge",
               "1 while Redis refuses this replica's credentials for the lock (WRONGPASS, "
               "NOAUTH, NOPERM)", ("name",), {key: 1.0 if stats.credentials_refused else 0.0}),
        Family("celery_leader_observed_holder_info", "gauge",
               "1 for the holder this replica last saw in the lease",
               ("name", "holder"), {(name, holder): 1.0} if holder else {}),
    ]


# -- the older process-wide provider (kept for existing callers) ------------


class MetricsProvider(Protocol):
    def set_leader(self, name: str, leading: bool) -> None: ...


class NoopMetrics:
    def set_leader(self, name: str, leading: bool) -> None:
        pass


class PrometheusMetrics:
    """``celery_leader_is_leader{name}`` gauge and ``celery_leader_transitions_total{name}``
    in a registry of yours (the default one unless given); ``GET /metrics`` on the
    health port serves the complete set without this."""

    def __init__(self, registry: Any = None) -> None:
        try:
            from prometheus_client import REGISTRY, Counter, Gauge
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise RuntimeError(
                "prometheus metrics need prometheus_client: pip install prometheus-client "
                "(or pip install '/path/to/celery-leader[metrics]' from a checkout)"
            ) from exc
        registry = REGISTRY if registry is None else registry
        self.is_leader = Gauge("celery_leader_is_leader",
                               "1 while this replica leads the election", ["name"],
                               registry=registry)
        self.transitions = Counter("celery_leader_transitions",
                                   "Times this replica started leading", ["name"],
                                   registry=registry)

    def set_leader(self, name: str, leading: bool) -> None:
        self.is_leader.labels(name=name).set(1 if leading else 0)
        if leading:
            self.transitions.labels(name=name).inc()


provider: MetricsProvider = NoopMetrics()


def set_provider(new_provider: MetricsProvider) -> None:
    global provider
    provider = new_provider


def enable_prometheus(registry: Any = None) -> PrometheusMetrics:
    """Export leader metrics through prometheus_client (the ``metrics`` extra)."""
    prometheus = PrometheusMetrics(registry)
    set_provider(prometheus)
    return prometheus
