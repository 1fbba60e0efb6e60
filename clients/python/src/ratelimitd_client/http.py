"""A decision as the HTTP answer an LLM API gives (docs/api.md "Refusal reasons").

The statuses, error types and codes are the server's own table (ratelimitd/engine/outcomes.py),
so a platform answers the same whether Envoy or this client stands at its edge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ratelimitd_client._gen import ratelimit_pb2

Reason = ratelimit_pb2.Reason
_REQUEST_ERROR = "invalid_request_error"
_JSON = {"content-type": "application/json"}

# reason -> (HTTP status, error code); limit refusals name the refused metric as their type.
REFUSALS: dict[ratelimit_pb2.Reason.ValueType, tuple[int, str]] = {
    Reason.REASON_PROJECT_LIMIT: (429, "rate_limit_exceeded"),
    Reason.REASON_ORGANIZATION_LIMIT: (429, "rate_limit_exceeded"),
    Reason.REASON_REQUEST_TOO_LARGE: (413, "request_too_large"),
    Reason.REASON_INVALID_API_KEY: (401, "invalid_api_key"),
    Reason.REASON_MODEL_NOT_AVAILABLE: (404, "model_not_found"),
    Reason.REASON_MODEL_BLOCKED: (403, "model_blocked"),
    Reason.REASON_SPEND_LIMIT: (400, "blocked_api_access"),
    Reason.REASON_REQUEST_ID_REUSED: (409, "request_id_reused"),
    Reason.REASON_STORAGE_UNAVAILABLE: (503, "service_unavailable"),
}
_METRIC_TYPED = {Reason.REASON_PROJECT_LIMIT, Reason.REASON_ORGANIZATION_LIMIT, Reason.REASON_REQUEST_TOO_LARGE}


@dataclass(frozen=True)
class HttpAnswer:
    """What the edge sends: ``status`` 200 means "go on and serve the request" (with ``headers``)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def missing_api_key() -> HttpAnswer:
    message = "No API key provided. Send it in the Authorization header: `Authorization: Bearer YOUR_API_KEY`."
    return HttpAnswer(
        401, {"content-type": "application/json"}, _error_body(message, _REQUEST_ERROR, "invalid_api_key")
    )


def unreachable(message: str) -> HttpAnswer:
    """The fail-closed answer when ratelimitd could not be asked."""
    return HttpAnswer(
        503, {"content-type": "application/json"}, _error_body(message, "server_error", "service_unavailable")
    )


def answer(response: ratelimit_pb2.CheckResponse) -> HttpAnswer:
    """200 with the x-ratelimit-* headers when admitted, else the refusal's status, headers and body."""
    headers = dict(response.headers)
    if response.allowed:
        return HttpAnswer(200, headers)
    status, code = REFUSALS.get(response.reason, (503, "service_unavailable"))
    error_type = response.binding.metric if response.reason in _METRIC_TYPED else _REQUEST_ERROR
    headers["content-type"] = "application/json"
    return HttpAnswer(status, headers, _error_body(response.message, error_type, code))


def _error_body(message: str, error_type: str, code: str) -> bytes:
    error = {"message": message, "type": error_type, "code": code}
    return json.dumps({"error": error}, separators=(",", ":")).encode()
