"""Prometheus metrics: what operators watch.

    ratelimitd_decisions_total{outcome}      every CheckAndConsume and Envoy ShouldRateLimit decision, by outcome
    ratelimitd_usage_reports_total{result}   every ReportUsage and Envoy usage call, by result
    ratelimitd_storage_errors_total          calls that found storage unreachable
    ratelimitd_storage_up                    1 while storage answers (0 in any worker: 0)
    ratelimitd_decision_seconds{api}         time to decide, storage round trip included (histogram)

Served over HTTP at ``--metrics-listen`` (off by default). With ``--workers``
the supervisor serves the sum over its workers (prometheus_client's
multiprocess mode, through PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

from ratelimitd.engine.outcomes import Outcome
from ratelimitd.engine.usage import ReportResult

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self._server: Any = None

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
