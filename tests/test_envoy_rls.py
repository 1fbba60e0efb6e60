"""ShouldRateLimit over gRPC, as Envoy calls it: the descriptor mapping, hits_addend, replies, bad input."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
import redis.asyncio
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import json_format

from ratelimitd.app import App
from ratelimitd.core import keys
from ratelimitd.engine.edge import token_estimate
from ratelimitd.settings import ENVOY_DESCRIPTOR_ROLES, Settings
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client, Storage, channel_client, settings_for
from tests.control import usd
from tests.servers import ValkeyProcess

M = "llama-3.1-8b-instant"
M2 = "llama-3.3-70b-versatile"
DOMAIN = "ratelimitd"
OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
Unit = rls_pb2.RateLimitResponse.RateLimit


def desc(hits: int | None = None, /, **entries: str) -> Any:
    """A descriptor with these entries, and its own hits_addend when ``hits`` is given."""
    d = common_pb.RateLimitDescriptor(
        entries=[common_pb.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()]
    )
    if hits is not None:
        d.hits_addend.value = hits
    return d


def request(*descriptors: Any, hits: int = 0, domain: str = DOMAIN) -> Any:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=list(descriptors), hits_addend=hits)


def rls(client: Client) -> Any:
    return rls_pb2_grpc.RateLimitServiceStub(client.channel)


def headers(reply: Any) -> dict[str, str]:
    return {h.key: h.value for h in reply.response_headers_to_add}


def body(reply: Any) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(reply.raw_body)["error"]
    return error


async def charged(redis_client: redis.asyncio.Redis) -> list[str]:
    return sorted([k async for k in redis_client.scan_iter("rl:{*}:b:*")])


class Project(NamedTuple):
    org: str
    id: str
    key: str


@pytest.fixture
async def project(client: Client) -> Project:
    org = await client.org(
        "o",
        [
            (M, "requests", "minute", 10),
            (M, "requests", "day", 100),
            (M, "tokens", "minute", 1000),
            (M2, "requests", "minute", 5),
        ],
    )
    return Project(org, *(await client.project(org, "a")))


@pytest.fixture
def key(project: Project) -> str:
    return project.key


async def test_allowed_reply_has_one_status_per_descriptor_and_the_check_and_consume_headers(
    client: Client, key: str
) -> None:
    reply = await rls(client).ShouldRateLimit(request(desc(api_key=key, model=M, tokens="200")))
    assert reply.overall_code == OK
    (status,) = reply.statuses
    # The bucket closest to full: tokens per minute, 800 of 1000 left (requests: 9 of 10).
    assert (status.code, status.current_limit.requests_per_unit, status.current_limit.unit) == (OK, 1000, Unit.MINUTE)
    assert (status.current_limit.name, status.limit_remaining) == ("organization tokens per minute", 800)
    assert status.duration_until_reset.ToMilliseconds() == 12000  # 200 tokens drain in 12 s at 1000/min
    assert reply.raw_body == b""
    # The very headers CheckAndConsume gives for the next identical call, one request later.
    check = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, tokens=200))
    assert (
        set(headers(reply))
        == set(check.headers)
        == {f"x-ratelimit-{h}-{m}" for h in ("limit", "remaining", "reset") for m in ("requests", "tokens")}
    )
    assert headers(reply)["x-ratelimit-remaining-requests"] == "99"
    assert check.headers["x-ratelimit-remaining-requests"] == "98"
    assert headers(reply)["x-ratelimit-limit-tokens"] == check.headers["x-ratelimit-limit-tokens"] == "1000"


HITS_CASES = [
    # (request-level hits_addend, descriptor hits_addend, requests charged)
    (0, None, 1),  # unset counts 1
    (3, None, 3),  # the request-level value applies to every descriptor without its own
    (0, 4, 4),  # a descriptor's own value
    (3, 2, 2),  # ... replaces the request-level one
    (3, 0, 0),  # an explicit 0 checks without charging
]


@pytest.mark.parametrize(("request_hits", "descriptor_hits", "cost"), HITS_CASES)
async def test_hits_addend_follows_envoys_rules(
    client: Client, key: str, request_hits: int, descriptor_hits: int | None, cost: int
) -> None:
    reply = await rls(client).ShouldRateLimit(request(desc(descriptor_hits, api_key=key, model=M2), hits=request_hits))
    assert reply.overall_code == OK
    assert (reply.statuses[0].current_limit.requests_per_unit, reply.statuses[0].limit_remaining) == (5, 5 - cost)


async def test_explicit_zero_hits_charges_no_tokens_either(client: Client, key: str) -> None:
    reply = await rls(client).ShouldRateLimit(request(desc(0, api_key=key, model=M, tokens="500")))
    assert reply.overall_code == OK
    assert headers(reply)["x-ratelimit-remaining-tokens"] == "1000"
    assert headers(reply)["x-ratelimit-remaining-requests"] == "100"


async def test_descriptors_are_one_atomic_decision_with_statuses_in_request_order(
    client: Client, key: str, redis_client: redis.asyncio.Redis
) -> None:
    stub = rls(client)
    for _ in range(5):
        assert (await stub.ShouldRateLimit(request(desc(api_key=key, model=M2)))).overall_code == OK
    before = await charged(redis_client)
    levels = {k: await redis_client.hgetall(k) for k in before}
    reply = await stub.ShouldRateLimit(
        request(desc(remote_address="10.0.0.1"), desc(api_key=key, model=M), desc(api_key=key, model=M2))
    )
    assert reply.overall_code == OVER
    foreign, first, second = reply.statuses
    assert (foreign.code, foreign.HasField("current_limit")) == (OK, False)  # not ours: no limit
    assert first.code == OK and first.current_limit.requests_per_unit in (10, 100, 1000)  # had room
    assert (second.code, second.current_limit.name, second.limit_remaining) == (
        OVER,
        "organization requests per minute",
        0,
    )
    assert {k: await redis_client.hgetall(k) for k in before} == levels  # M was not charged either
    assert await charged(redis_client) == before
    error = body(reply)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert M2 in error["message"]


async def test_refusal_carries_json_body_headers_and_the_status_it_deserves(client: Client, project: Project) -> None:
    stub, key = rls(client), project.key
    for _ in range(10):
        assert (await stub.ShouldRateLimit(request(desc(api_key=key, model=M)))).overall_code == OK
    reply = await stub.ShouldRateLimit(request(desc(api_key=key, model=M)))
    assert reply.overall_code == OVER and reply.statuses[0].code == OVER
    h = headers(reply)
    assert h["content-type"] == "application/json"
    assert h["retry-after"] == "6" and h["x-ratelimit-remaining-requests"] == "90"
    error = body(reply)
    assert error == {
        "message": f"Rate limit reached for model `{M}` in organization {project.org} on requests per "
        "minute: Limit 10, Used 10, Requested 1. Please try again in 6s.",
        "type": "requests",
        "code": "rate_limit_exceeded",
    }
    assert json_format.MessageToDict(reply.dynamic_metadata) == {
        "http_status": "429",
        "type": "requests",
        "code": "rate_limit_exceeded",
    }


async def test_bearer_prefix_is_stripped(client: Client, key: str) -> None:
    for value in (f"Bearer {key}", f"bearer  {key} ", key):
        reply = await rls(client).ShouldRateLimit(request(desc(api_key=value, model=M)))
        assert reply.overall_code == OK, value


# fmt: off
REFUSALS: list[tuple[str, list[dict[str, str]], int, str, str]] = [
    # (case, descriptors (KEY = the project's key), http status, code, words in the message)
    ("no api key entry", [{"model": M}], 401, "invalid_api_key", "No API key provided"),
    ("empty descriptor", [{}], 401, "invalid_api_key", "No API key provided"),
    ("bearer without a key", [{"api_key": "Bearer ", "model": M}], 401, "invalid_api_key", "No API key"),
    ("malformed key", [{"api_key": "sk-not-ours", "model": M}], 401, "invalid_api_key", "Invalid API key"),
    ("unknown key", [{"api_key": "rlk_" + "a" * 56, "model": M}], 401, "invalid_api_key", "Invalid API key"),
    ("two keys", [{"api_key": "KEY", "model": M}, {"api_key": "rlk_" + "a" * 56, "model": M}], 401, "invalid_api_key", "two different API keys"),
    ("no model", [{"api_key": "KEY"}], 404, "model_not_found", "No model given"),
    ("unknown model", [{"api_key": "KEY", "model": "gpt-unknown"}], 404, "model_not_found", "`gpt-unknown` does not exist"),
    ("malformed model", [{"api_key": "KEY", "model": "a|b"}], 404, "model_not_found", "`a|b` does not exist"),
    ("non-numeric estimate", [{"api_key": "KEY", "model": M, "tokens": "lots"}], 400, "invalid_request", "Invalid token estimate 'lots'"),
    ("negative estimate", [{"api_key": "KEY", "model": M, "tokens": "-5"}], 400, "invalid_request", "Invalid token estimate '-5'"),
    ("fractional estimate", [{"api_key": "KEY", "model": M, "tokens": "12.5"}], 400, "invalid_request", "whole number"),
    ("two request ids", [{"api_key": "KEY", "model": M, "request_id": "a"}, {"api_key": "KEY", "model": M2, "request_id": "b"}], 400, "invalid_request", "two different request ids"),
    ("request id with a space", [{"api_key": "KEY", "model": M, "request_id": "a b"}], 400, "invalid_request", "printable ASCII"),
    ("too large", [{"api_key": "KEY", "model": M, "tokens": "1001"}], 413, "request_too_large", "Limit 1000, Requested 1001"),
]
# fmt: on


@pytest.mark.parametrize(("case", "descriptors", "status", "code", "words"), REFUSALS, ids=[c[0] for c in REFUSALS])
async def test_what_an_end_user_controls_is_refused_never_an_error(
    client: Client,
    key: str,
    redis_client: redis.asyncio.Redis,
    case: str,
    descriptors: list[dict[str, str]],
    status: int,
    code: str,
    words: str,
) -> None:
    ds = [desc(**{k: (key if v == "KEY" else v) for k, v in d.items()}) for d in descriptors]
    reply = await rls(client).ShouldRateLimit(request(*ds))
    assert reply.overall_code == OVER
    assert all(s.code == OVER for s in reply.statuses)
    error = body(reply)
    assert (error["code"], json_format.MessageToDict(reply.dynamic_metadata)["http_status"]) == (code, str(status))
    assert words in error["message"]
    assert "retry-after" not in headers(reply)
    assert await charged(redis_client) == []


async def test_a_blocked_model_is_refused_with_403_and_blames_its_descriptor(
    client: Client, project: Project, redis_client: redis.asyncio.Redis
) -> None:
    await client.models.SetModelPermissions(
        apb.SetModelPermissionsRequest(
            organization_id=project.org, policy=apb.ModelPolicy(access=apb.MODEL_ACCESS_BLOCK_LIST, models=[M2])
        ),
        metadata=AUTH,
    )
    reply = await rls(client).ShouldRateLimit(
        request(desc(api_key=project.key, model=M), desc(api_key=project.key, model=M2))
    )
    assert (reply.overall_code, [s.code for s in reply.statuses]) == (OVER, [OK, OVER])
    error = body(reply)
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_blocked")
    assert f"`{M2}` is blocked" in error["message"]
    assert json_format.MessageToDict(reply.dynamic_metadata)["http_status"] == "403"
    assert await charged(redis_client) == []


async def test_revoked_key_and_spend_limit_refusals(
    client: Client, key: str, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("spender", [(M, "requests", "minute", 10)])
    pid, spender = await client.project(org, "s")
    await usage_pb2_grpc.UsageServiceStub(client.channel).SetSpendLimit(
        upb.SetSpendLimitRequest(organization_id=org, project_id=pid, limit_usd_micros=usd(0.0)), metadata=AUTH
    )
    reply = await rls(client).ShouldRateLimit(request(desc(api_key=spender, model=M)))
    error = body(reply)
    assert (reply.overall_code, error["type"], error["code"]) == (OVER, "invalid_request_error", "blocked_api_access")
    assert json_format.MessageToDict(reply.dynamic_metadata)["http_status"] == "400"

    listed = await client.projects.ListApiKeys(
        apb.ListApiKeysRequest(organization_id=org, project_id=pid), metadata=AUTH
    )
    await client.projects.RevokeApiKey(
        apb.RevokeApiKeyRequest(organization_id=org, key_id=listed.keys[0].id), metadata=AUTH
    )
    reply = await rls(client).ShouldRateLimit(request(desc(api_key=spender, model=M)))
    assert (reply.overall_code, body(reply)["code"]) == (OVER, "invalid_api_key")
    assert await charged(redis_client) == []


# fmt: off
BAD_RPC: list[tuple[str, Any, str]] = [
    ("empty domain", request(desc(api_key="k", model=M), domain=""), "domain is empty"),
    ("unknown domain", request(desc(api_key="k", model=M), domain="other"), "domain 'other' is not one of ratelimitd"),
    ("no descriptors", request(), "descriptors is empty"),
    ("too many descriptors", request(*[desc(api_key="k", model=M)] * 65), "65 descriptors; at most 64"),
    ("request hits_addend too large", request(desc(api_key="k", model=M), hits=1_000_001), "hits_addend is 1000001"),
    ("descriptor hits_addend too large", request(desc(10**6 + 1, api_key="k", model=M)), "descriptor 1: hits_addend"),
    ("unknown phase", request(desc(api_key="k", model=M, phase="later")), "phase 'later' is not one of usage"),
    ("mixed phases", request(desc(api_key="k", model=M), desc(api_key="k", model=M, phase="usage")), "mix the usage phase"),
]
# fmt: on


@pytest.mark.parametrize(("case", "message", "words"), BAD_RPC, ids=[c[0] for c in BAD_RPC])
async def test_what_the_envoy_configuration_decides_is_invalid_argument(
    client: Client, key: str, redis_client: redis.asyncio.Redis, case: str, message: Any, words: str
) -> None:
    for d in message.descriptors:
        for e in d.entries:
            if e.key == "api_key":
                e.value = key
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await rls(client).ShouldRateLimit(message)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (e.value.details() or "")
    assert await charged(redis_client) == []


async def test_a_repeated_request_id_is_decided_anew(client: Client, key: str) -> None:
    """Replaying the first answer would let a client that picks its request id pass forever."""
    stub = rls(client)
    replies = [await stub.ShouldRateLimit(request(desc(api_key=key, model=M2, request_id="same"))) for _ in range(6)]
    assert [r.overall_code for r in replies] == [OK] * 5 + [OVER]


async def test_usage_call_reconciles_the_reservation_and_never_refuses(
    client: Client, project: Project, redis_client: redis.asyncio.Redis
) -> None:
    stub, key = rls(client), project.key
    reserve = desc(api_key=key, model=M, tokens="100", request_id="req-1")
    assert headers(await stub.ShouldRateLimit(request(reserve)))["x-ratelimit-remaining-tokens"] == "900"
    # What Envoy sends when the stream is done: hits_addend from the response's token count.
    done = await stub.ShouldRateLimit(request(desc(1500, phase="usage", api_key=key, model=M, request_id="req-1")))
    assert done.overall_code == OK and [s.code for s in done.statuses] == [OK]
    # 1500 counted against 100 reserved: the bucket is 500 in debt, the next request waits.
    refused = await stub.ShouldRateLimit(request(desc(api_key=key, model=M)))
    assert refused.overall_code == OVER and body(refused)["type"] == "tokens"
    record = str(await redis_client.get(keys.OrgKeys(project.org).request("req-1")))
    assert record.split(";")[2] == M  # the model reported (lib.lua, rl_record_encode)
    # Reported once: a repeat changes nothing. Over the limit, usage still answers OK.
    again = await stub.ShouldRateLimit(request(desc(1500, phase="usage", api_key=key, model=M, request_id="req-1")))
    assert again.overall_code == OK
    for odd in (
        desc(5, phase="usage", api_key="sk-bad"),
        desc(5, phase="usage", model=M),
        desc(5, phase="usage"),
    ):
        assert (await stub.ShouldRateLimit(request(odd))).overall_code == OK


async def test_usage_split_by_kind_is_one_report(client: Client, project: Project) -> None:
    stub, key = rls(client), project.key
    done = request(
        desc(30, phase="usage_input", api_key=key, model=M, request_id="r2"),
        desc(20, phase="usage_output", api_key=key, model=M, request_id="r2"),
        desc(10, phase="usage_cached", api_key=key, model=M, request_id="r2"),
    )
    assert (await stub.ShouldRateLimit(done)).overall_code == OK
    logs = await usage_pb2_grpc.UsageServiceStub(client.channel).ListRequestLogs(
        upb.ListRequestLogsRequest(organization_id=project.org, project_id=project.id), metadata=AUTH
    )
    (entry,) = [e for e in logs.entries if e.request_id == "r2"]
    assert (entry.input_tokens, entry.output_tokens, entry.cached_tokens) == (30, 20, 10)
    # input 30 + output 20 - cached 10 = 40 tokens counted against the minute's 1000
    reply = await stub.ShouldRateLimit(request(desc(api_key=key, model=M)))
    assert headers(reply)["x-ratelimit-remaining-tokens"] == "960"


@pytest.fixture
async def custom(storage: Storage, redis_client: redis.asyncio.Redis) -> AsyncIterator[Client]:
    a = App(
        settings_for(
            storage.url,
            envoy_domains=("llm", "edge"),
            envoy_unknown_domain="allow",
            envoy_descriptor_keys={"api_key": "authorization", "model": "x-model"},
        )
    )
    await a.start()
    c = channel_client(f"127.0.0.1:{a.port}")
    yield c
    await c.channel.close()
    await a.stop(0)


async def test_descriptor_keys_and_domains_are_configurable(custom: Client, redis_client: redis.asyncio.Redis) -> None:
    org = await custom.org("o", [(M, "requests", "minute", 1)])
    _, key = await custom.project(org, "a")
    stub = rls(custom)
    ok = await stub.ShouldRateLimit(request(desc(authorization=f"Bearer {key}", **{"x-model": M}), domain="edge"))
    assert ok.overall_code == OK
    # The default key names are just other entries now: no API key in sight.
    refused = await stub.ShouldRateLimit(request(desc(api_key=key, model=M), domain="llm"))
    assert (refused.overall_code, body(refused)["code"]) == (OVER, "invalid_api_key")
    # Another domain is allowed through untouched, as configured.
    before = await charged(redis_client)
    other = await stub.ShouldRateLimit(request(desc(authorization=key, **{"x-model": M}), domain="ratelimitd"))
    assert (other.overall_code, [s.code for s in other.statuses]) == (OK, [OK])
    assert await charged(redis_client) == before


async def test_storage_outage_is_unavailable_so_envoy_decides(tmp_path: Path) -> None:
    own = ValkeyProcess(tmp_path)
    own.start()
    app = App(settings_for(own.url))
    await app.start()
    client = channel_client(f"127.0.0.1:{app.port}")
    try:
        org = await client.org("o", [(M, "requests", "minute", 10)])
        _, key = await client.project(org, "a")
        assert (await rls(client).ShouldRateLimit(request(desc(api_key=key, model=M)))).overall_code == OK
        own.stop()
        for message in (
            request(desc(api_key=key, model=M)),
            request(desc(5, phase="usage", api_key=key, model=M)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await rls(client).ShouldRateLimit(message)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "storage" in (e.value.details() or "")
    finally:
        await client.channel.close()
        await app.stop(0)
        own.stop()


async def test_one_entry_twice_with_different_values_is_refused(client: Client, key: str) -> None:
    d = desc(api_key=key, model=M)
    d.entries.add(key="model", value=M2)
    reply = await rls(client).ShouldRateLimit(request(d))
    assert (reply.overall_code, body(reply)["code"]) == (OVER, "invalid_request")
    assert "`model` twice" in body(reply)["message"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("", 0), ("0", 0), ("256", 256), ("1000.000000", 1000), ("7.", 7), ("12.5", None), ("-3", None),
     ("1e3", None), ("٣", None), (" 5", None), (str(10**12), 10**12), (str(10**12 + 1), None),
     ("0" * 20 + "7", 7), ("9" * 5000, None)],
)  # fmt: skip
def test_token_estimate_accepts_whole_numbers_as_envoy_writes_them(text: str, value: int | None) -> None:
    assert token_estimate(text) == value


def test_envoy_settings_reach_worker_processes_unchanged() -> None:
    """--workers hands settings to its processes as RATELIMITD_* variables."""
    s = Settings.load(
        env={},
        envoy_domains=("llm", "edge"),
        envoy_unknown_domain="allow",
        envoy_descriptor_keys={"api_key": "authorization", "model": "x-model"},
    )
    again = Settings.load(env=s.to_env())
    assert (again.envoy_domains, again.envoy_unknown_domain, again.envoy_keys) == (
        ("llm", "edge"),
        "allow",
        {**ENVOY_DESCRIPTOR_ROLES, "api_key": "authorization", "model": "x-model"},
    )


async def test_entry_bytes_that_are_not_utf8_are_refused_not_an_error(client: Client, project: Project) -> None:
    """Envoy copies header bytes as they are; a parse error would let a fail-open Envoy wave them through."""
    call: Any = client.channel.unary_unary(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        response_deserializer=rls_pb2.RateLimitResponse.FromString,
    )

    def raw(message: Any, placeholder: str) -> bytes:
        data: bytes = message.SerializeToString()
        assert data.count(placeholder.encode()) == 1
        return data.replace(placeholder.encode(), b"\xff\xfe")

    bad_key = await call(raw(request(desc(api_key="Bearer XX", model=M)), "XX"))
    assert (bad_key.overall_code, body(bad_key)["code"]) == (OVER, "invalid_api_key")
    bad_model = await call(raw(request(desc(api_key=project.key, model="YY")), "YY"))
    assert (bad_model.overall_code, body(bad_model)["code"]) == (OVER, "model_not_found")
    # The rest of the request survives: entries, order, and hits_addend.
    fine = await call(
        raw(request(desc(api_key=project.key, model=M2, note="ZZ"), desc(3, api_key=project.key, model=M2)), "ZZ")
    )
    assert fine.overall_code == OK and [s.limit_remaining for s in fine.statuses] == [1, 1]  # 5 - 1 - 3
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call(raw(request(desc(api_key=project.key, model=M), domain="QQ"), "QQ"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "domain '\ufffd\ufffd'" in (e.value.details() or "")
