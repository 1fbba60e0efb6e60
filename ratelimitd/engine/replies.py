"""Script replies decoded by name: each decoder reads one documented reply layout.

The layouts are written in the scripts' headers (decide.lua, report.lua); a change
of one touches its decoder here and nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ratelimitd.engine.limits import Dimension
from ratelimitd.engine.outcomes import BucketState, Decision, Outcome, Scope

# decide.lua's reply, 0-based: the fixed head, then the buckets, then each item's buckets.
_OUTCOME, _PROJECT, _RETRY_AFTER_MS, _BINDING, _REPLAYED, _DETAIL, _NBUCKETS = range(7)
_BUCKETS = 7  # where the first bucket starts
_BUCKET_WIDTH = 5  # scope, dimension index (1-based), limit, remaining, milliseconds until full
_SHADOW_SCOPE = 2  # added to a shadow limit's bucket's scope


# A bucket's scope code -> (scope, shadow), and an outcome code -> Outcome: lookups, where calling the
# enum classes would cost a Python-level call per bucket on every decision.
_SCOPES = {
    int(scope) + extra: (scope, bool(extra)) for scope in Scope for extra in (0, _SHADOW_SCOPE)
}  # fmt: skip
_OUTCOMES = {int(o): o for o in Outcome}
# tuple's own constructor, from C: the NamedTuples' generated __new__ is a Python call per object,
# on every bucket of every decision. The tuples given must have every field, in order.
_new_bucket: Callable[[tuple[Any, ...]], BucketState] = functools.partial(tuple.__new__, BucketState)
_new_decision: Callable[[tuple[Any, ...]], Decision] = functools.partial(tuple.__new__, Decision)


def decode_decision(
    reply: Sequence[Any], dimensions: Sequence[Dimension], org_id: str, request_id: str, nitems: int
) -> Decision:
    """decide.lua's reply as a Decision (``dimensions`` in the script's order)."""
    end = _BUCKETS + _BUCKET_WIDTH * int(reply[_NBUCKETS])
    fields = iter(reply[_BUCKETS:end])
    decoded = []
    for scope_code, dimension, limit, remaining, reset_ms in zip(fields, fields, fields, fields, fields, strict=True):
        scope, shadow = _SCOPES[int(scope_code)]
        decoded.append(
            _new_bucket((scope, dimensions[int(dimension) - 1], int(limit), int(remaining), int(reset_ms), shadow))
        )
    buckets = tuple(decoded)
    outcome, detail = _outcome(reply[_OUTCOME]), int(reply[_DETAIL])
    binding_index = int(reply[_BINDING])
    binding = buckets[binding_index - 1] if binding_index else None
    # an admitted decision's binding and detail name what a shadow limit would have answered
    shadow_refused = outcome is Outcome.ALLOWED and detail != 0
    item_buckets = _item_buckets(reply, end, buckets, nitems)
    project_id, replayed = str(reply[_PROJECT]), bool(int(reply[_REPLAYED]))
    retry_after_ms = int(reply[_RETRY_AFTER_MS])
    refusal: tuple[Outcome, BucketState | None, int] = (Outcome.ALLOWED, None, 0)
    if shadow_refused:  # the binding, detail and wait are the shadow refusal's
        refusal = (_outcome(detail), binding, retry_after_ms)
        retry_after_ms, binding, detail = 0, None, 0
    return _new_decision((outcome, org_id, project_id, request_id, retry_after_ms, binding, buckets, replayed,
                          item_buckets, detail, *refusal))  # fmt: skip


def _outcome(code: Any) -> Outcome:
    try:
        return _OUTCOMES[int(code)]
    except KeyError:
        raise ValueError(f"{code!r} is not a valid Outcome") from None


def _item_buckets(
    reply: Sequence[Any], pos: int, buckets: tuple[BucketState, ...], nitems: int
) -> tuple[tuple[BucketState, ...], ...]:
    """After the buckets, per item: k, then the 1-based indices of its k buckets (absent on
    an early refusal)."""
    if nitems == 1 and pos < len(reply) and int(reply[pos]) == len(buckets) and _in_order(reply, pos, len(buckets)):
        return (buckets,)  # one item with every bucket, in order (the usual decision): nothing to pick
    found = []
    for _ in range(nitems if pos < len(reply) else 0):
        count = int(reply[pos])
        found.append(tuple([buckets[int(i) - 1] for i in reply[pos + 1 : pos + 1 + count]]))
        pos += 1 + count
    return tuple(found)


def _in_order(reply: Sequence[Any], pos: int, n: int) -> bool:
    """Whether the n indices after ``reply[pos]`` are 1..n (compared as the integers they are;
    any other form takes the general path)."""
    return list(reply[pos + 1 : pos + 1 + n]) == list(range(1, n + 1))


class ReportReply(NamedTuple):
    """report.lua's reply: {status, project, model, tokens counted, token delta, spend}."""

    status: int  # report.lua's status codes (see its header)
    project_id: str
    model: str  # status 8: the name of the counter that would overflow
    counted_tokens: int
    token_delta: int
    spend_usd: float


def decode_report(reply: Sequence[Any]) -> ReportReply:
    status, project, model, counted, delta, spend_micro = reply
    return ReportReply(int(status), str(project), str(model), int(counted), int(delta), float(spend_micro) / 1e6)
