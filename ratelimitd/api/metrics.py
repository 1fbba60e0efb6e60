"""Prometheus metrics: what operators watch.

    ratelimitd_build_info{version,python,grpc}  1; the labels say what runs
    ratelimitd_decisions_total{outcome}      every CheckAndConsume and Envoy ShouldRateLimit decision, by outcome
    ratelimitd_shadow_refusals_total{scope,outcome}  admitted decisions a shadow limit would have refused
    ratelimitd_model_decisions_total{model,outcome}        opt-in (metrics_model_labels), bounded
    ratelimitd_organization_decisions_total{organization,outcome}  opt-in (metrics_organization_labels), bounded
    ratelimitd_usage_reports_total{result}   every ReportUsage and Envoy usage call, by result
    ratelimitd_storage_errors_total          calls that found storage unreachable
    ratelimitd_storage_up                    1 while storage answers (0 in any worker: 0)
    ratelimitd_decision_seconds{api}         time to decide, storage round trip included (histogram)

No ``_created`` series: they double the series count and nothing alerts on them.

Served over HTTP at ``--metrics-listen`` (off by default). With ``--workers``
the supervisor serves the sum over its workers (prometheus_client's
multiprocess mode, through PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
    start_http_server,
)

from ratelimitd import __version__
from ratelimitd.engine.outcomes import Decision, Outcome, Scope
from ratelimitd.engine.usage import ReportResult

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# What a label folds into past its bound, and what stands for an organization not known (a malformed key).
OTHER = "other"
NONE = "none"

disable_created_metrics()  # type: ignore[no-untyped-call]

# Counts one decision by model, organization and outcome; None when neither label is on.
LabelledCount = Callable[[str, str, Outcome], None]


class BoundedLabel:
    """A counter's children by one label whose values callers choose (a model name, an organization):
    the first ``limit`` values seen get a series each, later ones count as "other", so no client can
    grow the scrape without bound. The children are cached: a decision costs two dict lookups."""

    def __init__(self, counter: Counter, limit: int) -> None:
        self._counter = counter
        self._limit = limit
        self._children: dict[tuple[str, Outcome], Any] = {}
        self._values: set[str] = set()

    def inc(self, value: str, outcome: Outcome) -> None:
        child = self._children.get((value, outcome))
        if child is None:
            child = self._child(value, outcome)
        child.inc()

    def _child(self, value: str, outcome: Outcome) -> Any:
        if value not in self._values:
            if len(self._values) >= self._limit:
                value = OTHER  # cached under "other" only: the cache is bounded like the series
            else:
                self._values.add(value)
        key = (value, outcome)
        if key not in self._children:
            self._children[key] = self._counter.labels(value, outcome.name.lower())
        return self._children[key]


class Metrics:
    def __init__(self, model_labels: int = 0, organization_labels: int = 0) -> None:
        """``model_labels``, ``organization_labels``: how many distinct values each opt-in label
        gets a series for (0: that metric is off)."""
        self.registry = CollectorRegistry()
        build = Gauge(
            "ratelimitd_build_info",
            "Always 1; the labels say which ratelimitd, Python and grpcio run",
            ["version", "python", "grpc"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        build.labels(__version__, platform.python_version(), grpc.__version__).set(1)
        decisions = Counter(
            "ratelimitd_decisions",
            "Decisions (CheckAndConsume, ShouldRateLimit) by outcome",
            ["outcome"],
            registry=self.registry,
        )
        reports = Counter(
            "ratelimitd_usage_reports",
            "Usage reports (ReportUsage, Envoy usage calls) by result",
            ["result"],
            registry=self.registry,
        )
        # children bound once: the hot path only increments
        self.decisions = {o: decisions.labels(o.name.lower()) for o in Outcome}
        self.storage_unavailable_decisions = decisions.labels("storage_unavailable")
        shadow = Counter(
            "ratelimitd_shadow_refusals",
            "Admitted decisions a shadow limit would have refused, by the limit's scope and the outcome",
            ["scope", "outcome"],
            registry=self.registry,
        )
        self._shadow = {
            (s, o): shadow.labels(s.name.lower(), o.name.lower())
            for s in Scope
            for o in (Outcome.PROJECT_LIMIT, Outcome.ORGANIZATION_LIMIT, Outcome.TOO_LARGE)
        }
        self.reports = {r: reports.labels(r.name.lower()) for r in ReportResult}
        self.storage_errors = Counter(
            "ratelimitd_storage_errors", "Calls that found storage unreachable", registry=self.registry
        )
        self.storage_up = Gauge(
            "ratelimitd_storage_up", "1 while storage answers", registry=self.registry, multiprocess_mode="livemin"
        )
        seconds = Histogram(
            "ratelimitd_decision_seconds",
            "Time to decide, from a validated request to the engine's answer (one storage round trip)",
            ["api"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.check_seconds = seconds.labels("check_and_consume")
        self.envoy_seconds = seconds.labels("envoy")
        self._by_labels = self._labelled(model_labels, organization_labels)
        self._server: Any = None

    def count_decision(self, decision: Decision, model: str) -> None:
        """One decision of CheckAndConsume or ShouldRateLimit (``model``: the one it is for, or the
        first of several): by outcome, by shadow refusal if any, and by model and organization if on."""
        self.decisions[decision.outcome].inc()
        if decision.shadow_binding is not None:
            self._shadow[decision.shadow_binding.scope, decision.shadow_outcome].inc()
        if self._by_labels is not None:
            self._by_labels(model, decision.organization_id, decision.outcome)

    def _labelled(self, model_labels: int, organization_labels: int) -> LabelledCount | None:
        """The per-model/per-organization count, built once; None (nothing per call) when both are off."""
        by_model = by_org = None
        if model_labels:
            counter = Counter(
                "ratelimitd_model_decisions",
                f"Decisions by model (the first {model_labels} models seen; the rest as model=other) and outcome",
                ["model", "outcome"],
                registry=self.registry,
            )
            by_model = BoundedLabel(counter, model_labels)
        if organization_labels:
            counter = Counter(
                "ratelimitd_organization_decisions",
                f"Decisions by organization (the first {organization_labels} seen; the rest as organization=other) "
                "and outcome",
                ["organization", "outcome"],
                registry=self.registry,
            )
            by_org = BoundedLabel(counter, organization_labels)
        if by_model is None and by_org is None:
            return None

        def count(model: str, org: str, outcome: Outcome) -> None:
            if by_model is not None:
                by_model.inc(model, outcome)
            if by_org is not None:
                by_org.inc(org or NONE, outcome)

        return count

    def serve(self, listen: str) -> int:
        """Starts the HTTP exposition (a thread); returns the port."""
        host, _, port = listen.rpartition(":")
        registry = self.registry
        if os.environ.get(MULTIPROCESS_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        self._server, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
