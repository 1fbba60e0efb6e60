"""HTTP response headers in the style LLM APIs use (OpenAI, Groq).

For each metric one window is reported (by default requests per day and
tokens per minute, as those APIs do), taken from the evaluated bucket with the
least remaining, since that is the one a client runs into first:

    x-ratelimit-limit-requests      the limit of that bucket
    x-ratelimit-remaining-requests  whole requests left after this decision
    x-ratelimit-reset-requests      time until that bucket is full again
                                    (Go duration, e.g. "2m59.56s")
    ...-tokens                      the same for tokens
    retry-after                     whole seconds, rounded up; only on a
                                    refusal that waiting can cure (engine/outcomes.py)
    x-ratelimit-shadow              only when a shadow limit would have refused an
                                    admitted request: "<reason>; scope=<scope>;
                                    metric=<metric>; window=<window>; limit=<limit>"

Shadow limits' buckets are left out of the x-ratelimit-* headers: a shadow limit
must not change what a client sees, except through x-ratelimit-shadow.

A metric without any limit has no headers.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from ratelimitd.engine.outcomes import OUTCOMES, BucketState, Decision, Outcome, go_duration


def tightest(buckets: tuple[BucketState, ...], metric: str, window: str) -> BucketState | None:
    best: BucketState | None = None
    for b in buckets:
        if b.dimension.metric == metric and b.dimension.window == window and not b.shadow:
            if best is None or (b.remaining, b.limit) < (best.remaining, best.limit):
                best = b
    return best


@functools.cache
def _names(metric: str) -> tuple[str, str, str]:
    """A metric's three header names, built once: one per configured metric."""
    return f"x-ratelimit-limit-{metric}", f"x-ratelimit-remaining-{metric}", f"x-ratelimit-reset-{metric}"


def rate_limit_headers(decision: Decision, header_windows: Mapping[str, str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for metric, window in header_windows.items():
        b = tightest(decision.buckets, metric, window)
        if b is not None:
            limit, remaining, reset = _names(metric)
            headers[limit] = str(b.limit)
            headers[remaining] = str(b.remaining)
            headers[reset] = go_duration(b.reset_after_ms)
    if decision.retryable:  # the outcome table's header policy
        headers["retry-after"] = str(max(1, -(-decision.retry_after_ms // 1000)))
    if decision.shadow_binding is not None:
        headers["x-ratelimit-shadow"] = shadow_header(decision.shadow_outcome, decision.shadow_binding)
    return headers


def shadow_header(outcome: Outcome, b: BucketState) -> str:
    return (
        f"{OUTCOMES[outcome].reason}; scope={b.scope.name.lower()}; metric={b.dimension.metric}; "
        f"window={b.dimension.window}; limit={b.limit}"
    )
