"""Spend limits hold under concurrency: a decision reserves its estimated cost, ReportUsage
replaces it with the real cost (issue 9, item 7). Through the gRPC API against a real Valkey."""

from __future__ import annotations

import asyncio

import pytest

from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client, Clock
from tests.control import usd

M = "llama-3.1-8b-instant"
# $50 per million tokens, input and output: a 1,000-token estimate reserves $0.05.
PRICE = 50.0


async def priced_project(
    client: Client, limit_usd: float | None, *, org_limit_usd: float | None = None
) -> tuple[str, str, str]:
    org = await client.org("o", [(M, "requests", "minute", 10**6), (M, "tokens", "minute", 10**9)])
    pid, key = await client.project(org, "a")
    stub = usage_pb2_grpc.UsageServiceStub(client.channel)
    await stub.SetPrice(
        upb.SetPriceRequest(
            price=upb.Price(
                organization_id=org,
                model=M,
                input_usd_micros_per_million=usd(PRICE),
                output_usd_micros_per_million=usd(PRICE),
            )
        ),
        metadata=AUTH,
    )
    if limit_usd is not None:
        await stub.SetSpendLimit(
            upb.SetSpendLimitRequest(organization_id=org, project_id=pid, limit_usd_micros=usd(limit_usd)),
            metadata=AUTH,
        )
    if org_limit_usd is not None:
        await stub.SetSpendLimit(
            upb.SetSpendLimitRequest(organization_id=org, limit_usd_micros=usd(org_limit_usd)), metadata=AUTH
        )
    return org, pid, key


async def project_spend(client: Client, org: str, pid: str) -> float:
    stub = usage_pb2_grpc.UsageServiceStub(client.channel)
    spend = await stub.GetSpend(upb.GetSpendRequest(organization_id=org), metadata=AUTH)
    lines = [p.spend_usd_micros / 1e6 for p in spend.projects if p.project_id == pid]
    return lines[0] if lines else 0.0


async def check(client: Client, key: str, tokens: int) -> pb.CheckResponse:
    return await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, tokens=tokens))


async def report(client: Client, key: str, request_id: str, inp: int, out: int) -> pb.ReportUsageResponse:
    return await client.decisions.ReportUsage(
        pb.ReportUsageRequest(api_key=key, request_id=request_id, input_tokens=inp, output_tokens=out)
    )


@pytest.mark.parametrize("scope", ["project", "organization"])
async def test_a_concurrent_burst_admits_exactly_what_the_spend_limit_allows(client: Client, scope: str) -> None:
    if scope == "project":
        org, pid, key = await priced_project(client, 1.0)
    else:
        org, pid, key = await priced_project(client, None, org_limit_usd=1.0)
    replies = await asyncio.gather(*(check(client, key, 1000) for _ in range(100)))
    admitted = [r for r in replies if r.allowed]
    assert len(admitted) == 20
    assert {r.reason for r in replies if not r.allowed} == {pb.REASON_SPEND_LIMIT}
    # 20 estimates of $0.05 reserved; the 80 refusals charged nothing.
    assert await project_spend(client, org, pid) == pytest.approx(1.0)
    # The real costs replace the estimates: 600 + 300 tokens = $0.045 each.
    await asyncio.gather(*(report(client, key, r.request_id, 600, 300) for r in admitted))
    assert await project_spend(client, org, pid) == pytest.approx(0.9)
    assert (await check(client, key, 1000)).allowed  # 0.90 < 1.00 again


async def test_the_reservation_is_replaced_by_the_real_cost_once(client: Client) -> None:
    org, pid, key = await priced_project(client, 100.0)
    d = await check(client, key, 1000)
    assert d.allowed and await project_spend(client, org, pid) == pytest.approx(0.05)
    rep = await report(client, key, d.request_id, 2000, 1000)  # an under-estimate: $0.15 in truth
    assert rep.spend_usd_micros == usd(0.15)
    assert await project_spend(client, org, pid) == pytest.approx(0.15)
    again = await report(client, key, d.request_id, 2000, 1000)
    assert again.result == pb.ReportUsageResponse.RESULT_DUPLICATE
    assert await project_spend(client, org, pid) == pytest.approx(0.15)


async def test_without_a_spend_limit_nothing_is_reserved(client: Client) -> None:
    org, pid, key = await priced_project(client, None)
    d = await check(client, key, 1000)
    assert d.allowed and await project_spend(client, org, pid) == 0.0
    await report(client, key, d.request_id, 600, 300)
    assert await project_spend(client, org, pid) == pytest.approx(0.045)


async def test_an_estimate_reserved_last_month_is_released_there(client: Client, clock: Clock) -> None:
    org, pid, key = await priced_project(client, 100.0)
    stub = usage_pb2_grpc.UsageServiceStub(client.channel)
    d = await check(client, key, 1000)
    month = (await stub.GetSpend(upb.GetSpendRequest(organization_id=org), metadata=AUTH)).month
    await clock.advance(40 * 86400)  # into the next month
    await report(client, key, d.request_id, 600, 300)
    earlier = await stub.GetSpend(upb.GetSpendRequest(organization_id=org, month=month), metadata=AUTH)
    assert [p.spend_usd_micros for p in earlier.projects if p.project_id == pid] == [0]
    assert await project_spend(client, org, pid) == pytest.approx(0.045)
