"""How an HTTP edge answers a refusal, in the shape LLM APIs (OpenAI, Groq) use.

Every refusal becomes one JSON body and one HTTP status::

    {"error": {"message": "Rate limit reached for model `m` in project proj_x on requests per minute: ...",
               "type": "requests", "code": "rate_limit_exceeded"}}

    outcome                                   status  type                   code
    project or organization limit             429     requests | tokens      rate_limit_exceeded
    larger than a limit can ever admit        413     requests | tokens      request_too_large
    API key unknown, revoked, malformed,      401     invalid_request_error  invalid_api_key
      missing, or two different keys
    model without any limit, none given       404     invalid_request_error  model_not_found
    model blocked for the project or org      403     invalid_request_error  model_blocked
    monthly spend limit reached               400     invalid_request_error  blocked_api_access
    request id used by another caller or      409     invalid_request_error  request_id_reused
      for a different request
    a malformed value the client sent         400     invalid_request_error  invalid_request

``type`` of a limit refusal names the metric of the bucket that refused, so a
client can tell "too many requests" from "too many tokens". The statuses are
those docs/api.md gives each refusal reason. Only the two limit refusals come
with ``retry-after``: waiting cures nothing else.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from ratelimitd.engine.decisions import Decision, Outcome
from ratelimitd.engine.explain import refusal_message

RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
INVALID_API_KEY = "invalid_api_key"
MODEL_NOT_FOUND = "model_not_found"
INVALID_REQUEST = "invalid_request"
_REQUEST_ERROR = "invalid_request_error"


class Refusal(NamedTuple):
    http_status: int
    type: str
    code: str
    message: str

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "code": self.code}
        return json.dumps({"error": error}, separators=(",", ":")).encode()


def missing_api_key() -> Refusal:
    return Refusal(
        401,
        _REQUEST_ERROR,
        INVALID_API_KEY,
        "No API key provided. Send it in the Authorization header: `Authorization: Bearer YOUR_API_KEY`.",
    )


def conflicting_api_keys() -> Refusal:
    return Refusal(401, _REQUEST_ERROR, INVALID_API_KEY, "The request carries two different API keys; send one.")


def model_not_found(message: str) -> Refusal:
    return Refusal(404, _REQUEST_ERROR, MODEL_NOT_FOUND, message)


def invalid_request(message: str) -> Refusal:
    return Refusal(400, _REQUEST_ERROR, INVALID_REQUEST, message)


def refusal(decision: Decision, model: str, requests: int, tokens: int) -> Refusal | None:
    """The answer to a decision, or None when it admits the request.

    ``model``, ``requests`` and ``tokens`` are what the refused item asked for;
    the message quotes them.
    """
    outcome = decision.outcome
    if outcome is Outcome.ALLOWED:
        return None
    message = refusal_message(decision, model, requests, tokens)
    if outcome is Outcome.MODEL_BLOCKED:
        return Refusal(403, _REQUEST_ERROR, "model_blocked", message)
    if outcome in (Outcome.PROJECT_LIMIT, Outcome.ORGANIZATION_LIMIT, Outcome.TOO_LARGE):
        assert decision.binding is not None
        metric = decision.binding.dimension.metric
        if outcome is Outcome.TOO_LARGE:
            return Refusal(413, metric, "request_too_large", message)
        return Refusal(429, metric, RATE_LIMIT_EXCEEDED, message)
    if outcome is Outcome.MODEL_NOT_AVAILABLE:
        return model_not_found(message)
    if outcome is Outcome.SPEND_LIMIT:
        return Refusal(400, _REQUEST_ERROR, "blocked_api_access", message)
    if outcome is Outcome.REQUEST_ID_REUSED:
        return Refusal(409, _REQUEST_ERROR, "request_id_reused", message)
    return Refusal(401, _REQUEST_ERROR, INVALID_API_KEY, message)  # INVALID_API_KEY, PROJECT_NOT_FOUND
