"""Script replies decoded by name: each decoder reads one documented reply layout.

The layouts are written in the scripts' headers (decide.lua, report.lua); a change
of one touches its decoder here and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from ratelimitd.engine.limits import Dimension
from ratelimitd.engine.outcomes import BucketState, Decision, Outcome, Scope

# decide.lua's reply, 0-based: the fixed head, then the buckets, then each item's buckets.
_OUTCOME, _PROJECT, _RETRY_AFTER_MS, _BINDING, _REPLAYED, _DETAIL, _NBUCKETS = range(7)
_BUCKETS = 7  # where the first bucket starts
_BUCKET_WIDTH = 5  # scope, dimension index (1-based), limit, remaining, milliseconds until full


def decode_decision(
    reply: Sequence[Any], dimensions: Sequence[Dimension], org_id: str, request_id: str, nitems: int
) -> Decision:
    """decide.lua's reply as a Decision (``dimensions`` in the script's order)."""
    end = _BUCKETS + _BUCKET_WIDTH * int(reply[_NBUCKETS])
    buckets = tuple(
        BucketState(
            Scope(int(reply[i])), dimensions[int(reply[i + 1]) - 1], int(reply[i + 2]), int(reply[i + 3]),
            int(reply[i + 4]),
        )
        for i in range(_BUCKETS, end, _BUCKET_WIDTH)
    )  # fmt: skip
    binding_index = int(reply[_BINDING])
    return Decision(
        outcome=Outcome(int(reply[_OUTCOME])),
        organization_id=org_id,
        project_id=str(reply[_PROJECT]),
        request_id=request_id,
        retry_after_ms=int(reply[_RETRY_AFTER_MS]),
        binding=buckets[binding_index - 1] if binding_index else None,
        buckets=buckets,
        replayed=bool(int(reply[_REPLAYED])),
        item_buckets=_item_buckets(reply, end, buckets, nitems),
        detail=int(reply[_DETAIL]),
    )


def _item_buckets(
    reply: Sequence[Any], pos: int, buckets: tuple[BucketState, ...], nitems: int
) -> tuple[tuple[BucketState, ...], ...]:
    """After the buckets, per item: k, then the 1-based indices of its k buckets (absent on
    an early refusal)."""
    found = []
    for _ in range(nitems if pos < len(reply) else 0):
        count = int(reply[pos])
        found.append(tuple(buckets[int(i) - 1] for i in reply[pos + 1 : pos + 1 + count]))
        pos += 1 + count
    return tuple(found)


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
