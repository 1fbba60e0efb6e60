"""What each outcome of a decision means, in one table: the reason a CheckResponse
carries, the HTTP status, error type and code an edge answers with, whether waiting
cures it (then, and only then, a ``retry-after`` header), and the message an end user
reads.

CheckAndConsume, Envoy's ShouldRateLimit, the CLI and docs/api.md's refusal table
all read :data:`OUTCOMES` (tests/test_outcomes.py checks the docs and the clients'
copies against it). Every refusal of an HTTP edge has one JSON body, in the shape
LLM APIs (OpenAI, Groq) use::

    {"error": {"message": "Rate limit reached for model `m` in project proj_x on requests per minute: ...",
               "type": "requests", "code": "rate_limit_exceeded"}}

The ``type`` of a limit refusal names the metric of the bucket that refused, so a
client can tell "too many requests" from "too many tokens".
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from ratelimitd.engine.limits import Dimension


class Outcome(enum.IntEnum):
    """Mirrors the first element of decide.lua's reply."""

    ALLOWED = 0
    PROJECT_LIMIT = 1
    ORGANIZATION_LIMIT = 2
    TOO_LARGE = 3
    INVALID_API_KEY = 4
    MODEL_NOT_AVAILABLE = 5
    PROJECT_NOT_FOUND = 6
    MODEL_BLOCKED = 7
    SPEND_LIMIT = 8
    REQUEST_ID_REUSED = 9


class Scope(enum.IntEnum):
    ORGANIZATION = 1
    PROJECT = 2


class BucketState(NamedTuple):
    scope: Scope
    dimension: Dimension
    limit: int
    remaining: int
    reset_after_ms: int


class Decision(NamedTuple):
    outcome: Outcome
    organization_id: str
    project_id: str
    request_id: str
    retry_after_ms: int
    binding: BucketState | None
    buckets: tuple[BucketState, ...]
    replayed: bool
    # The buckets of each item, in item order (a bucket two items share is in both).
    item_buckets: tuple[tuple[BucketState, ...], ...] = ()
    # MODEL_NOT_AVAILABLE and MODEL_BLOCKED: the 1-based index of the item whose model it is;
    # SPEND_LIMIT: the Scope whose monthly spend limit was reached.
    detail: int = 0

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOWED

    @property
    def retryable(self) -> bool:
        """Waiting cures it: the outcome's rule says so (and then retry_after_ms says how long)."""
        return _RETRYABLE[self.outcome]


# The error type of a limit refusal: the metric of the binding bucket.
METRIC = "<metric>"
_REQUEST_ERROR = "invalid_request_error"


@dataclass(frozen=True, slots=True)
class OutcomeRule:
    """What one outcome means to a client."""

    reason: str  # the CheckResponse reason's name (ratelimit.proto)
    http_status: int  # what an HTTP edge answers (200: serve the request)
    error_type: str  # the JSON error's "type" (METRIC: the binding bucket's metric)
    code: str  # the JSON error's "code"
    retry_after: bool  # waiting cures it: a retry-after header, and retry_after_ms
    message: str  # str.format template over the fields of _message_fields


_LIMIT = (
    "Rate limit reached for model `{model}` in {where} on {metric} per {window}: "
    "Limit {limit}, Used {used}, Requested {requested}. Please try again in {retry_in}."
)
_KEY = "Invalid API key: it is unknown, malformed or revoked, or its project was deleted."

