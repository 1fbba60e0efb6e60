"""Usage counted per minute and rolled up into hours and days (issue 9, item 6).

Decisions and reports write only the current minute; rollup.lua adds finished
minutes to the hours and days, and queries add the minutes not rolled yet, so
every answer is exact whenever the rollup runs, and however often."""

from __future__ import annotations

import asyncio
import random

import redis.asyncio

from ratelimitd.app import App
from ratelimitd.core import keys
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client, Clock
from tests.control import ts, usd

M = "llama-3.1-8b-instant"


async def totals(
    client: Client, org: str, start_ms: int, granularity: upb.Granularity.ValueType
) -> tuple[int, int, int, float, int]:
    u = await usage_pb2_grpc.UsageServiceStub(client.channel).GetUsage(
        upb.GetUsageRequest(
            organization_id=org,
            start_time=ts(start_ms),
            end_time=ts(start_ms + 3 * 86_400_000),
            granularity=granularity,
        ),
        metadata=AUTH,
    )
    rows = (sum(r.requests for r in u.rows), sum(r.input_tokens for r in u.rows))
    assert rows == (u.total.requests, u.total.input_tokens)
    refused = sum(u.total.refusals.values())
    return u.total.requests, u.total.input_tokens, u.total.reported, u.total.spend_usd_micros, refused


async def test_hours_and_days_are_exact_before_during_and_after_the_rollup(
    client: Client, clock: Clock, app: App, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", [(M, "requests", "minute", 10**6)])
    _, key = await client.project(org, "a", [(M, "requests", "minute", 2)])
    await usage_pb2_grpc.UsageServiceStub(client.channel).SetPrice(
        upb.SetPriceRequest(
            price=upb.Price(
                organization_id=org, model=M, input_usd_micros_per_million=usd(3), output_usd_micros_per_million=usd(3)
            )
        ),
        metadata=AUTH,
    )
    await clock.set(clock.now_s // 86400 * 86400 + 3000)  # the steps below cross an hour, not a day
    start_ms = int(clock.now_s) * 1000
    rng = random.Random(9)
    sent = [0, 0, 0, 0, 0]  # requests, input tokens, reports, micro-dollars, refusals
    for step in range(40):
        d = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
        if not d.allowed:
            sent[4] += 1
        else:
            inp = rng.randint(1, 1000)
            await client.decisions.ReportUsage(
                pb.ReportUsageRequest(api_key=key, request_id=d.request_id, input_tokens=inp)
            )
            sent[:4] = [sent[0] + 1, sent[1] + inp, sent[2] + 1, sent[3] + inp * 3]
        if step % 9 == 4:
            await app.rollup.roll(org)
        if step % 5 == 0:
            for granularity in (upb.GRANULARITY_MINUTE, upb.GRANULARITY_HOUR, upb.GRANULARITY_DAY):
                assert await totals(client, org, start_ms, granularity) == tuple(sent)
        await clock.advance(rng.randint(2, 40))
    assert sent[4] > 0  # some refused by the project's 2 per minute, counted too
    # Rolled twice at once, then again: nothing counted twice.
    await asyncio.gather(app.rollup.roll(org), app.rollup.roll(org))
    assert await app.rollup.roll(org) == 1  # one call: nothing left to roll
    # what the queries read now is in the hour and day hashes: two hours, one day
    prefix = keys.OrgKeys(org).prefix
    assert len([k async for k in redis_client.scan_iter(prefix + "u:h:*")]) == 2
    assert len([k async for k in redis_client.scan_iter(prefix + "u:d:*")]) == 1
    for granularity in (upb.GRANULARITY_MINUTE, upb.GRANULARITY_HOUR, upb.GRANULARITY_DAY):
        assert await totals(client, org, start_ms, granularity) == tuple(sent)


async def test_minutes_are_kept_hours_not_days(client: Client, redis_client: redis.asyncio.Redis) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    _, key = await client.project(org, "a")
    await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
    minutes = [k async for k in redis_client.scan_iter(keys.OrgKeys(org).prefix + "u:m:*")]
    assert len(minutes) == 1
    assert 0 < await redis_client.ttl(minutes[0]) <= 6 * 3600 + 60
    hours = [k async for k in redis_client.scan_iter(keys.OrgKeys(org).prefix + "u:[hd]:*")]
    assert hours == []  # written by the rollup only


async def test_a_large_minute_is_rolled_a_slice_of_keys_at_a_time_and_stays_exact(
    client: Client, clock: Clock, app: App, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", [(M, "requests", "minute", 10**6)])
    keys_ = [(await client.project(org, f"p{i}"))[1] for i in range(5)]
    await clock.set(clock.now_s // 3600 * 3600 + 600)
    start_ms = int(clock.now_s) * 1000
    sent = [0, 0, 0, 0, 0]  # requests, input tokens, reports, micro-dollars, refusals
    for n, key in enumerate(keys_ * 2):
        d = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
        await client.decisions.ReportUsage(pb.ReportUsageRequest(api_key=key, request_id=d.request_id, input_tokens=n))
        sent[:3] = [sent[0] + 1, sent[1] + n, sent[2] + 1]
    await clock.advance(60)
    marker = keys.OrgKeys(org).usage_rollup_marker
    markers = []
    # a "large" minute here: more than 4 fields, so two usage ids per call
    while not await app.rollup.step(org, whole_minute_fields=4, ids_per_call=2):
        markers.append(str(await redis_client.get(marker)))
        for granularity in (upb.GRANULARITY_HOUR, upb.GRANULARITY_DAY):
            assert await totals(client, org, start_ms, granularity) == tuple(sent)
    assert [m.split(":")[1] for m in markers] == ["2", "4"]  # inside the minute, then done
    for granularity in (upb.GRANULARITY_MINUTE, upb.GRANULARITY_HOUR, upb.GRANULARITY_DAY):
        assert await totals(client, org, start_ms, granularity) == tuple(sent)
