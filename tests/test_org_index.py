"""The organization index (``rl:orgs``) and the records it names live in different slots on a
cluster, so creating an organization is two writes: the record (with its audit event), then the
index. A crash between them must leave nothing anyone can see, and a start of ratelimitd removes
what such a create left once it is old enough not to be a create still in flight."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.core import keys
from ratelimitd.engine.organizations import UNINDEXED_GRACE_MS
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import AUTH, Client, Storage, settings_for

M = "llama-3.1-8b-instant"


async def listed(client: Client) -> list[str]:
    reply = await client.orgs.ListOrganizations(apb.ListOrganizationsRequest(), metadata=AUTH)
    return [o.name for o in reply.organizations]


async def keys_of(r: redis.asyncio.Redis, org_id: str) -> list[str]:
    return [k async for k in r.scan_iter(match=keys.org_prefix(org_id) + "*")]


async def crash_before_the_index(r: redis.asyncio.Redis, org_id: str, *, age_ms: int) -> None:
    """What a create that died after its first write leaves: the record, no index entry."""
    await r.hdel(keys.ORGANIZATIONS, org_id)
    await r.hset(keys.OrgKeys(org_id).record, "c", int(time.time() * 1000) - age_ms)


async def test_a_create_that_died_before_the_index_is_invisible_and_removed_at_the_next_start(
    storage: Storage, client: Client, redis_client: redis.asyncio.Redis
) -> None:
    kept = await client.org("kept", [(M, "requests", "minute", 5)])
    _, key = await client.project(kept, "a")
    lost = await client.org("lost", [])
    in_flight = await client.org("in-flight", [])
    await crash_before_the_index(redis_client, lost, age_ms=UNINDEXED_GRACE_MS + 60_000)
    await crash_before_the_index(redis_client, in_flight, age_ms=1000)
    assert await keys_of(redis_client, lost)  # the record and its audit event
    assert await listed(client) == ["kept"]

    restarted = App(settings_for(storage.url))
    await restarted.start()
    try:
        deadline = time.monotonic() + 20  # a hang guard: the sweep runs in the background
        while await keys_of(redis_client, lost):
            assert time.monotonic() < deadline, "the start did not remove the unindexed record"
            await asyncio.sleep(0.02)
    finally:
        await restarted.stop(0)
    assert await keys_of(redis_client, in_flight)  # too young: it may be a create still running
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.orgs.GetOrganization(apb.GetOrganizationRequest(organization_id=lost), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert await listed(client) == ["kept"]
    assert (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))).allowed


async def test_an_index_entry_without_its_record_is_not_listed(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    await client.org("real", [])
    # the other half-state: a sweep removed a record whose create then wrote the index late
    await redis_client.hset(keys.ORGANIZATIONS, "org_zzzzzzzzzzzz", "ghost")
    assert await listed(client) == ["real"]
