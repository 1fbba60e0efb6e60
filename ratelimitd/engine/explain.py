"""Words for a decision: the message an end user sees on a refusal."""

from __future__ import annotations

from ratelimitd.engine.decisions import Decision, Outcome, Scope
from ratelimitd.engine.headers import go_duration


def refusal_message(decision: Decision, model: str, requests: int, tokens: int) -> str:
    outcome, b = decision.outcome, decision.binding
    if outcome is Outcome.ALLOWED:
        return ""
    if outcome is Outcome.INVALID_API_KEY:
        return "Invalid API key: it is unknown, malformed or revoked, or its project was deleted."
    if outcome is Outcome.MODEL_NOT_AVAILABLE:
        return f"The model `{model}` does not exist or you do not have access to it."
    if outcome is Outcome.MODEL_BLOCKED:
        return f"The model `{model}` is blocked for this project by its organization's or project's model permissions."
    if outcome is Outcome.PROJECT_NOT_FOUND:
        return "The project does not exist."
    if outcome is Outcome.REQUEST_ID_REUSED:
        return (
            f"Request id {decision.request_id} was already used by another caller or for a different request "
            "(model or costs); nothing was charged. A retry must repeat the same request; send a new request id "
            "for a new request."
        )
    if outcome is Outcome.SPEND_LIMIT:
        whose = "organization" if decision.detail == Scope.ORGANIZATION else "project"
        return (
            f"The {whose}'s monthly spend limit is reached; API access is blocked until next month (UTC) "
            "or until the limit is raised."
        )
    assert b is not None
    where = f"project {decision.project_id}" if b.scope is Scope.PROJECT else f"organization {decision.organization_id}"
    metric, window = b.dimension.metric, b.dimension.window
    requested = tokens if metric == "tokens" else requests
    if outcome is Outcome.TOO_LARGE:
        return (
            f"Request too large for model `{model}` in {where} on {metric} per {window}: "
            f"Limit {b.limit}, Requested {requested}. No amount of waiting lets it pass; make it smaller."
        )
    return (
        f"Rate limit reached for model `{model}` in {where} on {metric} per {window}: "
        f"Limit {b.limit}, Used {b.limit - b.remaining}, Requested {requested}. "
        f"Please try again in {go_duration(decision.retry_after_ms)}."
    )
