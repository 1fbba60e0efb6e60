"""Every kind of configuration change takes effect at the very next decision.

Decisions cache the resolved configuration of each (project, model) in the
organization's state hash (lib.lua); each test first has a decision admitted, so
the cache is filled, then changes the configuration through the API and checks
the next decision sees it."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio

from ratelimitd.core import keys
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client
from tests.control import usd

M = "llama-3.1-8b-instant"
M2 = "llama-3.3-70b-versatile"


async def check(client: Client, key: str, model: str = M, tokens: int = 0) -> pb.CheckResponse:
    return await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=model, tokens=tokens))


def limit_of(reply: pb.CheckResponse, scope: int, metric: str = "requests") -> int | None:
    found = [b.limit for b in reply.buckets if b.scope == scope and b.metric == metric and b.window == "minute"]
    return found[0] if found else None


async def cached(client: Client) -> tuple[str, str, str]:
    """An organization and a project whose (project, M) configuration is cached."""
    org = await client.org("o", [(M, "requests", "minute", 100), (M2, "requests", "minute", 100)])
    pid, key = await client.project(org, "a")
    assert (await check(client, key)).allowed and (await check(client, key, M2)).allowed
    return org, pid, key


async def test_organization_limits(client: Client) -> None:
    org, _, key = await cached(client)
    await client.orgs.SetOrganizationLimits(
        apb.SetOrganizationLimitsRequest(
            organization_id=org, set=[apb.Limit(model=M, metric="requests", window="minute", limit=1)]
        ),
        metadata=AUTH,
    )
    refused = await check(client, key)  # one already used of a new limit of 1
    assert refused.reason == pb.REASON_ORGANIZATION_LIMIT and limit_of(refused, pb.SCOPE_ORGANIZATION) == 1
    await client.orgs.SetOrganizationLimits(
        apb.SetOrganizationLimitsRequest(
            organization_id=org, clear=[apb.LimitKey(model=M, metric="requests", window="minute")]
        ),
        metadata=AUTH,
    )
    assert (await check(client, key)).reason == pb.REASON_MODEL_NOT_AVAILABLE


async def test_project_limits(client: Client) -> None:
    org, pid, key = await cached(client)
    await client.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(
            organization_id=org, project_id=pid, set=[apb.Limit(model=M, metric="requests", window="minute", limit=7)]
        ),
        metadata=AUTH,
    )
    reply = await check(client, key)
    assert reply.allowed and limit_of(reply, pb.SCOPE_PROJECT) == 7
    await client.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(
            organization_id=org, project_id=pid, clear=[apb.LimitKey(model=M, metric="requests", window="minute")]
        ),
        metadata=AUTH,
    )
    assert limit_of(await check(client, key), pb.SCOPE_PROJECT) is None


@pytest.mark.parametrize("scope", ["organization", "project"])
async def test_model_permissions(client: Client, scope: str) -> None:
    org, pid, key = await cached(client)
    await client.models.SetModelPermissions(
        apb.SetModelPermissionsRequest(
            organization_id=org,
            project_id=pid if scope == "project" else "",
            policy=apb.ModelPolicy(access=apb.MODEL_ACCESS_BLOCK_LIST, models=[M]),
        ),
        metadata=AUTH,
    )
    assert (await check(client, key)).reason == pb.REASON_MODEL_BLOCKED
    assert (await check(client, key, M2)).allowed


async def test_spend_limits_and_prices(client: Client) -> None:
    org, pid, key = await cached(client)
    stub = usage_pb2_grpc.UsageServiceStub(client.channel)
    await stub.SetSpendLimit(
        upb.SetSpendLimitRequest(organization_id=org, project_id=pid, limit_usd_micros=usd(0)), metadata=AUTH
    )
    assert (await check(client, key)).reason == pb.REASON_SPEND_LIMIT
    await stub.SetSpendLimit(
        upb.SetSpendLimitRequest(organization_id=org, project_id=pid, limit_usd_micros=usd(10)), metadata=AUTH
    )
    assert (await check(client, key, tokens=1000)).allowed  # no price yet: nothing reserved
    await stub.SetPrice(
        upb.SetPriceRequest(
            price=upb.Price(
                organization_id=org, model=M, input_usd_micros_per_million=usd(1), output_usd_micros_per_million=usd(3)
            )
        ),
        metadata=AUTH,
    )
    assert (await check(client, key, tokens=1000)).allowed  # reserves 1000 x $3 per million
    spend = await stub.GetSpend(upb.GetSpendRequest(organization_id=org), metadata=AUTH)
    assert [p.spend_usd_micros for p in spend.projects if p.project_id == pid] == [usd(0.003)]


async def test_project_deletion(client: Client, redis_client: redis.asyncio.Redis) -> None:
    org, pid, key = await cached(client)
    ref = pb.CheckRequest(project=pb.ProjectRef(organization_id=org, project_id=pid), model=M)
    assert (await client.decisions.CheckAndConsume(ref, metadata=AUTH)).allowed
    state = keys.OrgKeys(org).state
    assert any(pid in str(f) for f in await redis_client.hkeys(state))
    await client.projects.DeleteProject(apb.DeleteProjectRequest(organization_id=org, project_id=pid), metadata=AUTH)
    # its buckets and cached configuration leave the organization's state hash with it
    assert not any(pid in str(f) for f in await redis_client.hkeys(state))
    assert (await check(client, key)).reason == pb.REASON_INVALID_API_KEY
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.decisions.CheckAndConsume(ref, metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_key_revocation(client: Client) -> None:
    org, pid, key = await cached(client)
    (info,) = (
        await client.projects.ListApiKeys(apb.ListApiKeysRequest(organization_id=org, project_id=pid), metadata=AUTH)
    ).keys
    await client.projects.RevokeApiKey(apb.RevokeApiKeyRequest(organization_id=org, key_id=info.id), metadata=AUTH)
    assert (await check(client, key)).reason == pb.REASON_INVALID_API_KEY
