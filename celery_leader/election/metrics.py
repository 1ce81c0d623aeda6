"""Leader-election metrics: a no-op by default, Prometheus when asked for.

client-go keeps a process-wide metrics provider; so do we, so the elector never
imports prometheus_client (an optional extra).
"""

from __future__ import annotations

from typing import Any, Protocol


class MetricsProvider(Protocol):
    def set_leader(self, name: str, leading: bool) -> None: ...


class NoopMetrics:
    def set_leader(self, name: str, leading: bool) -> None:
        pass


class PrometheusMetrics:
    """``celery_leader_is_leader{name}`` gauge and ``celery_leader_transitions_total{name}``."""

    def __init__(self, registry: Any = None) -> None:
        try:
            from prometheus_client import REGISTRY, Counter, Gauge
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise RuntimeError(
                "prometheus metrics need the 'metrics' extra: pip install celery-leader[metrics]"
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
