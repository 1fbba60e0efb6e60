"""ShouldRateLimit remembers how it read a request-time call (engine/edge.py RequestCache):
a repeat is still decided and charged anew, a revoked key stops at once, and the memory is bounded."""

from __future__ import annotations

import pytest
from envoy.service.ratelimit.v3 import rls_pb2

from ratelimitd.api.envoy import request_key
from ratelimitd.engine.decisions import Caller, Item
from ratelimitd.engine.edge import EdgeRequest, RequestCache
from ratelimitd.v1 import admin_pb2 as apb
from tests.conftest import AUTH, Client
from tests.test_envoy_rls import M2, OK, OVER, body, desc, request, rls

CALLER = Caller("org_a", "key_a", "hash", "")


def read(n: int, request_id: str = "", caller: Caller | None = CALLER) -> EdgeRequest:
    return EdgeRequest(caller, request_id, [Item(f"m{n}", 1, 0)], [0])


async def test_a_repeated_descriptor_set_is_decided_and_charged_every_time(client: Client) -> None:
    org = await client.org("o", [(M2, "requests", "minute", 5)])
    _, key = await client.project(org, "a")
    same = request(desc(api_key=key, model=M2))
    remaining = []
    for _ in range(3):
        reply = await rls(client).ShouldRateLimit(same)
        assert reply.overall_code == OK
        remaining.append(reply.statuses[0].limit_remaining)
    assert remaining == [4, 3, 2]
    # One hits_addend more is another request: read anew, charged its own cost.
    reply = await rls(client).ShouldRateLimit(request(desc(2, api_key=key, model=M2)))
    assert reply.statuses[0].limit_remaining == 0


async def test_a_key_revoked_after_its_calls_were_remembered_is_refused_at_once(client: Client) -> None:
    org = await client.org("o", [(M2, "requests", "minute", 100)])
    pid, key = await client.project(org, "a")
    same = request(desc(api_key=key, model=M2))
    assert (await rls(client).ShouldRateLimit(same)).overall_code == OK
    listed = await client.projects.ListApiKeys(
        apb.ListApiKeysRequest(organization_id=org, project_id=pid), metadata=AUTH
    )
    await client.projects.RevokeApiKey(
        apb.RevokeApiKeyRequest(organization_id=org, key_id=listed.keys[0].id), metadata=AUTH
    )
    reply = await rls(client).ShouldRateLimit(same)
    assert (reply.overall_code, body(reply)["code"]) == (OVER, "invalid_api_key")


def test_the_oldest_reading_goes_first_once_the_cache_is_full() -> None:
    cache = RequestCache(size=3)
    for n in range(4):
        cache.put((n,), read(n))
    assert len(cache) == 3
    assert cache.get((0,)) is None
    assert [cache.get((n,)) for n in (1, 2, 3)] == [read(1), read(2), read(3)]


@pytest.mark.parametrize(
    ("what", "key", "reading"),
    [
        ("a request id: new on every call", ("k",), read(1, request_id="req_1")),
        ("a malformed key", ("k",), read(1, caller=None)),
        ("a long value", ("x" * 257,), read(1)),
    ],
)
def test_what_differs_per_call_or_is_large_is_not_kept(
    what: str, key: tuple[object, ...], reading: EdgeRequest
) -> None:
    cache = RequestCache(size=8, max_value_chars=256)
    cache.put(key, reading)
    assert cache.get(key) is None, what
    assert len(cache) == 0


def test_request_keys_tell_descriptor_boundaries_and_hits_apart() -> None:
    def key_of(*descriptors: object, hits: int = 1) -> tuple[object, ...]:
        return request_key(rls_pb2.RateLimitRequest(descriptors=list(descriptors)).descriptors, hits)

    one = key_of(desc(api_key="k", model="m"))
    assert key_of(desc(api_key="k"), desc(model="m")) != one
    assert key_of(desc(api_key="k", model="m"), hits=2) != one
    assert key_of(desc(0, api_key="k", model="m")) != one
    assert key_of(desc(api_key="k", model="m")) == one
