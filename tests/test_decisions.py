"""CheckAndConsume behaviour against a real Valkey, with the manual clock."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.engine.decisions import Caller, Item
from ratelimitd.engine.outcomes import Outcome
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import AUTH, Client, Clock

M = "llama-3.1-8b-instant"


async def check(client: Client, key: str, model: str = M, **kw: int | str) -> pb.CheckResponse:
    return await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=model, **kw))  # type: ignore[arg-type]


def bucket(reply: pb.CheckResponse, scope: int, metric: str, window: str) -> pb.BucketStatus:
    (b,) = [b for b in reply.buckets if b.scope == scope and b.metric == metric and b.window == window]
    return b


async def bucket_keys(r: redis.asyncio.Redis) -> list[str]:
    """The bucket groups stored, as state-hash fields (lib.lua): "o:<model>", "p:<project>:<model>"."""
    fields: list[str] = []
    async for k in r.scan_iter("rl:{*}:s"):
        fields += [str(f) for f in await r.hkeys(k) if str(f).startswith(("o:", "p:"))]
    return sorted(fields)


async def test_org_refusal_leaves_project_buckets_untouched(client: Client, redis_client: redis.asyncio.Redis) -> None:
    org = await client.org("o", [(M, "requests", "minute", 10)])
    _, a = await client.project(org, "a", [(M, "requests", "minute", 10)])
    _, b = await client.project(org, "b")
    for _ in range(10):
        assert (await check(client, b)).allowed
    refused = await check(client, a)
    assert not refused.allowed and refused.reason == pb.REASON_ORGANIZATION_LIMIT
    assert bucket(refused, pb.SCOPE_PROJECT, "requests", "minute").remaining == 10
    assert not any(f.startswith("p:") for f in await bucket_keys(redis_client)), "project bucket was written"


async def test_project_refusal_leaves_org_bucket_untouched(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 10)])
    _, a = await client.project(org, "a", [(M, "requests", "minute", 5)])
    for _ in range(5):
        assert (await check(client, a)).allowed
    for _ in range(3):
        refused = await check(client, a)
        assert refused.reason == pb.REASON_PROJECT_LIMIT
        assert bucket(refused, pb.SCOPE_ORGANIZATION, "requests", "minute").remaining == 5


async def test_token_refusal_charges_no_request_bucket(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 10), (M, "tokens", "minute", 1000)])
    _, a = await client.project(org, "a")
    assert (await check(client, a, tokens=900)).allowed
    refused = await check(client, a, tokens=200)
    assert refused.reason == pb.REASON_ORGANIZATION_LIMIT
    assert refused.binding.metric == "tokens"
    assert bucket(refused, pb.SCOPE_ORGANIZATION, "requests", "minute").remaining == 9
    assert bucket(refused, pb.SCOPE_ORGANIZATION, "tokens", "minute").remaining == 100


async def test_request_larger_than_any_limit_is_413_and_not_retryable(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 10), (M, "tokens", "minute", 1000)])
    _, a = await client.project(org, "a", [(M, "tokens", "minute", 500)])
    reply = await check(client, a, tokens=600)
    assert reply.reason == pb.REASON_REQUEST_TOO_LARGE
    assert reply.binding.scope == pb.SCOPE_PROJECT and reply.binding.limit == 500
    assert "retry-after" not in reply.headers and reply.retry_after_ms == 0
    assert "Requested 600" in reply.message
    assert bucket(reply, pb.SCOPE_ORGANIZATION, "requests", "minute").remaining == 10


async def test_refill_is_continuous_and_retry_after_is_never_early(client: Client, clock: Clock) -> None:
    org = await client.org("o", [(M, "requests", "minute", 60)])
    _, a = await client.project(org, "a")
    for _ in range(60):
        assert (await check(client, a)).allowed
    refused = await check(client, a)
    assert refused.retry_after_ms == 1000  # one request per second refills
    assert refused.headers["retry-after"] == "1"
    await clock.advance(0.999)
    assert not (await check(client, a)).allowed
    await clock.advance(0.001)
    assert (await check(client, a)).allowed
    assert not (await check(client, a)).allowed
    await clock.advance(30)
    assert sum([(await check(client, a)).allowed for _ in range(40)]) == 30


async def test_reset_is_time_until_the_bucket_is_full(client: Client, clock: Clock) -> None:
    org = await client.org(
        "o", [(M, "requests", "minute", 60), (M, "requests", "day", 14400), (M, "tokens", "minute", 6000)]
    )
    _, a = await client.project(org, "a")
    reply = await check(client, a, tokens=3000)
    assert bucket(reply, pb.SCOPE_ORGANIZATION, "requests", "minute").reset_after_ms == 1000
    assert bucket(reply, pb.SCOPE_ORGANIZATION, "tokens", "minute").reset_after_ms == 30_000
    assert bucket(reply, pb.SCOPE_ORGANIZATION, "requests", "day").reset_after_ms == 6000
    assert reply.headers["x-ratelimit-limit-requests"] == "14400"  # requests report the day window
    assert reply.headers["x-ratelimit-remaining-requests"] == "14399"
    assert reply.headers["x-ratelimit-reset-requests"] == "6s"
    assert reply.headers["x-ratelimit-limit-tokens"] == "6000"  # tokens the minute window
    assert reply.headers["x-ratelimit-remaining-tokens"] == "3000"
    assert reply.headers["x-ratelimit-reset-tokens"] == "30s"
    assert "retry-after" not in reply.headers
    await clock.advance(12.5)
    reply = await check(client, a, tokens=0)
    assert bucket(reply, pb.SCOPE_ORGANIZATION, "tokens", "minute").reset_after_ms == 17_500
    assert bucket(reply, pb.SCOPE_ORGANIZATION, "tokens", "minute").remaining == 4250
    assert reply.headers["x-ratelimit-reset-tokens"] == "17.5s"


async def test_day_window_refills_at_its_own_rate(client: Client, clock: Clock) -> None:
    org = await client.org("o", [(M, "requests", "day", 100)])
    _, a = await client.project(org, "a")
    assert sum([(await check(client, a)).allowed for _ in range(101)]) == 100
    refused = await check(client, a)
    assert refused.retry_after_ms == 864_000
    assert refused.headers["retry-after"] == "864"
    assert refused.headers["x-ratelimit-reset-requests"] == "24h0m0s"
    await clock.advance(864)
    assert (await check(client, a)).allowed


async def test_project_limit_above_org_is_refused_naming_both_and_nothing_stored(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    pid, _ = await client.project(org, "a", [(M, "requests", "minute", 50)])
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(
                organization_id=org,
                project_id=pid,
                set=[apb.Limit(model=M, metric="tokens", window="minute", limit=10),
                     apb.Limit(model=M, metric="requests", window="minute", limit=120)],
            ),
            metadata=AUTH,
        )  # fmt: skip
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "120" in (e.value.details() or "") and "100" in (e.value.details() or "")
    limits = await client.projects.GetProjectLimits(
        apb.GetProjectLimitsRequest(organization_id=org, project_id=pid), metadata=AUTH
    )
    assert [(x.metric, x.limit) for x in limits.custom] == [("requests", 50)]


async def test_lowered_org_limit_wins_at_the_next_decision(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    pid, a = await client.project(org, "a", [(M, "requests", "minute", 80)])
    for _ in range(10):
        assert (await check(client, a)).allowed
    await client.orgs.SetOrganizationLimits(
        apb.SetOrganizationLimitsRequest(
            organization_id=org, set=[apb.Limit(model=M, metric="requests", window="minute", limit=12)]
        ),
        metadata=AUTH,
    )
    assert (await check(client, a)).allowed
    assert (await check(client, a)).allowed
    refused = await check(client, a)
    assert refused.reason == pb.REASON_ORGANIZATION_LIMIT and refused.binding.limit == 12
    limits = await client.projects.GetProjectLimits(
        apb.GetProjectLimitsRequest(organization_id=org, project_id=pid), metadata=AUTH
    )
    (eff,) = [x for x in limits.effective if x.metric == "requests" and x.window == "minute"]
    assert (eff.custom, eff.organization, eff.effective) == (80, 12, 12)


async def test_wildcard_limit_applies_per_model_without_its_own(client: Client) -> None:
    org = await client.org("o", [("*", "requests", "minute", 2), ("special", "requests", "minute", 5)])
    _, a = await client.project(org, "a")
    assert [(await check(client, a, model="m1")).allowed for _ in range(3)] == [True, True, False]
    assert [(await check(client, a, model="m2")).allowed for _ in range(3)] == [True, True, False]
    assert sum([(await check(client, a, model="special")).allowed for _ in range(7)]) == 5


async def test_retried_request_id_is_answered_the_same_and_charged_once(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 3)])
    _, a = await client.project(org, "a")
    first = await check(client, a, request_id="req-1")
    again = await check(client, a, request_id="req-1")
    assert first.allowed and again.allowed and again.replayed and not first.replayed
    assert again.request_id == "req-1"
    assert bucket(again, pb.SCOPE_ORGANIZATION, "requests", "minute").remaining == 2
    assert bucket(await check(client, a), pb.SCOPE_ORGANIZATION, "requests", "minute").remaining == 1


async def test_revoked_key_stops_at_the_very_next_decision(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    pid, a = await client.project(org, "a")
    assert (await check(client, a)).allowed
    keys = await client.projects.ListApiKeys(apb.ListApiKeysRequest(organization_id=org, project_id=pid), metadata=AUTH)
    (key,) = keys.keys
    assert a.startswith(key.prefix) and len(key.prefix) < len(a) and key.HasField("last_use_time")
    await client.projects.RevokeApiKey(apb.RevokeApiKeyRequest(organization_id=org, key_id=key.id), metadata=AUTH)
    reply = await check(client, a)
    assert reply.reason == pb.REASON_INVALID_API_KEY and not reply.allowed


async def test_api_key_is_stored_only_as_a_hash(client: Client, redis_client: redis.asyncio.Redis) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    _, secret = await client.project(org, "a")
    secret_part = secret[-32:]
    async for k in redis_client.scan_iter("*"):
        dump = str(await redis_client.dump(k))
        assert secret_part not in dump and secret not in dump


async def test_trusted_caller_decides_by_project_id(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 1)])
    pid, _ = await client.project(org, "a")
    ref = pb.ProjectRef(organization_id=org, project_id=pid)
    req = pb.CheckRequest(project=ref, model=M)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.decisions.CheckAndConsume(req)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await client.decisions.CheckAndConsume(req, metadata=AUTH)).allowed
    assert (await client.decisions.CheckAndConsume(req, metadata=AUTH)).reason == pb.REASON_ORGANIZATION_LIMIT
    missing = pb.CheckRequest(project=pb.ProjectRef(organization_id=org, project_id="proj_aaaaaaaaaaaa"), model=M)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.decisions.CheckAndConsume(missing, metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_items_of_one_decision_share_buckets_and_are_charged_all_or_none(client: Client, app: App) -> None:
    org = await client.org("o", [("*", "requests", "minute", 10), ("*", "tokens", "minute", 100)])
    pid, _ = await client.project(org, "a")
    caller = Caller(org, "", "", pid)
    d = await app.decider.check_items(caller, [Item("m1", 1, 60), Item("m1", 1, 50)])
    assert d.outcome is Outcome.TOO_LARGE  # 110 tokens together on one 100-token bucket
    d = await app.decider.check_items(caller, [Item("m1", 1, 60), Item("m2", 1, 40)])
    assert d.allowed and len(d.item_buckets) == 2
    assert [b.remaining for b in d.item_buckets[0]] == [9, 40] and [b.remaining for b in d.item_buckets[1]] == [9, 60]
    d = await app.decider.check_items(caller, [Item("m2", 1, 10), Item("m1", 1, 50)])
    assert d.outcome is Outcome.ORGANIZATION_LIMIT and d.binding is not None and d.binding.dimension.metric == "tokens"
    assert [b.remaining for b in d.item_buckets[0]] == [9, 60]  # m2 was not charged either
    d = await app.decider.check_items(caller, [Item("m2", 0, 0)])  # costs nothing: a pure check
    assert d.allowed and [b.remaining for b in d.item_buckets[0]] == [9, 60]


@pytest.mark.parametrize("forget", ["function_flush", "script_flush"])
async def test_scripts_are_reloaded_when_the_server_forgot_them(
    client: Client, redis_client: redis.asyncio.Redis, forget: str
) -> None:
    org = await client.org("o", [(M, "requests", "minute", 5)])
    _, a = await client.project(org, "a")
    assert (await check(client, a)).allowed
    # as after a restart without persistence or a failover to an empty node; the concurrent
    # calls all meet the missing library, load it and are decided exactly once each
    await getattr(redis_client, forget)()
    replies = await asyncio.gather(*(check(client, a) for _ in range(6)))
    assert sum(r.allowed for r in replies) == 4
