"""CheckAndConsumeStream: many decisions on one stream, each exactly what CheckAndConsume answers,
in the order of the requests; a request the unary call would refuse with a status gets that status
as its answer and the stream goes on. Against a real server and Valkey (issue 9, item 5)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import AUTH, Client

M = "llama-3.1-8b-instant"
LIMITS = [(M, "requests", "minute", 5), (M, "tokens", "minute", 1000)]


async def stream(client: Client, requests: list[pb.CheckRequest], **kw: object) -> list[pb.CheckResponse]:
    """All requests written before any answer is read: they are decided concurrently."""
    call = client.decisions.CheckAndConsumeStream(**kw)  # type: ignore[arg-type]
    for r in requests:
        await call.write(r)
    await call.done_writing()
    return [reply async for reply in call]


def comparable(reply: pb.CheckResponse) -> pb.CheckResponse:
    """The reply without what differs between two organizations: their ids and generated request ids."""
    c = pb.CheckResponse()
    c.CopyFrom(reply)
    c.ClearField("request_id")
    c.ClearField("organization_id")
    c.ClearField("project_id")
    c.message = c.message.replace(reply.organization_id, "ORG").replace(reply.project_id, "PROJ")
    return c


async def test_decisions_on_one_stream_are_the_unary_decisions(client: Client, clock: object) -> None:
    streamed_org = await client.org("streamed", LIMITS)
    _, streamed_key = await client.project(streamed_org, "a", [(M, "requests", "minute", 4)])
    unary_org = await client.org("unary", LIMITS)
    _, unary_key = await client.project(unary_org, "a", [(M, "requests", "minute", 4)])
    n = 7

    replies = await stream(client, [pb.CheckRequest(api_key=streamed_key, model=M, tokens=300)] * n)
    expected = [
        await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=unary_key, model=M, tokens=300))
        for _ in range(n)
    ]

    # Decided concurrently, like concurrent unary calls: the same answers, in some order.
    def key(r: pb.CheckResponse) -> bytes:
        return comparable(r).SerializeToString(deterministic=True)

    assert sorted(map(key, replies)) == sorted(map(key, expected))
    assert sum(r.allowed for r in replies) == 3  # 1000 tokens per minute
    assert {r.reason for r in replies if not r.allowed} == {pb.REASON_ORGANIZATION_LIMIT}
    assert all(r.organization_id == streamed_org and r.error_code == 0 for r in replies)
    assert len({r.request_id for r in replies}) == n


async def test_answers_come_in_the_order_of_the_requests(client: Client, clock: object) -> None:
    org = await client.org("o", [(M, "requests", "minute", 1000)])
    _, key = await client.project(org, "a")
    ids = [f"order-{i}" for i in range(60)]
    replies = await stream(client, [pb.CheckRequest(api_key=key, model=M, request_id=i) for i in ids])
    assert [r.request_id for r in replies] == ids
    assert all(r.allowed for r in replies)
    # Each charged once: the last decision of the 60 left 940.
    assert min(b.remaining for r in replies for b in r.buckets) == 940


async def test_a_bad_request_is_answered_with_its_status_and_the_stream_goes_on(client: Client, clock: object) -> None:
    org = await client.org("o", LIMITS)
    _, key = await client.project(org, "a")
    replies = await stream(
        client,
        [
            pb.CheckRequest(api_key=key, model=M),
            pb.CheckRequest(api_key=key, model=""),
            pb.CheckRequest(api_key=key, model=M, tokens=-1),
            pb.CheckRequest(model=M),
            pb.CheckRequest(api_key="rlk_not-a-key", model=M),
            pb.CheckRequest(api_key=key, model=M),
        ],
    )
    assert [r.error_code for r in replies] == [0, 3, 3, 3, 0, 0]  # 3: INVALID_ARGUMENT
    assert [r.error_message for r in replies[1:4]] == [
        "model is empty",
        "tokens is -1; it must be 0 or more",
        "set either api_key or project",
    ]
    # An error answer carries nothing else, and charged nothing.
    assert replies[1] == pb.CheckResponse(error_code=3, error_message="model is empty")
    assert replies[4].reason == pb.REASON_INVALID_API_KEY and not replies[4].allowed
    # Requests on one stream are decided concurrently (answered in order), so which of the two
    # good ones saw the other's charge is not fixed; the state after the stream is.
    after = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
    requests_left = [b.remaining for b in after.buckets if b.metric == "requests"]
    assert requests_left == [2]  # only the two good requests were charged, of 5, then this one


async def test_a_request_id_replays_on_a_stream_as_on_the_unary_call(client: Client, clock: object) -> None:
    org = await client.org("o", LIMITS)
    _, key = await client.project(org, "a")
    first = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M, request_id="r-1"))
    replies = await stream(client, [pb.CheckRequest(api_key=key, model=M, request_id="r-1")] * 2)
    assert [(r.replayed, r.request_id) for r in replies] == [(True, "r-1")] * 2
    replay = comparable(first)
    replay.replayed = True
    assert all(comparable(r) == replay for r in replies)


async def test_a_trusted_caller_authenticates_the_stream_once_in_its_metadata(client: Client, clock: object) -> None:
    org = await client.org("o", LIMITS)
    project, _ = await client.project(org, "a")
    by_project = pb.CheckRequest(project=pb.ProjectRef(organization_id=org, project_id=project), model=M)

    replies = await stream(client, [by_project] * 2, metadata=AUTH)
    assert [(r.allowed, r.project_id) for r in replies] == [(True, project)] * 2

    unauthenticated = await stream(client, [by_project])
    assert [r.error_code for r in unauthenticated] == [grpc.StatusCode.UNAUTHENTICATED.value[0]]
    assert unauthenticated[0].error_message


async def test_bytes_that_are_not_a_request_end_the_stream_with_invalid_argument(client: Client, clock: object) -> None:
    org = await client.org("o", LIMITS)
    _, key = await client.project(org, "a")
    method = client.channel.stream_stream(
        "/ratelimitd.v1.RateLimitService/CheckAndConsumeStream",
        request_serializer=lambda b: b,
        response_deserializer=pb.CheckResponse.FromString,
    )
    call = method()
    await call.write(pb.CheckRequest(api_key=key, model=M).SerializeToString())
    first = await asyncio.wait_for(call.read(), 20)
    assert isinstance(first, pb.CheckResponse) and first.allowed
    await call.write(b"\xff\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(call.read(), 20)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid ratelimitd.v1.CheckRequest message" in (e.value.details() or "")


async def test_a_key_that_is_not_utf8_is_the_invalid_key_refusal_as_on_the_unary_call(
    client: Client, clock: object
) -> None:
    org = await client.org("o", LIMITS)
    _, key = await client.project(org, "a")
    bad_key = pb.CheckRequest(api_key=key[:-2] + "XX", model=M).SerializeToString().replace(b"XX", b"\xff\xfe")
    method = client.channel.stream_stream(
        "/ratelimitd.v1.RateLimitService/CheckAndConsumeStream",
        request_serializer=lambda b: b,
        response_deserializer=pb.CheckResponse.FromString,
    )
    call = method()
    for data in (bad_key, pb.CheckRequest(api_key=key, model=M).SerializeToString()):
        await call.write(data)
    await call.done_writing()
    replies = [r async for r in call]
    assert [(r.allowed, r.reason, r.error_code) for r in replies] == [
        (False, pb.REASON_INVALID_API_KEY, 0),
        (True, pb.REASON_ALLOWED, 0),
    ]
