"""The decision state hash's values are packed doubles (lib.lua): a value that is not
one (written by another version, or damaged) is void, never a script error.

A bucket state of the wrong size reads as an empty bucket (as a state of another
layout does), and a cached configuration of the wrong size is resolved afresh from
the source records, so the decision after it is exact."""

from __future__ import annotations

import redis.asyncio

from ratelimitd.core import keys
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import Client

M = "llama-3.1-8b-instant"


async def test_a_state_value_that_is_not_packed_doubles_is_void(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", [(M, "requests", "minute", 10)])
    project, key = await client.project(org, "a", [(M, "requests", "minute", 5)])
    for _ in range(3):
        assert (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))).allowed
    state = keys.OrgKeys(org).state
    # text, as the state was once written, and a configuration cut short
    await redis_client.hset(state, mapping={f"o:{M}": "1764640000000000,3,0,0,0", f"c:{project}:{M}": "7;0;"})
    reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
    assert reply.allowed
    remaining = {b.scope: (b.limit, b.remaining) for b in reply.buckets}
    # the organization's bucket starts again from empty; the project's kept its 3
    assert remaining == {pb.SCOPE_ORGANIZATION: (10, 9), pb.SCOPE_PROJECT: (5, 1)}
