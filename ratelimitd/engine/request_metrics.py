"""Latency percentiles and status codes per model over time (GetRequestMetrics).

Computed from the project's request log, where ReportUsage records each admitted
request's status code and latency: the newest ``log_entries`` entries of the project
(settings), so the figures cover those requests and no more. Nothing is added to the
decision or report path: the log is already written, and this only reads it.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import NamedTuple

from ratelimitd.core.errors import InvalidArgument
from ratelimitd.engine.pages import MAX_PAGE_SIZE
from ratelimitd.engine.usage import Usage
from ratelimitd.engine.usage_queries import GRANULARITIES, LogEntry


class RequestMetrics(NamedTuple):
    bucket_start_ms: int
    model: str
    reported: int
    p50_ms: int
    p95_ms: int
    p99_ms: int
    status_codes: dict[int, int]


def _percentile(ordered: list[int], p: int) -> int:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _summary(start_ms: int, model: str, entries: Iterable[LogEntry]) -> RequestMetrics:
    chosen = list(entries)
    ordered = sorted(e.latency_ms for e in chosen)
    statuses = Counter(e.status_code for e in chosen)
    p50, p95, p99 = (_percentile(ordered, p) for p in (50, 95, 99))
    return RequestMetrics(start_ms, model, len(chosen), p50, p95, p99, dict(sorted(statuses.items())))


async def _admitted(usage: Usage, org_id: str, project_id: str, start_ms: int, end_ms: int) -> list[LogEntry]:
    """Every admitted entry of the range: the log is capped (log_entries), so reading it
    page by page ends after a few pages at most."""
    entries: list[LogEntry] = []
    token = ""
    while True:
        chunk, token = await usage.logs(
            org_id,
            project_id,
            allowed=True,
            start_ms=start_ms,
            end_ms=end_ms,
            page_size=MAX_PAGE_SIZE,
            page_token=token,
        )
        entries.extend(chunk)
        if not token:
            return entries


async def request_metrics(
    usage: Usage, org_id: str, project_id: str, start_ms: int, end_ms: int, granularity: str
) -> tuple[list[RequestMetrics], list[RequestMetrics]]:
    """(per bucket and model, oldest first; per model over [start_ms, end_ms))."""
    if granularity not in GRANULARITIES:
        raise InvalidArgument(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if start_ms < 0 or end_ms < 0 or (end_ms and end_ms <= start_ms):
        raise InvalidArgument(
            f"the range [{start_ms}, {end_ms}) ms is empty or negative: end_time must be after start_time"
        )
    width_ms = GRANULARITIES[granularity][1] * 1000
    logged = await _admitted(usage, org_id, project_id, start_ms, end_ms)
    reported = [e for e in logged if e.status_code]  # admitted but not reported yet: nothing to measure
    buckets: defaultdict[tuple[int, str], list[LogEntry]] = defaultdict(list)
    models: defaultdict[str, list[LogEntry]] = defaultdict(list)
    for e in reported:
        buckets[(e.time_ms - e.time_ms % width_ms, e.model)].append(e)
        models[e.model].append(e)
    rows = [_summary(start, model, entries) for (start, model), entries in sorted(buckets.items())]
    totals = [_summary(start_ms, model, entries) for model, entries in sorted(models.items())]
    return rows, totals
