"""Bad input: a precise status or refusal reason, and nothing charged anywhere."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import redis.asyncio

from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import AUTH, Client

M = "llama-3.1-8b-instant"
GOOD = object()  # placeholder for the project's real key


@pytest.fixture
async def setup(client: Client) -> tuple[str, str, str]:
    org = await client.org("o", [(M, "requests", "minute", 10), (M, "tokens", "minute", 1000)])
    pid, key = await client.project(org, "a")
    return org, pid, key


STATUS_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("no caller", {"model": M}, "set either api_key or project"),
    ("empty key", {"api_key": "", "model": M}, "api_key is empty"),
    ("empty model", {"api_key": GOOD, "model": ""}, "model is empty"),
    ("wildcard model", {"api_key": GOOD, "model": "*"}, "model '*' names the default limit"),
    ("oversized model", {"api_key": GOOD, "model": "m" * 129}, "at most 128"),
    ("model with a bar", {"api_key": GOOD, "model": "a|b"}, "characters other than"),
    ("negative requests", {"api_key": GOOD, "model": M, "requests": -1}, "requests is -1"),
    ("absurd requests", {"api_key": GOOD, "model": M, "requests": 10**9}, "at most 1000000"),
    ("negative tokens", {"api_key": GOOD, "model": M, "tokens": -5}, "tokens is -5"),
    ("absurd tokens", {"api_key": GOOD, "model": M, "tokens": 10**15}, "at most 1000000000000"),
    ("oversized request id", {"api_key": GOOD, "model": M, "request_id": "r" * 129}, "at most 128"),
    ("request id with a space", {"api_key": GOOD, "model": M, "request_id": "a b"}, "printable ASCII"),
]


@pytest.mark.parametrize(("case", "fields", "message"), STATUS_CASES, ids=[c[0] for c in STATUS_CASES])
async def test_malformed_input_is_invalid_argument_and_charges_nothing(
    client: Client,
    setup: tuple[str, str, str],
    redis_client: redis.asyncio.Redis,
    case: str,
    fields: dict[str, Any],
    message: str,
) -> None:
    fields = {k: (setup[2] if v is GOOD else v) for k, v in fields.items()}
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.decisions.CheckAndConsume(pb.CheckRequest(**fields))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (e.value.details() or "")
    assert [k async for k in redis_client.scan_iter("rl:{*}:b:*")] == []


async def test_unknown_malformed_and_foreign_keys_are_refused_as_invalid_key(
    client: Client, setup: tuple[str, str, str], redis_client: redis.asyncio.Redis
) -> None:
    _, _, key = setup
    other_org = await client.org("other", [(M, "requests", "minute", 10)])
    _, other_key = await client.project(other_org, "b")
    forged = key[:-32] + other_key[-32:]  # right ids, wrong secret
    unknown = "rlk_" + "a" * 12 + key[16:28] + "b" * 32  # well-formed, no such key
    for bad in ("sk-not-ours", key + "x", key.upper(), forged, unknown):
        reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=bad, model=M))
        assert not reply.allowed and reply.reason == pb.REASON_INVALID_API_KEY, bad
        assert reply.headers == {} and reply.project_id == ""
    assert [k async for k in redis_client.scan_iter("rl:{*}:b:*")] == []


async def test_model_without_limit_or_default_is_not_available(
    client: Client, setup: tuple[str, str, str], redis_client: redis.asyncio.Redis
) -> None:
    reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=setup[2], model="gpt-unknown"))
    assert reply.reason == pb.REASON_MODEL_NOT_AVAILABLE and not reply.allowed
    assert "gpt-unknown" in reply.message
    assert [k async for k in redis_client.scan_iter("rl:{*}:b:*")] == []


async def test_zero_requests_counts_as_one(client: Client, setup: tuple[str, str, str]) -> None:
    reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=setup[2], model=M, requests=0))
    assert reply.allowed
    assert reply.headers["x-ratelimit-remaining-tokens"] == "1000"
    (b,) = [b for b in reply.buckets if b.metric == "requests"]
    assert b.remaining == 9


LIMIT_CASES: list[tuple[str, apb.Limit, grpc.StatusCode, str]] = [
    ("negative", apb.Limit(model=M, metric="requests", window="minute", limit=-1), grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    ("huge", apb.Limit(model=M, metric="requests", window="minute", limit=10**13), grpc.StatusCode.INVALID_ARGUMENT, "maximum"),
    ("metric", apb.Limit(model=M, metric="images", window="minute", limit=1), grpc.StatusCode.INVALID_ARGUMENT, "metric 'images'"),
    ("window", apb.Limit(model=M, metric="requests", window="week", limit=1), grpc.StatusCode.INVALID_ARGUMENT, "window 'week'"),
    ("model", apb.Limit(model="", metric="requests", window="minute", limit=1), grpc.StatusCode.INVALID_ARGUMENT, "model is empty"),
    ("no org limit", apb.Limit(model="other", metric="requests", window="minute", limit=1), grpc.StatusCode.FAILED_PRECONDITION, "no limits for model 'other'"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "limit", "code", "message"), LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
async def test_bad_project_limits_store_nothing(
    client: Client, setup: tuple[str, str, str], case: str, limit: apb.Limit, code: grpc.StatusCode, message: str
) -> None:
    org, pid, _ = setup
    good = apb.Limit(model=M, metric="tokens", window="minute", limit=5)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(organization_id=org, project_id=pid, set=[good, limit]), metadata=AUTH
        )
    assert e.value.code() == code
    assert message in (e.value.details() or "")
    got = await client.projects.GetProjectLimits(
        apb.GetProjectLimitsRequest(organization_id=org, project_id=pid), metadata=AUTH
    )
    assert list(got.custom) == []


async def test_management_ids_are_checked(client: Client, setup: tuple[str, str, str]) -> None:
    org, _, _ = setup
    cases = [
        (apb.CreateProjectRequest(organization_id="nope", name="x"), grpc.StatusCode.INVALID_ARGUMENT, "not a org_ id"),
        (
            apb.CreateProjectRequest(organization_id="org_aaaaaaaaaaaa", name="x"),
            grpc.StatusCode.NOT_FOUND,
            "does not exist",
        ),
        (apb.CreateProjectRequest(organization_id=org, name="Bad Name"), grpc.StatusCode.INVALID_ARGUMENT, "not valid"),
        (apb.CreateProjectRequest(organization_id=org, name="a"), grpc.StatusCode.ALREADY_EXISTS, "already exists"),
        (apb.CreateProjectRequest(organization_id=org, name="x" * 65), grpc.StatusCode.INVALID_ARGUMENT, "not valid"),
    ]
    for request, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.projects.CreateProject(request, metadata=AUTH)
        assert (e.value.code(), message in (e.value.details() or "")) == (code, True), request


async def test_management_needs_a_valid_credential(client: Client) -> None:
    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "Basic abc"),)]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.orgs.CreateOrganization(apb.CreateOrganizationRequest(name="x"), metadata=metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
