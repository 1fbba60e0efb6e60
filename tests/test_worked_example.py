"""The reference's worked example (groq-projects.txt), exactly.

Organization: 100 requests per minute. myapp-prod: 80; myapp-staging: 30;
myapp-dev: no custom limit (inherits 100). The clock stands still, so nothing
refills between calls: every count below is exact.
"""

from __future__ import annotations

import asyncio

import pytest

from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import Client

MODEL = "llama-3.3-70b-versatile"


async def admitted(client: Client, secret: str, attempts: int, *, concurrently: bool = False) -> int:
    req = pb.CheckRequest(api_key=secret, model=MODEL)
    if concurrently:
        replies = await asyncio.gather(*(client.decisions.CheckAndConsume(req) for _ in range(attempts)))
    else:
        replies = [await client.decisions.CheckAndConsume(req) for _ in range(attempts)]
    return sum(r.allowed for r in replies)


@pytest.fixture
async def example(client: Client, clock: object) -> dict[str, str]:
    org = await client.org("acme", [(MODEL, "requests", "minute", 100)])
    _, prod = await client.project(org, "myapp-prod", [(MODEL, "requests", "minute", 80)])
    _, staging = await client.project(org, "myapp-staging", [(MODEL, "requests", "minute", 30)])
    _, dev = await client.project(org, "myapp-dev")
    return {"prod": prod, "staging": staging, "dev": dev}


async def test_prod_admits_80_and_no_more_even_when_others_are_idle(client: Client, example: dict[str, str]) -> None:
    assert await admitted(client, example["prod"], 120) == 80
    reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=example["prod"], model=MODEL))
    assert reply.reason == pb.REASON_PROJECT_LIMIT
    assert reply.binding.scope == pb.SCOPE_PROJECT and reply.binding.limit == 80


async def test_staging_admits_30(client: Client, example: dict[str, str]) -> None:
    assert await admitted(client, example["staging"], 50) == 30


async def test_dev_alone_gets_the_whole_organization_limit(client: Client, example: dict[str, str]) -> None:
    assert await admitted(client, example["dev"], 150) == 100
    reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=example["dev"], model=MODEL))
    assert reply.reason == pb.REASON_ORGANIZATION_LIMIT
    assert reply.binding.scope == pb.SCOPE_ORGANIZATION and reply.binding.limit == 100


async def test_dev_gets_exactly_5_while_prod_uses_80_and_staging_15(client: Client, example: dict[str, str]) -> None:
    assert await admitted(client, example["prod"], 80) == 80
    assert await admitted(client, example["staging"], 15) == 15
    assert await admitted(client, example["dev"], 20) == 5


async def test_prod_and_staging_attempting_110_together_get_exactly_100(
    client: Client, example: dict[str, str]
) -> None:
    prod, staging = await asyncio.gather(
        admitted(client, example["prod"], 80, concurrently=True),
        admitted(client, example["staging"], 30, concurrently=True),
    )
    assert prod + staging == 100
    assert prod <= 80 and staging <= 30
