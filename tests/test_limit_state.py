"""GetLimitState: what a project may still use now, its buckets and the organization's, drained to now."""

from __future__ import annotations

import grpc
import pytest

from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client, Clock

M = "llama-3.1-8b-instant"
OTHER = "mixtral-8x7b"


async def _world(client: Client) -> tuple[str, str, str]:
    org = await client.org(
        "acme", [(M, "requests", "minute", 100), (M, "tokens", "minute", 1000), ("*", "requests", "day", 5000)]
    )
    project, secret = await client.project(org, "prod", [(M, "requests", "minute", 30)])
    return org, project, secret


async def _state(client: Client, org: str, project: str, models: list[str] | None = None) -> upb.GetLimitStateResponse:
    stub = usage_pb2_grpc.UsageServiceStub(client.channel)
    request = upb.GetLimitStateRequest(organization_id=org, project_id=project, models=models or [])
    return await stub.GetLimitState(request, metadata=AUTH)


def _by_dimension(reply: upb.GetLimitStateResponse, model: str) -> dict[str, upb.LimitState]:
    return {f"{s.metric}/{s.window}": s for s in reply.limits if s.model == model}


async def test_what_is_left_of_the_project_and_the_organization_now(client: Client, clock: Clock) -> None:
    org, project, secret = await _world(client)
    for _ in range(3):
        assert (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M, tokens=100))).allowed
    state = _by_dimension(await _state(client, org, project), M)
    requests = state["requests/minute"]
    assert (requests.organization_limit, requests.organization_remaining) == (100, 97)
    assert (requests.project_limit, requests.project_remaining, requests.remaining) == (30, 27, 27)
    tokens = state["tokens/minute"]
    assert (tokens.organization_limit, tokens.remaining) == (1000, 700)
    assert not tokens.HasField("project_limit")  # it inherits
    # the buckets drain as decisions see them: 1.2 s is 2 of the organization's 100/min, 0.6 of the project's 30/min
    await clock.advance(1.2)
    later = _by_dimension(await _state(client, org, project), M)["requests/minute"]
    assert later.organization_remaining == pytest.approx(99)
    assert later.remaining == pytest.approx(27.6)


async def test_reading_charges_nothing(client: Client, clock: Clock) -> None:
    org, project, secret = await _world(client)
    first = await _state(client, org, project)
    assert await _state(client, org, project) == first
    for _ in range(30):  # the project's whole minute, still there after the reads
        assert (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M))).allowed
    assert _by_dimension(await _state(client, org, project), M)["requests/minute"].remaining == 0
    assert not (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M))).allowed


async def test_without_models_every_named_model_and_a_wildcard_model_on_request(client: Client, clock: Clock) -> None:
    org, project, secret = await _world(client)
    assert {s.model for s in (await _state(client, org, project)).limits} == {M}
    assert (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=OTHER))).allowed
    other = _by_dimension(await _state(client, org, project, [OTHER]), OTHER)
    assert (other["requests/day"].organization_limit, other["requests/day"].remaining) == (5000, 4999)
    assert not other["requests/minute"].HasField("organization_limit")


@pytest.mark.parametrize(
    ("models", "code", "says"),
    [
        (["m"] * 101, grpc.StatusCode.INVALID_ARGUMENT, "at most 100"),
        (["*"], grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ],
)
async def test_bad_requests_name_the_problem(
    client: Client, clock: Clock, models: list[str], code: grpc.StatusCode, says: str
) -> None:
    org, project, _ = await _world(client)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _state(client, org, project, models)
    assert e.value.code() == code and says in (e.value.details() or "")


async def test_an_unknown_project_is_not_found(client: Client, clock: Clock) -> None:
    org, _, _ = await _world(client)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _state(client, org, "proj_aaaaaaaaaaaa")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