OUTCOMES: Mapping[Outcome, OutcomeRule] = {
    Outcome.ALLOWED: OutcomeRule("REASON_ALLOWED", 200, "", "", False, ""),
    Outcome.PROJECT_LIMIT: OutcomeRule("REASON_PROJECT_LIMIT", 429, METRIC, "rate_limit_exceeded", True, _LIMIT),
    Outcome.ORGANIZATION_LIMIT: OutcomeRule(
        "REASON_ORGANIZATION_LIMIT", 429, METRIC, "rate_limit_exceeded", True, _LIMIT
    ),
    Outcome.TOO_LARGE: OutcomeRule(
        "REASON_REQUEST_TOO_LARGE", 413, METRIC, "request_too_large", False,
        "Request too large for model `{model}` in {where} on {metric} per {window}: "
        "Limit {limit}, Requested {requested}. No amount of waiting lets it pass; make it smaller.",
    ),
    Outcome.INVALID_API_KEY: OutcomeRule("REASON_INVALID_API_KEY", 401, _REQUEST_ERROR, "invalid_api_key", False, _KEY),
    Outcome.MODEL_NOT_AVAILABLE: OutcomeRule(
        "REASON_MODEL_NOT_AVAILABLE", 404, _REQUEST_ERROR, "model_not_found", False,
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    # CheckAndConsume answers NOT_FOUND for it (only a trusted caller names a project).
    Outcome.PROJECT_NOT_FOUND: OutcomeRule(
        "REASON_UNSPECIFIED", 401, _REQUEST_ERROR, "invalid_api_key", False, "The project does not exist."
    ),
    Outcome.MODEL_BLOCKED: OutcomeRule(
        "REASON_MODEL_BLOCKED", 403, _REQUEST_ERROR, "model_blocked", False,
        "The model `{model}` is blocked for this project by its organization's or project's model permissions.",
    ),
    Outcome.SPEND_LIMIT: OutcomeRule(
        "REASON_SPEND_LIMIT", 400, _REQUEST_ERROR, "blocked_api_access", False,
        "The {whose}'s monthly spend limit is reached; API access is blocked until next month (UTC) "
        "or until the limit is raised.",
    ),
    Outcome.REQUEST_ID_REUSED: OutcomeRule(
        "REASON_REQUEST_ID_REUSED", 409, _REQUEST_ERROR, "request_id_reused", False,
        "Request id {request_id} was already used by another caller or for a different request "
        "(model or costs); nothing was charged. A retry must repeat the same request; send a new request id "
        "for a new request.",
    ),
}  # fmt: skip
# Not an outcome of the script: the answer of RATELIMITD_ON_STORAGE_ERROR=allow|deny when
# storage cannot be reached (engine/storage_policy.py); the message only when refused.
STORAGE_UNAVAILABLE = OutcomeRule(
    "REASON_STORAGE_UNAVAILABLE", 503, "server_error", "service_unavailable", False,
    "The rate limit service cannot reach its storage; try again shortly.",
)  # fmt: skip
# Every refusal by the reason a CheckResponse names (for clients of the gRPC API: the CLI, docs).
BY_REASON: Mapping[str, OutcomeRule] = {
    rule.reason: rule
    for rule in (*OUTCOMES.values(), STORAGE_UNAVAILABLE)
    if rule.reason not in ("REASON_UNSPECIFIED", "REASON_ALLOWED")
}
# Not an outcome either: a value an end user sent that an HTTP edge cannot read
# (a token estimate, a request id); the message names it.
INVALID_REQUEST = OutcomeRule("", 400, _REQUEST_ERROR, "invalid_request", False, "{detail}")


def go_duration(ms: int) -> str:
    """Formats milliseconds like Go's time.Duration.String(): 0s, 6ms, 7.66s, 2m59.56s, 1h0m0s."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    text = f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def _message_fields(decision: Decision, model: str, requests: int, tokens: int) -> dict[str, object]:
    fields: dict[str, object] = {
        "model": model,
        "request_id": decision.request_id,
        "whose": "organization" if decision.detail == Scope.ORGANIZATION else "project",
    }
    b = decision.binding
    if b is not None:
        metric = b.dimension.metric
        fields.update(
            where=f"project {decision.project_id}"
            if b.scope is Scope.PROJECT
            else f"organization {decision.organization_id}",
            metric=metric,
            window=b.dimension.window,
            limit=b.limit,
            used=b.limit - b.remaining,
            requested=tokens if metric == "tokens" else requests,
            retry_in=go_duration(decision.retry_after_ms),
        )
    return fields


def refusal_message(decision: Decision, model: str, requests: int, tokens: int) -> str:
    """The words an end user reads; "" when the decision admits the request.

    ``model``, ``requests`` and ``tokens`` are what the refused item asked for."""
    if decision.outcome is Outcome.ALLOWED:
        return ""
    return OUTCOMES[decision.outcome].message.format(**_message_fields(decision, model, requests, tokens))


class Refusal(NamedTuple):
    """An HTTP edge's answer to a refused request."""

    http_status: int
    type: str
    code: str
    message: str

    @classmethod
    def of(cls, rule: OutcomeRule, message: str, metric: str = "") -> Refusal:
        return cls(rule.http_status, metric if rule.error_type == METRIC else rule.error_type, rule.code, message)

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "code": self.code}
        return json.dumps({"error": error}, separators=(",", ":")).encode()


def http_refusal(decision: Decision, model: str, requests: int, tokens: int) -> Refusal | None:
    """The HTTP answer to a decision, or None when it admits the request."""
    if decision.outcome is Outcome.ALLOWED:
        return None
    metric = decision.binding.dimension.metric if decision.binding is not None else ""
    message = refusal_message(decision, model, requests, tokens)
    return Refusal.of(OUTCOMES[decision.outcome], message, metric)


def missing_api_key() -> Refusal:
    return Refusal.of(
        OUTCOMES[Outcome.INVALID_API_KEY],
        "No API key provided. Send it in the Authorization header: `Authorization: Bearer YOUR_API_KEY`.",
    )


def conflicting_api_keys() -> Refusal:
    return Refusal.of(OUTCOMES[Outcome.INVALID_API_KEY], "The request carries two different API keys; send one.")


def model_not_found(message: str) -> Refusal:
    return Refusal.of(OUTCOMES[Outcome.MODEL_NOT_AVAILABLE], message)


def invalid_request(message: str) -> Refusal:
    return Refusal.of(INVALID_REQUEST, INVALID_REQUEST.message.format(detail=message))


_RETRYABLE = {outcome: rule.retry_after for outcome, rule in OUTCOMES.items()}
