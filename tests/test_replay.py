"""Request ids are bound to their caller: a replay only for the same key, model(s) and costs;
an unauthenticated call writes nothing; a revoked key reports only what it was admitted for.
Against a real Valkey (issue 8, item 1)."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
import redis.asyncio
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import AUTH, Client
from tests.control import snapshot

M = "llama-3.1-8b-instant"
R = pb.ReportUsageResponse
OK, OVER = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
LIMITS = [("*", "requests", "minute", 100), ("*", "tokens", "minute", 10_000)]


async def check(client: Client, key: str, model: str = M, **kw: int | str) -> pb.CheckResponse:
    return await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=model, **kw))  # type: ignore[arg-type]


async def report(client: Client, key: str, request_id: str, inp: int, model: str = "") -> pb.ReportUsageResponse:
    return await client.decisions.ReportUsage(
        pb.ReportUsageRequest(api_key=key, request_id=request_id, model=model, input_tokens=inp, status_code=200)
    )


def org_requests_left(reply: pb.CheckResponse) -> int:
    (b,) = [b for b in reply.buckets if (b.scope, b.metric, b.window) == (pb.SCOPE_ORGANIZATION, "requests", "minute")]
    return b.remaining


def tampered(key: str) -> str:
    """The same key with its last character changed: same key id, same organization."""
    return key[:-1] + ("a" if key[-1] != "a" else "b")


async def new_key(client: Client, org: str, project: str) -> tuple[str, str]:
    k = await client.projects.CreateApiKey(
        apb.CreateApiKeyRequest(organization_id=org, project_id=project, name="another"), metadata=AUTH
    )
    return k.key.id, k.secret


async def revoked_key(client: Client, org: str, project: str) -> str:
    key_id, secret = await new_key(client, org, project)
    await client.projects.RevokeApiKey(apb.RevokeApiKeyRequest(organization_id=org, key_id=key_id), metadata=AUTH)
    return secret


async def deleted_projects_key(client: Client, org: str) -> str:
    pid, secret = await client.project(org, "doomed")
    await client.projects.DeleteProject(apb.DeleteProjectRequest(organization_id=org, project_id=pid), metadata=AUTH)
    return secret


async def test_a_stored_answer_is_replayed_only_to_an_authenticated_caller(client: Client) -> None:
    org = await client.org("o", LIMITS)
    pid, a = await client.project(org, "p")
    first = await check(client, a, tokens=10, request_id="r1")
    assert first.allowed and first.project_id == pid
    for intruder in [tampered(a), await revoked_key(client, org, pid), await deleted_projects_key(client, org)]:
        reply = await check(client, intruder, model="other-model", tokens=5000, request_id="r1")
        assert reply.reason == pb.REASON_INVALID_API_KEY and not reply.allowed and not reply.replayed
        assert reply.project_id == "" and reply.organization_id == ""
    again = await check(client, a, tokens=10, request_id="r1")
    assert again.allowed and again.replayed and org_requests_left(again) == 99


async def test_a_request_id_reused_by_another_caller_or_for_another_request_is_refused(client: Client) -> None:
    org = await client.org("o", LIMITS)
    pid, a = await client.project(org, "p")
    _, a2 = await new_key(client, org, pid)  # another key of the same project
    _, b = await client.project(org, "q")
    assert (await check(client, a, tokens=10, request_id="r1")).allowed
    reuses = [
        (b, M, 10, 1),  # another project's key
        (a2, M, 10, 1),  # another key of the same project
        (a, "other-model", 10, 1),
        (a, M, 11, 1),
        (a, M, 10, 2),
    ]
    for key, model, tokens, requests in reuses:
        reply = await check(client, key, model=model, tokens=tokens, requests=requests, request_id="r1")
        assert (reply.allowed, reply.replayed, reply.reason) == (False, False, pb.REASON_REQUEST_ID_REUSED)
        assert "r1" in reply.message and "new request id" in reply.message
        assert reply.retry_after_ms == 0 and "retry-after" not in reply.headers
    # none of them was charged, and the first caller's retry still gets its first answer
    assert org_requests_left(await check(client, b, requests=1)) == 98
    again = await check(client, a, tokens=10, request_id="r1")
    assert again.allowed and again.replayed and org_requests_left(again) == 99


async def test_a_trusted_caller_replays_only_its_own_project_decisions(client: Client) -> None:
    org = await client.org("o", LIMITS)
    pid, a = await client.project(org, "p")
    qid, _ = await client.project(org, "q")

    async def by_project(project: str, request_id: str) -> pb.CheckResponse:
        ref = pb.ProjectRef(organization_id=org, project_id=project)
        return await client.decisions.CheckAndConsume(
            pb.CheckRequest(project=ref, model=M, request_id=request_id), metadata=AUTH
        )

    assert (await by_project(pid, "t1")).allowed
    assert (await by_project(pid, "t1")).replayed
    assert (await by_project(qid, "t1")).reason == pb.REASON_REQUEST_ID_REUSED
    assert (await check(client, a, request_id="t1")).reason == pb.REASON_REQUEST_ID_REUSED  # a key is another caller


async def test_an_unauthenticated_call_writes_nothing(client: Client, redis_client: redis.asyncio.Redis) -> None:
    org = await client.org("o", LIMITS)
    pid, a = await client.project(org, "p")
    intruders = [tampered(a), await revoked_key(client, org, pid), await deleted_projects_key(client, org)]
    before = await snapshot(redis_client)
    for intruder in intruders:
        for request_id in ["fresh", ""]:
            reply = await check(client, intruder, request_id=request_id)
            assert reply.reason == pb.REASON_INVALID_API_KEY
    assert await snapshot(redis_client) == before
    # the owner's own call with that id is decided, not refused as a replay of the intruder's
    owner = await check(client, a, request_id="fresh")
    assert owner.allowed and not owner.replayed


async def test_a_revoked_key_reports_only_what_it_was_admitted_for(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", LIMITS)
    pid, a = await client.project(org, "p")
    key_id, admitted_then_revoked = await new_key(client, org, pid)
    assert (await check(client, admitted_then_revoked, tokens=1000, request_id="ran")).allowed
    assert (await check(client, a, tokens=1000, request_id="not-its-own")).allowed
    await client.projects.RevokeApiKey(apb.RevokeApiKeyRequest(organization_id=org, key_id=key_id), metadata=AUTH)
    doomed = await deleted_projects_key(client, org)

    # the request it was admitted for really ran: its usage is reconciled
    done = await report(client, admitted_then_revoked, "ran", 400)
    assert (done.result, done.token_delta) == (R.RESULT_RECONCILED, -600)
    # anything else is refused and charges nothing
    before = await snapshot(redis_client)
    for key, request_id, model in [
        (admitted_then_revoked, "never-checked", M),
        (admitted_then_revoked, "not-its-own", ""),
        (doomed, "never-checked", M),
        (tampered(a), "not-its-own", ""),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await report(client, key, request_id, 5000, model)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "revoked" in (e.value.details() or "")
    assert await snapshot(redis_client) == before
    assert (await report(client, a, "not-its-own", 1000)).result == R.RESULT_RECONCILED


async def test_through_envoy_another_callers_request_id_is_refused_and_its_reservation_kept(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    """Envoy decides every call anew, but an end user cannot take over another project's request
    id: its reservation stays, so that project's usage is still reconciled."""
    org = await client.org("o", LIMITS)
    _, a = await client.project(org, "p")
    _, b = await client.project(org, "q")
    stub = rls_pb2_grpc.RateLimitServiceStub(client.channel)

    def call(key: str, request_id: str, tokens: str = "100", phase: str = "", hits: int | None = None) -> Any:
        d = common_pb.RateLimitDescriptor(
            entries=[
                common_pb.RateLimitDescriptor.Entry(key=k, value=v)
                for k, v in {"api_key": key, "model": M, "tokens": tokens, "request_id": request_id}.items()
            ]
            + ([common_pb.RateLimitDescriptor.Entry(key="phase", value=phase)] if phase else [])
        )
        if hits is not None:
            d.hits_addend.value = hits
        return stub.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="ratelimitd", descriptors=[d]))

    assert (await call(a, "env-1")).overall_code == OK
    before = await snapshot(redis_client)
    taken = await call(b, "env-1", tokens="5")
    assert taken.overall_code == OVER and json.loads(taken.raw_body)["error"]["code"] == "request_id_reused"
    assert dict(taken.dynamic_metadata)["http_status"] == "409"
    assert {k: v for k, v in (await snapshot(redis_client)).items() if k.endswith(":s") or ":r:" in k} == {
        k: v for k, v in before.items() if k.endswith(":s") or ":r:" in k
    }  # the decision state (buckets) and the request records
    assert (await call(a, "env-1", phase="usage", hits=40)).overall_code == OK
    assert (await report(client, a, "env-1", 1)).result == R.RESULT_DUPLICATE  # a's report was reconciled
