"""GetRequestMetrics: latency percentiles and status codes per model over time, from what ReportUsage recorded."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client, Clock

M = "llama-3.1-8b-instant"


async def _report(client: Client, secret: str, request_id: str, status: int, latency_ms: int) -> None:
    decision = await client.decisions.CheckAndConsume(
        pb.CheckRequest(api_key=secret, model=M, tokens=10, request_id=request_id)
    )
    assert decision.allowed
    await client.decisions.ReportUsage(
        pb.ReportUsageRequest(
            api_key=secret, request_id=request_id, model=M, input_tokens=5, output_tokens=5,
            status_code=status, latency_ms=latency_ms,
        )
    )  # fmt: skip


def _at(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(round(seconds * 1000))
    return stamp


def _percentiles_ms(row: upb.RequestMetricsRow) -> tuple[int, int, int]:
    return row.latency_p50.ToMilliseconds(), row.latency_p95.ToMilliseconds(), row.latency_p99.ToMilliseconds()


async def _metrics(client: Client, org: str, project: str, **fields: object) -> upb.GetRequestMetricsResponse:
    stub = usage_pb2_grpc.UsageServiceStub(client.channel)
    request = upb.GetRequestMetricsRequest(organization_id=org, project_id=project, **fields)  # type: ignore[arg-type]
    return await stub.GetRequestMetrics(request, metadata=AUTH)


async def test_percentiles_and_status_codes_per_model_and_minute(client: Client, clock: Clock) -> None:
    org = await client.org("acme", [(M, "requests", "minute", 1000)])
    project, secret = await client.project(org, "prod")
    await clock.advance(2 * 3600)  # ahead of real time, whatever the minute of the hour the test runs in
    statuses = [200] * 8 + [429, 500]
    for i, status in enumerate(statuses):
        await _report(client, secret, f"a{i}", status, 10 * (i + 1))  # 10 ... 100 ms
    # admitted but never reported, and refused: neither has a latency to count
    await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M, request_id="unreported"))
    await clock.advance(60)
    await _report(client, secret, "b0", 200, 300)
    await _report(client, secret, "b1", 200, 400)

    # an explicit end: "now" is the server's real time, which the manual clock may be ahead of
    until = {"start_time": Timestamp(seconds=0), "end_time": _at(clock.now_s + 3600)}
    reply = await _metrics(client, org, project, granularity=upb.GRANULARITY_MINUTE, **until)
    first, second = reply.rows
    assert second.bucket_start_time.ToMilliseconds() - first.bucket_start_time.ToMilliseconds() == 60_000
    assert (first.model, first.reported) == (M, 10)
    assert _percentiles_ms(first) == (50, 100, 100)
    assert dict(first.status_codes) == {200: 8, 429: 1, 500: 1}
    assert (second.reported, *_percentiles_ms(second)[:2]) == (2, 300, 400)
    (total,) = reply.totals
    assert (total.reported, *_percentiles_ms(total)) == (12, 60, 400, 400)
    assert dict(total.status_codes) == {200: 10, 429: 1, 500: 1}

    hourly = await _metrics(client, org, project, granularity=upb.GRANULARITY_HOUR, **until)
    assert [r.reported for r in hourly.rows] == [12]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"granularity": upb.GRANULARITY_UNSPECIFIED}, "granularity"),
        (
            {
                "granularity": upb.GRANULARITY_MINUTE,
                "start_time": Timestamp(seconds=2),
                "end_time": Timestamp(seconds=1),
            },
            "end_time must be after start_time",
        ),
    ],
)
async def test_bad_ranges_are_invalid_argument(
    client: Client, clock: Clock, fields: dict[str, object], says: str
) -> None:
    org = await client.org("acme", [(M, "requests", "minute", 1000)])
    project, _ = await client.project(org, "prod")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _metrics(client, org, project, **fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in (e.value.details() or "")
