"""What a decision request may ask for: the rules every surface (CheckAndConsume, its
stream, Envoy's ShouldRateLimit, ReportUsage) applies before the engine decides."""

from __future__ import annotations

import re

from ratelimitd.core.errors import InvalidArgument
from ratelimitd.engine.limits import MAX_LIMIT

MAX_REQUESTS = 1_000_000
MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]+$")


def validate_costs(requests: int, tokens: int) -> tuple[int, int]:
    """Request-level cost rules: 0 requests means 1; negative or absurd counts are errors."""
    if requests < 0:
        raise InvalidArgument(f"requests is {requests}; it must be 0 (meaning 1) or more")
    if requests > MAX_REQUESTS:
        raise InvalidArgument(f"requests is {requests}; at most {MAX_REQUESTS} are allowed in one call")
    if tokens < 0:
        raise InvalidArgument(f"tokens is {tokens}; it must be 0 or more")
    if tokens > MAX_LIMIT:
        raise InvalidArgument(f"tokens is {tokens}; at most {MAX_LIMIT} are allowed in one call")
    return requests or 1, tokens


def validate_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(
            f"request_id is {len(request_id)} characters long, at most {MAX_REQUEST_ID_LENGTH} are allowed"
        )
    if request_id and not _REQUEST_ID_RE.match(request_id):
        raise InvalidArgument("request_id may only contain printable ASCII characters without spaces")
    return request_id
