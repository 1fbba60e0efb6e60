"""One outcome table: every outcome through every surface, and every copy of it in agreement.

Each refusal the decision script can give is produced for real, and asked for twice, the
same way, over CheckAndConsume and over Envoy's ShouldRateLimit (refusals charge nothing,
so both meet the same state). Both must answer what engine/outcomes.py says. docs/api.md's
refusal table and the HTTP maps the Go, Python and TypeScript clients carry are read and
compared with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from ratelimitd.engine.outcomes import BY_REASON, METRIC, OUTCOMES, Outcome
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client
from tests.servers import ROOT

M = "llama-3.1-8b-instant"
OTHER = "mixtral-8x7b"


class Ask(NamedTuple):
    """One request, as both surfaces send it."""

    key: str
    model: str = M
    requests: int = 1
    tokens: int = 10
    request_id: str = ""


async def _org(client: Client) -> tuple[str, str, str]:
    org = await client.org("outcomes", [(M, "requests", "minute", 5), (M, "tokens", "minute", 100)])
    pid, key = await client.project(org, "p", [(M, "requests", "minute", 2)])
    return org, pid, key


async def _project_limit(client: Client) -> Ask:
    _, _, key = await _org(client)
    for _ in range(2):
        assert (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))).allowed
    return Ask(key)


async def _organization_limit(client: Client) -> Ask:
    org, _, _ = await _org(client)
    _, other = await client.project(org, "q")
    for _ in range(5):
        assert (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=other, model=M))).allowed
    _, key = await client.project(org, "r")
    return Ask(key)


async def _too_large(client: Client) -> Ask:
    return Ask((await _org(client))[2], tokens=101)


async def _invalid_api_key(client: Client) -> Ask:
    key = (await _org(client))[2]
    return Ask(key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb"))


async def _model_not_available(client: Client) -> Ask:
    return Ask((await _org(client))[2], model=OTHER)


async def _model_blocked(client: Client) -> Ask:
    org, pid, key = await _org(client)
    policy = apb.ModelPolicy(access=apb.MODEL_ACCESS_BLOCK_LIST, models=[M])
    await client.models.SetModelPermissions(
        apb.SetModelPermissionsRequest(organization_id=org, project_id=pid, policy=policy), metadata=AUTH
    )
    return Ask(key)


async def _spend_limit(client: Client) -> Ask:
    org, pid, key = await _org(client)
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    await usage.SetSpendLimit(
        upb.SetSpendLimitRequest(organization_id=org, project_id=pid, limit_usd_micros=0), metadata=AUTH
    )
    return Ask(key)


async def _request_id_reused(client: Client) -> Ask:
    org, _, key = await _org(client)
    _, other = await client.project(org, "q")
    first = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=other, model=M, request_id="req-taken"))
    assert first.allowed
    return Ask(key, request_id="req-taken")


async def _allowed(client: Client) -> Ask:
    return Ask((await _org(client))[2])


SCENARIOS: dict[Outcome, Callable[[Client], Awaitable[Ask]]] = {
    Outcome.ALLOWED: _allowed,
    Outcome.PROJECT_LIMIT: _project_limit,
    Outcome.ORGANIZATION_LIMIT: _organization_limit,
    Outcome.TOO_LARGE: _too_large,
    Outcome.INVALID_API_KEY: _invalid_api_key,
    Outcome.MODEL_NOT_AVAILABLE: _model_not_available,
    Outcome.MODEL_BLOCKED: _model_blocked,
    Outcome.SPEND_LIMIT: _spend_limit,
    Outcome.REQUEST_ID_REUSED: _request_id_reused,
}


def test_every_outcome_an_api_key_can_meet_has_a_scenario() -> None:
    # PROJECT_NOT_FOUND needs a project reference (a trusted caller): CheckAndConsume answers
    # NOT_FOUND for it (tests/test_decisions.py), and Envoy has no such caller.
    assert set(SCENARIOS) == set(Outcome) - {Outcome.PROJECT_NOT_FOUND}


async def _should_rate_limit(client: Client, ask: Ask) -> Any:
    entries = {"api_key": ask.key, "model": ask.model, "tokens": str(ask.tokens)}
    if ask.request_id:
        entries["request_id"] = ask.request_id
    descriptor = common_pb.RateLimitDescriptor(
        entries=[common_pb.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()]
    )
    stub = rls_pb2_grpc.RateLimitServiceStub(client.channel)
    return await stub.ShouldRateLimit(
        rls_pb2.RateLimitRequest(domain="ratelimitd", descriptors=[descriptor], hits_addend=ask.requests)
    )


@pytest.mark.parametrize("outcome", list(SCENARIOS), ids=lambda o: o.name)
async def test_every_outcome_means_the_same_on_every_surface(client: Client, outcome: Outcome) -> None:
    ask = await SCENARIOS[outcome](client)
    rule = OUTCOMES[outcome]
    check = await client.decisions.CheckAndConsume(
        pb.CheckRequest(
            api_key=ask.key, model=ask.model, requests=ask.requests, tokens=ask.tokens, request_id=ask.request_id
        )
    )
    envoy = await _should_rate_limit(client, ask)

    assert pb.Reason.Name(check.reason) == rule.reason
    assert check.allowed == (outcome is Outcome.ALLOWED)
    assert ("retry-after" in check.headers) == rule.retry_after == (check.retry_after_ms > 0)
    envoy_headers = {h.key: h.value for h in envoy.response_headers_to_add}
    assert ("retry-after" in envoy_headers) == rule.retry_after
    if outcome is Outcome.ALLOWED:
        assert (check.message, envoy.overall_code, envoy.raw_body) == ("", rls_pb2.RateLimitResponse.OK, b"")
        return
    assert envoy.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    error = json.loads(envoy.raw_body)["error"]
    expected_type = check.binding.metric if rule.error_type == METRIC else rule.error_type
    assert (error["code"], error["type"], error["message"]) == (rule.code, expected_type, check.message)
    assert dict(envoy.dynamic_metadata) == {
        "http_status": str(rule.http_status),
        "type": expected_type,
        "code": rule.code,
    }
    # the message is the rule's template filled in: its fixed words are all there
    for fixed in re.split(r"\{\w+\}", rule.message):
        assert fixed in check.message


# -- the copies of the table ------------------------------------------------------------

REFUSAL_REASONS = BY_REASON


def test_every_refusal_reason_of_the_proto_has_a_row() -> None:
    assert set(BY_REASON) == set(pb.Reason.keys()) - {"REASON_UNSPECIFIED", "REASON_ALLOWED"}


def test_docs_refusal_table_agrees_with_the_outcome_table() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split("### Refusal reasons", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `(REASON_\w+)`[^|]*\| (\d{3})[^|]*\| (yes|no) \|$", section, re.M)
    documented = {reason: (int(status), retry == "yes") for reason, status, retry in rows}
    assert documented == {name: (r.http_status, r.retry_after) for name, r in REFUSAL_REASONS.items()}


CLIENT_MAPS = {
    "go": (ROOT / "clients/go/http.go", r"pb\.Reason_(REASON_\w+):\s*\{http\.Status(\w+), \"(\w+)\"\}"),
    "python": (
        ROOT / "clients/python/src/ratelimitd_client/http.py",
        r"Reason\.(REASON_\w+): \((\d+), \"(\w+)\"\)",
    ),
    "typescript": (ROOT / "clients/typescript/src/http.ts", r"\[Reason\.(\w+), \[(\d+), \"(\w+)\"\]\]"),
}
GO_STATUS = {
    "TooManyRequests": 429, "RequestEntityTooLarge": 413, "Unauthorized": 401, "NotFound": 404, "Forbidden": 403,
    "BadRequest": 400, "Conflict": 409, "ServiceUnavailable": 503,
}  # fmt: skip


@pytest.mark.parametrize("language", list(CLIENT_MAPS))
def test_each_clients_http_map_agrees_with_the_outcome_table(language: str) -> None:
    path, pattern = CLIENT_MAPS[language]
    found = {}
    for reason, status, code in re.findall(pattern, path.read_text()):
        name = reason if reason.startswith("REASON_") else f"REASON_{reason}"
        found[name] = (GO_STATUS[status] if language == "go" else int(status), code)
    assert found == {name: (r.http_status, r.code) for name, r in REFUSAL_REASONS.items()}
