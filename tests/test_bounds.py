"""Every count and batch is bounded at the API, and no script stops half-way through its
writes. Against a real Valkey (issue 8, item 7)."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.core.errors import InvalidArgument
from ratelimitd.engine.decisions import Caller, Item
from ratelimitd.engine.limits import MAX_LIMIT, MAX_LIMITS_PER_CALL, MAX_LIMITS_PER_SCOPE
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client, Clock
from tests.control import snapshot, ts, usd

M = "llama-3.1-8b-instant"
R = pb.ReportUsageResponse
INT64_MAX = 2**63 - 1


def many_limits(n: int, value: int = 1) -> list[apb.Limit]:
    return [apb.Limit(model=f"m{i}", metric="requests", window="minute", limit=value) for i in range(n)]


def many_clears(n: int) -> list[apb.LimitKey]:
    return [apb.LimitKey(model=f"m{i}", metric="requests", window="minute") for i in range(n)]


async def refused(call: object, words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call  # type: ignore[misc]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert words in (e.value.details() or ""), e.value.details()


async def test_ten_thousand_limits_in_one_call_are_invalid_argument_and_change_nothing(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", [("*", "requests", "minute", 100)])
    pid, _ = await client.project(org, "p")
    before = await snapshot(redis_client)
    bound = f"at most {MAX_LIMITS_PER_CALL}"
    await refused(
        client.orgs.SetOrganizationLimits(
            apb.SetOrganizationLimitsRequest(organization_id=org, set=many_limits(10_000)), metadata=AUTH
        ),
        bound,
    )
    await refused(
        client.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(organization_id=org, project_id=pid, set=many_limits(10_000)), metadata=AUTH
        ),
        bound,
    )
    await refused(
        client.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(organization_id=org, project_id=pid, clear=many_clears(10_000)),
            metadata=AUTH,
        ),
        bound,
    )
    assert await snapshot(redis_client) == before
    # the bound itself is accepted, for the organization and the project alike
    await client.orgs.SetOrganizationLimits(
        apb.SetOrganizationLimitsRequest(organization_id=org, set=many_limits(MAX_LIMITS_PER_CALL, 5)), metadata=AUTH
    )
    reply = await client.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(organization_id=org, project_id=pid, set=many_limits(MAX_LIMITS_PER_CALL)),
        metadata=AUTH,
    )
    assert len(reply.custom) == MAX_LIMITS_PER_CALL


async def test_a_scope_holds_a_bounded_number_of_limits(client: Client, redis_client: redis.asyncio.Redis) -> None:
    org = await client.org("o", [("*", "requests", "minute", 100)])
    pid, _ = await client.project(org, "p")
    calls = MAX_LIMITS_PER_SCOPE // MAX_LIMITS_PER_CALL

    def batch(i: int) -> list[apb.Limit]:
        return [
            apb.Limit(model=f"b{i}-{j}", metric="requests", window="minute", limit=1)
            for j in range(MAX_LIMITS_PER_CALL)
        ]

    for i in range(calls):
        await client.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(organization_id=org, project_id=pid, set=batch(i)), metadata=AUTH
        )
        org_batch = batch(i)[: -1 if i == calls - 1 else None]  # the org holds its '*' limit too
        await client.orgs.SetOrganizationLimits(
            apb.SetOrganizationLimitsRequest(organization_id=org, set=org_batch), metadata=AUTH
        )
    before = await snapshot(redis_client)
    one_more = [apb.Limit(model="extra", metric="requests", window="minute", limit=1)]
    words = f"at most {MAX_LIMITS_PER_SCOPE}"
    await refused(
        client.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(organization_id=org, project_id=pid, set=one_more), metadata=AUTH
        ),
        words,
    )
    await refused(
        client.orgs.SetOrganizationLimits(
            apb.SetOrganizationLimitsRequest(organization_id=org, set=one_more), metadata=AUTH
        ),
        words,
    )
    assert await snapshot(redis_client) == before
    # replacing one (same field) or clearing stays possible at the bound
    same = [apb.Limit(model="b0-0", metric="requests", window="minute", limit=0)]
    await client.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(organization_id=org, project_id=pid, set=same), metadata=AUTH
    )


async def test_items_per_decision_are_bounded(app: App, client: Client) -> None:
    org = await client.org("o", [("*", "requests", "minute", 100)])
    pid, _ = await client.project(org, "p")
    with pytest.raises(InvalidArgument, match="at most 64"):
        await app.decider.check_items(Caller(org, "", "", pid), [Item(f"m{i}", 1, 0) for i in range(65)])


async def report(client: Client, key: str, request_id: str, inp: int, out: int, cached: int = 0) -> R:
    return await client.decisions.ReportUsage(
        pb.ReportUsageRequest(
            api_key=key, request_id=request_id, model=M, input_tokens=inp, output_tokens=out, cached_tokens=cached,
            status_code=200,
        )
    )  # fmt: skip


async def test_int64_counts_are_invalid_argument_charge_nothing_and_a_retry_is_exact(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", [(M, "tokens", "minute", 10_000)])
    _, key = await client.project(org, "p")
    d = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, tokens=1000, request_id="r"))
    assert d.allowed
    before = await snapshot(redis_client)
    for inp, out, cached, words in [
        (INT64_MAX, 0, 0, f"input_tokens is {INT64_MAX}; at most {MAX_LIMIT}"),
        (0, INT64_MAX, 0, f"output_tokens is {INT64_MAX}; at most {MAX_LIMIT}"),
        (INT64_MAX, INT64_MAX, INT64_MAX, "at most"),
        (-(2**63), 0, 0, "must be 0 or more"),
    ]:
        await refused(report(client, key, "r", inp, out, cached), words)
    assert await snapshot(redis_client) == before
    done = await report(client, key, "r", 300, 200)
    assert (done.result, done.token_delta) == (R.RESULT_RECONCILED, -500)
    assert (await report(client, key, "r", 300, 200)).result == R.RESULT_DUPLICATE


async def test_reports_at_the_bounds_are_applied_whole_with_any_price(client: Client, clock: Clock) -> None:
    """Spend once went through HINCRBY when it happened to be whole: a huge whole spend (written by
    Lua as 1e+18) or a whole spend onto a fractional total failed after the buckets and the monthly
    spend were charged, and the retry charged them again."""
    org = await client.org("o", [(M, "tokens", "minute", MAX_LIMIT)])
    _, key = await client.project(org, "p")
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    price = upb.Price(
        organization_id=org,
        model=M,
        input_usd_micros_per_million=usd(0.5),
        output_usd_micros_per_million=usd(1_000_000),
    )
    await usage.SetPrice(upb.SetPriceRequest(price=price), metadata=AUTH)
    small = await report(client, key, "small", 1, 0)  # 0.5 micro-USD: the totals are fractional now
    whole = await report(client, key, "whole", 0, 1)  # 1,000,000 micro-USD
    huge = await report(client, key, "huge", 0, MAX_LIMIT)  # 10**18 micro-USD
    assert [r.result for r in (small, whole, huge)] == [R.RESULT_UNRESERVED] * 3
    for request_id in ("small", "whole", "huge"):
        assert (await report(client, key, request_id, 0, MAX_LIMIT)).result == R.RESULT_DUPLICATE
    spend = await usage.GetSpend(upb.GetSpendRequest(organization_id=org), metadata=AUTH)
    assert spend.organization.spend_usd_micros == pytest.approx(usd(1e12 + 1 + 0.5e-6))
    now_ms = int(clock.now_s * 1000)
    totals = await usage.GetUsage(
        upb.GetUsageRequest(
            organization_id=org, start_time=ts(now_ms - 86_400_000), end_time=ts(now_ms + 86_400_000),
            granularity=upb.GRANULARITY_DAY,
        ),
        metadata=AUTH,
    )  # fmt: skip
    assert totals.total.reported == 3 and totals.total.output_tokens == MAX_LIMIT + 1
    assert totals.total.spend_usd_micros == pytest.approx(usd(1e12 + 1 + 0.5e-6))


async def test_a_report_that_would_overflow_a_usage_counter_is_refused_whole(
    client: Client, clock: Clock, redis_client: redis.asyncio.Redis, app: App
) -> None:
    """HINCRBY fails past 2**63 - 1, after the buckets and the spend were charged. A day's counter
    of one key can get there (about 10**7 reports of 10**12 tokens): the report is checked first."""
    org = await client.org("o", [(M, "tokens", "minute", 10_000)])
    pid, key = await client.project(org, "p")
    price = upb.Price(
        organization_id=org, model=M, input_usd_micros_per_million=usd(1), output_usd_micros_per_million=usd(1)
    )
    await usage_pb2_grpc.UsageServiceStub(client.channel).SetPrice(upb.SetPriceRequest(price=price), metadata=AUTH)
    d = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, tokens=1000, request_id="r"))
    assert d.allowed
    now_s = int(clock.now_s)
    day = f"rl:{{{org}}}:u:d:{now_s - now_s % 86400}"
    # the day's counters of this (project, model, key): field "<usage id>", value
    # "<requests>,<reports>,<input>,<output>,<cached>,<spend>" (lib.lua)
    usage_id = await redis_client.hget(f"rl:{{{org}}}:ui", f"{pid}|{M}|key_{key[4:16]}")
    await redis_client.hset(day, str(usage_id), f"0,0,0,{2**62 - 10},0,0")
    before = await snapshot(redis_client)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await report(client, key, "r", 0, 10**6)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "usage counter out" in (e.value.details() or "") and "not recorded" in (e.value.details() or "")
    assert await snapshot(redis_client) == before
    done = await report(client, key, "r", 0, 5)  # still fits: recorded whole, exactly once
    assert (done.result, done.token_delta) == (R.RESULT_RECONCILED, -995)
    await clock.advance(60 - now_s % 60)  # the minute is over: rolled up into the day
    await app.rollup.roll(org)
    assert str(await redis_client.hget(day, str(usage_id))).split(",")[3] == str(2**62 - 5)
