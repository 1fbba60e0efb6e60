"""The audit trail: who, what, when, before and after; filtered, paged and bounded."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.core import keys
from ratelimitd.v1 import admin_pb2 as apb
from tests.conftest import AUTH, Client, Storage, channel_client, settings_for
from tests.control import M, add_member, bearer, ts


async def events(client: Client, org: str, **fields: object) -> list[apb.AuditEvent]:
    reply = await client.audit.ListAuditEvents(apb.ListAuditEventsRequest(organization_id=org, **fields), metadata=AUTH)  # type: ignore[arg-type]
    return list(reply.events)


async def test_every_change_records_who_what_and_before_after(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    alice, token = await add_member(client, org, "alice", apb.ROLE_OWNER)
    md = bearer(token)
    p = await client.projects.CreateProject(apb.CreateProjectRequest(organization_id=org, name="app"), metadata=md)
    limit = apb.Limit(model=M, metric="requests", window="minute", limit=40)
    await client.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(organization_id=org, project_id=p.id, set=[limit]), metadata=md
    )
    limit.limit = 30
    await client.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(organization_id=org, project_id=p.id, set=[limit]), metadata=md
    )
    await client.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(organization_id=org, project_id=p.id, set=[limit]), metadata=md
    )  # no change

    latest = await events(client, org)
    assert [e.operation for e in latest] == [
        "SetProjectLimits", "SetProjectLimits", "CreateProject", "AddMember", "SetOrganizationLimits", "CreateOrganization",
    ]  # fmt: skip
    change = latest[0]
    assert (change.actor.kind, change.actor.name, change.actor.member_id, change.actor.role) == (
        "member", "alice", alice, apb.ROLE_OWNER,
    )  # fmt: skip
    assert change.actor.credential_id.startswith("cred_")
    assert (change.project_id, change.target) == (p.id, p.id)
    assert json.loads(change.before) == {f"{M}|requests|minute": 40}
    assert json.loads(change.after) == {f"{M}|requests|minute": 30}
    assert latest[-1].actor.kind == "operator" and json.loads(latest[-1].before) is None
    assert all(
        a.id > b.id and a.event_time.ToMilliseconds() >= b.event_time.ToMilliseconds()
        for a, b in itertools.pairwise(latest)
    )
    assert token not in str(latest)  # the member's token is never recorded


async def test_filters_by_project_and_time_and_pages(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    a, _ = await client.project(org, "a")
    b, _ = await client.project(org, "b")
    only_a = await events(client, org, project_id=a)
    assert [e.operation for e in only_a] == ["CreateApiKey", "CreateProject"] and {e.project_id for e in only_a} == {a}
    everything = await events(client, org)
    assert len(everything) == 6
    newest, oldest = (e.event_time.ToMilliseconds() for e in (everything[0], everything[-1]))
    assert await events(client, org, start_time=ts(newest + 1)) == []
    assert await events(client, org, end_time=ts(oldest - 1)) == []
    assert await events(client, org, start_time=ts(oldest), end_time=ts(newest)) == everything

    pages, token = [], ""
    while True:
        reply = await client.audit.ListAuditEvents(
            apb.ListAuditEventsRequest(organization_id=org, page_size=4, page_token=token), metadata=AUTH
        )
        pages.append([e.id for e in reply.events])
        token = reply.next_page_token
        if not token:
            break
    assert pages == [[e.id for e in everything[:4]], [e.id for e in everything[4:]]]
    assert b


@pytest.fixture
async def small_audit_app(storage: Storage, redis_client: redis.asyncio.Redis) -> AsyncIterator[App]:
    a = App(settings_for(storage.url, audit_max_events=10))
    await a.start()
    yield a
    await a.stop(0)


async def test_the_trail_is_capped(small_audit_app: App, redis_client: redis.asyncio.Redis) -> None:
    client = channel_client(f"127.0.0.1:{small_audit_app.port}")
    try:
        org = await client.org("o", [])
        for i in range(300):
            await client.projects.CreateProject(
                apb.CreateProjectRequest(organization_id=org, name=f"p{i}"), metadata=AUTH
            )
        length = await redis_client.xlen(keys.OrgKeys(org).audit)
        # MAXLEN ~ trims whole stream nodes (100 entries by default): at least the cap, never far above it
        assert 10 <= length <= 10 + 100
        newest = (
            await client.audit.ListAuditEvents(
                apb.ListAuditEventsRequest(organization_id=org, page_size=1), metadata=AUTH
            )
        ).events[0]
        assert json.loads(newest.after)["name"] == "p299"
    finally:
        await client.channel.close()
