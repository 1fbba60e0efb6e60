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

A metric without any limit has no headers.
"""

from __future__ import annotations

from collections.abc import Mapping

from ratelimitd.engine.outcomes import BucketState, Decision, go_duration


def tightest(buckets: tuple[BucketState, ...], metric: str, window: str) -> BucketState | None:
    best: BucketState | None = None
    for b in buckets:
        if b.dimension.metric == metric and b.dimension.window == window:
            if best is None or (b.remaining, b.limit) < (best.remaining, best.limit):
                best = b
    return best


def rate_limit_headers(decision: Decision, header_windows: Mapping[str, str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for metric, window in header_windows.items():
        b = tightest(decision.buckets, metric, window)
        if b is not None:
            headers[f"x-ratelimit-limit-{metric}"] = str(b.limit)
            headers[f"x-ratelimit-remaining-{metric}"] = str(b.remaining)
            headers[f"x-ratelimit-reset-{metric}"] = go_duration(b.reset_after_ms)
    if decision.retryable:  # the outcome table's header policy
        headers["retry-after"] = str(max(1, -(-decision.retry_after_ms // 1000)))
    return headers
