"""ReportUsage, usage queries, spend and request logs, against a real Valkey."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client, Clock
from tests.control import ts, usd

M = "llama-3.1-8b-instant"
R = pb.ReportUsageResponse


def usage_stub(client: Client) -> usage_pb2_grpc.UsageServiceAsyncStub:
    return usage_pb2_grpc.UsageServiceStub(client.channel)


async def check(client: Client, key: str, tokens: int = 0, request_id: str = "", model: str = M) -> pb.CheckResponse:
    return await client.decisions.CheckAndConsume(
        pb.CheckRequest(api_key=key, model=model, tokens=tokens, request_id=request_id)
    )


async def report(
    client: Client, key: str, request_id: str, inp: int, out: int, cached: int = 0, model: str = ""
) -> pb.ReportUsageResponse:
    return await client.decisions.ReportUsage(
        pb.ReportUsageRequest(
            api_key=key, request_id=request_id, model=model, input_tokens=inp, output_tokens=out,
            cached_tokens=cached, status_code=200, latency_ms=42,
        )
    )  # fmt: skip


def remaining(reply: pb.CheckResponse, scope: int, metric: str = "tokens", window: str = "minute") -> int:
    (b,) = [b for b in reply.buckets if (b.scope, b.metric, b.window) == (scope, metric, window)]
    return b.remaining


async def test_concurrent_check_report_pairs_leave_exactly_the_actual_usage(client: Client) -> None:
    org = await client.org(
        "o", [(M, "tokens", "minute", 10**6), (M, "tokens", "day", 10**7), (M, "requests", "minute", 10**4)]
    )
    _, key = await client.project(org, "a", [(M, "tokens", "minute", 500_000)])
    rng = random.Random(7)
    pairs = [(rng.randint(100, 5000), rng.randint(0, 6000)) for _ in range(60)]  # (estimate, actual)

    async def one(estimate: int, actual: int) -> R.Result.ValueType:
        decision = await check(client, key, tokens=estimate)
        assert decision.allowed
        rep = await report(client, key, decision.request_id, actual // 2, actual - actual // 2)
        assert rep.token_delta == actual - estimate
        return rep.result

    results = await asyncio.gather(*(one(e, a) for e, a in pairs))
    assert set(results) == {R.RESULT_RECONCILED}
    used = sum(a for _, a in pairs)
    probe = await check(client, key, tokens=0)
    assert remaining(probe, pb.SCOPE_ORGANIZATION) == 10**6 - used
    assert remaining(probe, pb.SCOPE_ORGANIZATION, window="day") == 10**7 - used
    assert remaining(probe, pb.SCOPE_PROJECT) == 500_000 - used
    assert remaining(probe, pb.SCOPE_ORGANIZATION, "requests") == 10**4 - 61


async def test_under_estimate_goes_into_debt_and_later_requests_wait(client: Client, clock: Clock) -> None:
    org = await client.org("o", [(M, "tokens", "minute", 6000)])
    _, key = await client.project(org, "a")
    d = await check(client, key, tokens=1000)
    await report(client, key, d.request_id, 5000, 4000)  # 9000 used: 3000 over the limit
    refused = await check(client, key, tokens=0)
    assert refused.reason == pb.REASON_ORGANIZATION_LIMIT
    assert refused.retry_after_ms == 30_000  # 3000 tokens drain at 100/s
    await clock.advance(30)
    assert (await check(client, key, tokens=0)).allowed


async def test_duplicate_unknown_and_out_of_order_reports(client: Client) -> None:
    org = await client.org("o", [(M, "tokens", "minute", 10_000)])
    _, key = await client.project(org, "a")
    d = await check(client, key, tokens=1000)
    first = await report(client, key, d.request_id, 300, 200)
    again = await report(client, key, d.request_id, 9000, 9000)
    assert (first.result, first.token_delta) == (R.RESULT_RECONCILED, -500)
    assert (again.result, again.token_delta) == (R.RESULT_DUPLICATE, 0)
    assert remaining(await check(client, key), pb.SCOPE_ORGANIZATION) == 9500

    unknown = await report(client, key, "never-checked", 700, 300, model=M)
    assert (unknown.result, unknown.token_delta, unknown.model) == (R.RESULT_UNRESERVED, 1000, M)
    assert remaining(await check(client, key), pb.SCOPE_ORGANIZATION) == 8500
    assert (await report(client, key, "never-checked", 700, 300, model=M)).result == R.RESULT_DUPLICATE

    # a check that arrives after its own report is decided, but never reconciled twice
    late = await check(client, key, tokens=100, request_id="never-checked")
    assert late.allowed and not late.replayed
    assert (await report(client, key, "never-checked", 1, 1, model=M)).result == R.RESULT_DUPLICATE

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await report(client, key, "no-model-no-reservation", 1, 1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model is required" in (e.value.details() or "")


async def test_bad_reports_change_nothing(client: Client) -> None:
    org = await client.org("o", [(M, "tokens", "minute", 10_000)])
    _, key = await client.project(org, "a")
    d = await check(client, key, tokens=1000)
    for inp, out, cached, message in [(-1, 0, 0, "input_tokens is -1"), (10, 0, 11, "more than input_tokens"),
                                      (0, 10**13, 0, "at most")]:  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await report(client, key, d.request_id, inp, out, cached)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (e.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await report(client, key, "", 1, 1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await report(client, key, d.request_id, 500, 500)).result == R.RESULT_RECONCILED


@pytest.mark.parametrize("counted", [False, True])
async def test_cached_tokens_count_toward_limits_only_by_org_setting(
    client: Client, clock: Clock, counted: bool
) -> None:
    org = await client.org("o", [(M, "tokens", "minute", 10_000)])
    _, key = await client.project(org, "a")
    await usage_stub(client).SetUsageSettings(
        upb.SetUsageSettingsRequest(
            settings=upb.UsageSettings(organization_id=org, cached_tokens_count_toward_limits=counted),
            # named, so that False is set too (without a mask only the fields that are set change)
            update_mask=FieldMask(paths=["cached_tokens_count_toward_limits"]),
        ),
        metadata=AUTH,
    )
    d = await check(client, key, tokens=0)
    rep = await report(client, key, d.request_id, 1000, 100, cached=800)
    assert rep.counted_tokens == (1100 if counted else 300)
    assert remaining(await check(client, key), pb.SCOPE_ORGANIZATION) == 10_000 - rep.counted_tokens
    usage = await usage_stub(client).GetUsage(
        upb.GetUsageRequest(
            organization_id=org,
            start_time=ts(int(clock.now_s - 86400) * 1000),
            end_time=ts(int(clock.now_s + 86400) * 1000),
            granularity=upb.GRANULARITY_DAY,
        ),
        metadata=AUTH,
    )
    assert usage.total.cached_tokens == 800 and usage.total.input_tokens == 1000


async def test_a_changed_price_or_cached_token_setting_applies_to_the_very_next_report(client: Client) -> None:
    # Reports read prices and the setting from the configuration decisions cache in
    # the state hash: each change must reach the next report, not a stale copy.
    org = await client.org("o", [(M, "tokens", "minute", 10**9)])
    _, key = await client.project(org, "a")
    stub = usage_stub(client)

    async def price(input_usd: float) -> None:
        p = upb.Price(organization_id=org, model=M, input_usd_micros_per_million=usd(input_usd))
        await stub.SetPrice(upb.SetPriceRequest(price=p), metadata=AUTH)

    async def count_cached(counted: bool) -> None:
        settings = upb.UsageSettings(organization_id=org, cached_tokens_count_toward_limits=counted)
        mask = FieldMask(paths=["cached_tokens_count_toward_limits"])
        await stub.SetUsageSettings(upb.SetUsageSettingsRequest(settings=settings, update_mask=mask), metadata=AUTH)

    async def decided_and_reported() -> pb.ReportUsageResponse:
        d = await check(client, key, tokens=0)  # the configuration is resolved and cached here
        return await report(client, key, d.request_id, 1_000_000, 0, cached=500_000)

    await price(1)
    first = await decided_and_reported()
    assert (first.spend_usd_micros, first.counted_tokens) == (usd(0.5), 500_000)
    await count_cached(True)
    second = await decided_and_reported()
    assert (second.spend_usd_micros, second.counted_tokens) == (usd(0.5), 1_000_000)
    await price(4)
    third = await decided_and_reported()
    assert (third.spend_usd_micros, third.counted_tokens) == (usd(2.0), 1_000_000)


async def test_usage_totals_equal_the_reports_across_widths_and_groupings(client: Client, clock: Clock) -> None:
    org = await client.org("o", [("*", "tokens", "minute", 10**9), ("*", "requests", "minute", 10**6)])
    pa, ka = await client.project(org, "a", [("*", "requests", "minute", 3)])
    pb_, kb = await client.project(org, "b")
    # The calls span about two hours: start them at the day's first hour so
    # they never straddle midnight, which would split the DAY rows in two.
    await clock.set(clock.now_s // 86400 * 86400 + 3600)
    start_ms = int(clock.now_s) * 1000
    sent = {("a", "m1"): [0, 0, 0], ("a", "m2"): [0, 0, 0], ("b", "m1"): [0, 0, 0]}
    rng = random.Random(3)
    for step in range(40):
        (proj, model) = rng.choice(list(sent))
        key = ka if proj == "a" else kb
        d = await check(client, key, tokens=10, model=model)
        if d.allowed:
            inp, out = rng.randint(1, 500), rng.randint(1, 500)
            await report(client, key, d.request_id, inp, out)
            sent[(proj, model)][0] += 1
            sent[(proj, model)][1] += inp
            sent[(proj, model)][2] += out
        await clock.advance(97 + step)  # spreads over minutes and two hours
    stub = usage_stub(client)
    want_in = sum(v[1] for v in sent.values())
    for granularity in (upb.GRANULARITY_MINUTE, upb.GRANULARITY_HOUR, upb.GRANULARITY_DAY):
        for group_by in (
            [],
            [upb.GROUP_BY_PROJECT],
            [upb.GROUP_BY_MODEL, upb.GROUP_BY_PROJECT],
            [upb.GROUP_BY_API_KEY],
        ):
            u = await stub.GetUsage(
                upb.GetUsageRequest(
                    organization_id=org, start_time=ts(start_ms), end_time=ts(start_ms + 10_000_000),
                    granularity=granularity, group_by=group_by,
                ),
                metadata=AUTH,
            )  # fmt: skip
            assert u.total.input_tokens == want_in
            assert sum(r.input_tokens for r in u.rows) == want_in
            assert sum(r.requests for r in u.rows) == sum(v[0] for v in sent.values())
    u = await stub.GetUsage(
        upb.GetUsageRequest(
            organization_id=org, start_time=ts(start_ms), end_time=ts(start_ms + 10_000_000),
            granularity=upb.GRANULARITY_DAY, group_by=[upb.GROUP_BY_PROJECT, upb.GROUP_BY_MODEL],
        ),
        metadata=AUTH,
    )  # fmt: skip
    got = {(r.project_id, r.model): (r.reported, r.input_tokens, r.output_tokens) for r in u.rows}
    names = {pa: "a", pb_: "b"}
    assert {(names[p], m): v for (p, m), v in got.items()} == {k: tuple(v) for k, v in sent.items() if v[0]}
    refused = sum(sum(r.refusals.values()) for r in u.rows)
    assert refused == 40 - sum(v[0] for v in sent.values())
    assert all(set(r.refusals) <= {"REASON_PROJECT_LIMIT"} for r in u.rows)


async def test_spend_limit_blocks_at_the_exact_request_that_reaches_it(client: Client) -> None:
    org = await client.org("o", [(M, "tokens", "minute", 10**9)])
    pid, key = await client.project(org, "a")
    _, other = await client.project(org, "b")
    stub = usage_stub(client)
    # $1 per million input and output tokens: 1,000,000 tokens = $1
    await stub.SetPrice(
        upb.SetPriceRequest(
            price=upb.Price(
                organization_id=org, model=M, input_usd_micros_per_million=usd(1), output_usd_micros_per_million=usd(1)
            )
        ),
        metadata=AUTH,
    )
    await stub.SetSpendLimit(
        upb.SetSpendLimitRequest(organization_id=org, project_id=pid, limit_usd_micros=usd(2.0)), metadata=AUTH
    )
    for _ in range(3):  # $0.50 each: spend 1.50 after three
        d = await check(client, key)
        assert d.allowed
        await report(client, key, d.request_id, 250_000, 250_000)
    d = await check(client, key)
    assert d.allowed  # 1.50 < 2.00
    rep = await report(client, key, d.request_id, 250_000, 250_000)
    assert rep.spend_usd_micros == usd(0.5)
    blocked = await check(client, key)  # 2.00 reached by the request just reported
    assert not blocked.allowed and blocked.reason == pb.REASON_SPEND_LIMIT and "project" in blocked.message
    assert (await check(client, other)).allowed  # other projects are not blocked
    spend = await stub.GetSpend(upb.GetSpendRequest(organization_id=org), metadata=AUTH)
    (line,) = [p for p in spend.projects if p.project_id == pid]
    assert (line.spend_usd_micros, line.limit_usd_micros, list(line.thresholds_crossed), line.blocked) == (
        usd(2.0),
        usd(2.0),
        [50, 75, 90, 100],
        True,
    )

    await stub.SetSpendLimit(
        upb.SetSpendLimitRequest(organization_id=org, project_id=pid, limit_usd_micros=usd(3.0)), metadata=AUTH
    )
    assert (await check(client, key)).allowed  # raised: unblocked at the next decision

    await stub.SetSpendLimit(upb.SetSpendLimitRequest(organization_id=org, limit_usd_micros=usd(2.0)), metadata=AUTH)
    blocked = await check(client, other)  # the organization has spent 2.00 in all
    assert blocked.reason == pb.REASON_SPEND_LIMIT and "organization" in blocked.message
    await stub.SetSpendLimit(upb.SetSpendLimitRequest(organization_id=org), metadata=AUTH)  # cleared
    assert (await check(client, other)).allowed


async def test_request_logs_are_capped_newest_first_and_filtered(client: Client, clock: Clock) -> None:
    org = await client.org("o", [(M, "requests", "minute", 30), ("other", "requests", "minute", 10_000)])
    pid, key = await client.project(org, "a")
    for i in range(1200):
        await clock.advance(0.001)
        model = M if i % 2 else "other"
        d = await check(client, key, model=model, request_id=f"r{i}")
        if d.allowed:
            await report(client, key, d.request_id, i, 1)
    stub = usage_stub(client)
    logs = await stub.ListRequestLogs(
        upb.ListRequestLogsRequest(organization_id=org, project_id=pid, page_size=1000), metadata=AUTH
    )
    assert len(logs.entries) == 1000  # the default cap
    times = [e.request_time.ToMilliseconds() for e in logs.entries]
    assert times == sorted(times, reverse=True) and logs.entries[0].request_id == "r1199"
    refused = await stub.ListRequestLogs(
        upb.ListRequestLogsRequest(
            organization_id=org,
            project_id=pid,
            outcome=upb.ListRequestLogsRequest.OUTCOME_REFUSED,
            model=M,
            page_size=5,
        ),
        metadata=AUTH,
    )
    assert len(refused.entries) == 5
    assert all(not e.allowed and e.reason == "REASON_ORGANIZATION_LIMIT" for e in refused.entries)
    assert all(e.model == M for e in refused.entries)
    allowed = await stub.ListRequestLogs(
        upb.ListRequestLogsRequest(
            organization_id=org,
            project_id=pid,
            outcome=upb.ListRequestLogsRequest.OUTCOME_ALLOWED,
            model="other",
            page_size=3,
        ),
        metadata=AUTH,
    )
    assert [e.model for e in allowed.entries] == ["other"] * 3 and all(
        e.allowed and e.latency.ToMilliseconds() == 42 for e in allowed.entries
    )
    window = await stub.ListRequestLogs(
        upb.ListRequestLogsRequest(
            organization_id=org, project_id=pid, start_time=ts(times[10]), end_time=ts(times[3]), page_size=100
        ),
        metadata=AUTH,
    )
    assert [e.request_time.ToMilliseconds() for e in window.entries] == times[4:11]
