"""The API's shapes (issue 12 item 2): reasons, pages, field masks, micro-dollars, Timestamps.

Bad input for each of them (an unknown mask path, a forged page token, an unset
enum, a time before 1970) is in test_control_validation.py's table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask

from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import AUTH, Client, Clock
from tests.control import M, add_member, make_world

Fetch = Callable[[int, str], Awaitable[Any]]  # (page_size, page_token) -> a List reply


async def every_page(fetch: Fetch, items: str, size: int) -> tuple[list[Any], int]:
    """Walks next_page_token to the end; returns the items and how many pages it took."""
    found: list[Any] = []
    token, pages = "", 0
    while True:
        reply = await fetch(size, token)
        found += getattr(reply, items)
        pages += 1
        assert len(getattr(reply, items)) <= size
        if not reply.next_page_token:
            return found, pages
        token = reply.next_page_token


async def test_an_allowed_decision_carries_reason_allowed_and_a_refusal_never_does(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 1)])
    _, key = await client.project(org, "a")
    allowed = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
    refused = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
    assert (allowed.allowed, allowed.reason) == (True, pb.REASON_ALLOWED)
    assert (refused.allowed, refused.reason) == (False, pb.REASON_ORGANIZATION_LIMIT)


async def test_every_short_list_pages_in_its_order(client: Client) -> None:
    world = await make_world(client)
    org, proj = world.org, world.proj
    for i in range(4):
        await client.projects.CreateApiKey(
            apb.CreateApiKeyRequest(organization_id=org, project_id=proj, name=f"k{i}"), metadata=AUTH
        )
        await add_member(client, org, f"zed{i}", apb.ROLE_READER)
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    for model in ("b", "*", "a", "d", "c"):
        price = upb.Price(organization_id=org, model=model, input_usd_micros_per_million=1)
        await usage.SetPrice(upb.SetPriceRequest(price=price), metadata=AUTH)

    lists: dict[str, tuple[Fetch, str]] = {
        "keys": (
            lambda n, t: client.projects.ListApiKeys(
                apb.ListApiKeysRequest(organization_id=org, project_id=proj, page_size=n, page_token=t), metadata=AUTH
            ),
            "keys",
        ),
        "members": (
            lambda n, t: client.members.ListMembers(
                apb.ListMembersRequest(organization_id=org, page_size=n, page_token=t), metadata=AUTH
            ),
            "members",
        ),
        "credentials": (
            lambda n, t: client.creds.ListCredentials(
                apb.ListCredentialsRequest(organization_id=org, page_size=n, page_token=t), metadata=AUTH
            ),
            "credentials",
        ),
        "prices": (
            lambda n, t: usage.ListPrices(
                upb.ListPricesRequest(organization_id=org, page_size=n, page_token=t), metadata=AUTH
            ),
            "prices",
        ),
    }
    for name, (fetch, items) in lists.items():
        whole, pages = await every_page(fetch, items, 1000)
        assert pages == 1 and len(whole) >= 5, name
        paged, pages = await every_page(fetch, items, 2)
        assert paged == whole and pages == (len(whole) + 1) // 2, name
    prices, _ = await every_page(*lists["prices"], 3)
    assert [p.model for p in prices] == ["a", "b", "c", "d", "*"]


async def test_the_request_log_pages_newest_first_through_entries_of_one_millisecond(
    client: Client, clock: Clock
) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    pid, key = await client.project(org, "a")
    for burst in (3, 4, 2):  # the stopped clock puts each burst in one millisecond
        for _ in range(burst):  # an admitted request is logged when it is reported
            d = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
            await client.decisions.ReportUsage(pb.ReportUsageRequest(api_key=key, request_id=d.request_id))
        await clock.advance(1)
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)

    async def fetch(n: int, t: str) -> upb.ListRequestLogsResponse:
        request = upb.ListRequestLogsRequest(organization_id=org, project_id=pid, page_size=n, page_token=t)
        reply: upb.ListRequestLogsResponse = await usage.ListRequestLogs(request, metadata=AUTH)
        return reply

    whole, _ = await every_page(fetch, "entries", 1000)
    assert len(whole) == 9 and len({e.request_id for e in whole}) == 9
    times = [e.request_time.ToMilliseconds() for e in whole]
    assert times == sorted(times, reverse=True) and len(set(times)) == 3
    for size in (1, 2, 3, 4):  # page boundaries inside and at the edges of each millisecond
        paged, pages = await every_page(fetch, "entries", size)
        assert [e.request_id for e in paged] == [e.request_id for e in whole] and pages == -(-9 // size)


async def test_money_is_exact_micro_dollars(client: Client, clock: Clock) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100), (M, "tokens", "minute", 10**9)])
    pid, key = await client.project(org, "a")
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    # $0.59 and $0.79 per million tokens, $0.000001 per million cached: values a double cannot hold
    price = upb.Price(
        organization_id=org, model=M, input_usd_micros_per_million=590_000,
        output_usd_micros_per_million=790_000, cached_input_usd_micros_per_million=1,
    )  # fmt: skip
    assert (await usage.SetPrice(upb.SetPriceRequest(price=price), metadata=AUTH)) == price
    (listed,) = (await usage.ListPrices(upb.ListPricesRequest(organization_id=org), metadata=AUTH)).prices
    assert listed == price
    limit = upb.SetSpendLimitRequest(organization_id=org, project_id=pid, limit_usd_micros=1_234_567)
    (line,) = (await usage.SetSpendLimit(limit, metadata=AUTH)).projects
    assert (line.limit_usd_micros, line.spend_usd_micros) == (1_234_567, 0)
    d = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
    report = pb.ReportUsageRequest(api_key=key, request_id=d.request_id, input_tokens=1_000_000, output_tokens=100)
    reported = await client.decisions.ReportUsage(report)
    assert reported.spend_usd_micros == 590_000 + 79
    spend = await usage.GetSpend(upb.GetSpendRequest(organization_id=org), metadata=AUTH)
    assert spend.organization.spend_usd_micros == 590_079 and not spend.organization.HasField("limit_usd_micros")


async def test_update_masks_choose_the_fields_that_change(client: Client) -> None:
    world = await make_world(client)
    org, proj = world.org, world.proj

    async def update(mask: list[str] | None, **fields: str) -> apb.Project:
        request = apb.UpdateProjectRequest(
            project=apb.Project(organization_id=org, id=proj, **fields),  # type: ignore[arg-type]
            update_mask=None if mask is None else FieldMask(paths=mask),
        )
        reply: apb.Project = await client.projects.UpdateProject(request, metadata=AUTH)
        return reply

    assert (p := await update(None, name="one", description="first")).description == "first"
    assert (p.name, (await update(["name"], name="two", description="ignored")).description) == ("one", "first")
    assert ((p := await update(None, description="second")).name, p.description) == ("two", "second")
    assert ((p := await update(["*"], name="three")).name, p.description) == ("three", "")
    member = world.members["sam"]
    role = apb.UpdateMemberRequest(
        member=apb.Member(organization_id=org, id=member, role=apb.ROLE_DEVELOPER),
        update_mask=FieldMask(paths=["role"]),
    )
    assert (await client.members.UpdateMember(role, metadata=AUTH)).role == apb.ROLE_DEVELOPER
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    on = upb.SetUsageSettingsRequest(
        settings=upb.UsageSettings(organization_id=org, cached_tokens_count_toward_limits=True)
    )
    assert (await usage.SetUsageSettings(on, metadata=AUTH)).cached_tokens_count_toward_limits
    off = upb.SetUsageSettingsRequest(
        settings=upb.UsageSettings(organization_id=org),
        update_mask=FieldMask(paths=["cached_tokens_count_toward_limits"]),
    )
    assert not (await usage.SetUsageSettings(off, metadata=AUTH)).cached_tokens_count_toward_limits


async def test_management_times_are_timestamps(client: Client) -> None:
    world = await make_world(client)
    project = await client.projects.GetProject(
        apb.GetProjectRequest(organization_id=world.org, project_id=world.proj), metadata=AUTH
    )
    events = await client.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(organization_id=world.org, project_id=world.proj), metadata=AUTH
    )
    created = events.events[-1]
    assert created.operation == "CreateProject" and created.event_time.ToMilliseconds() > 0
    # JSON (grpcurl, the HTTP gateway) shows them as RFC 3339 strings
    shown = json_format.MessageToDict(project)["createTime"]
    assert shown.endswith("Z") and shown == project.create_time.ToJsonString()
