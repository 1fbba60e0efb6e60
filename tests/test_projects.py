"""Project lifecycle: names, pages, renames and deletes, each consistent under concurrency."""

from __future__ import annotations

import asyncio
from typing import cast

import grpc
import redis.asyncio
from google.protobuf.field_mask_pb2 import FieldMask

from ratelimitd.core import keys
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import AUTH, Client
from tests.control import M


async def names_in_pages(client: Client, org: str, page_size: int) -> list[list[str]]:
    pages, token = [], ""
    while True:
        reply = await client.projects.ListProjects(
            apb.ListProjectsRequest(organization_id=org, page_size=page_size, page_token=token), metadata=AUTH
        )
        pages.append([p.name for p in reply.projects])
        token = reply.next_page_token
        if not token:
            return pages


async def test_list_is_paginated_in_name_order(client: Client) -> None:
    org = await client.org("o", [])
    for name in ("myapp-staging", "myapp-prod", "batch", "myapp-dev", "zeta"):
        await client.projects.CreateProject(apb.CreateProjectRequest(organization_id=org, name=name), metadata=AUTH)
    assert await names_in_pages(client, org, 2) == [["batch", "myapp-dev"], ["myapp-prod", "myapp-staging"], ["zeta"]]
    assert await names_in_pages(client, org, 0) == [["batch", "myapp-dev", "myapp-prod", "myapp-staging", "zeta"]]
    assert await names_in_pages(client, org, 5) == [["batch", "myapp-dev", "myapp-prod", "myapp-staging", "zeta"]]


async def test_a_page_token_survives_changes_before_it(client: Client) -> None:
    org = await client.org("o", [])
    for name in ("a", "b", "c", "d"):
        await client.projects.CreateProject(apb.CreateProjectRequest(organization_id=org, name=name), metadata=AUTH)
    first = await client.projects.ListProjects(apb.ListProjectsRequest(organization_id=org, page_size=2), metadata=AUTH)
    await client.projects.CreateProject(apb.CreateProjectRequest(organization_id=org, name="aa"), metadata=AUTH)
    rest = await client.projects.ListProjects(
        apb.ListProjectsRequest(organization_id=org, page_size=2, page_token=first.next_page_token), metadata=AUTH
    )
    assert [p.name for p in first.projects] == ["a", "b"]
    assert [p.name for p in rest.projects] == ["c", "d"] and rest.next_page_token == ""


async def test_rename_moves_the_name_index_with_it(client: Client, redis_client: redis.asyncio.Redis) -> None:
    org = await client.org("o", [(M, "requests", "minute", 10)])
    pid, secret = await client.project(org, "old-name")
    updated = await client.projects.UpdateProject(
        apb.UpdateProjectRequest(
            project=apb.Project(organization_id=org, id=pid, name="new-name", description="the app")
        ),
        metadata=AUTH,
    )
    assert (updated.id, updated.name, updated.description) == (pid, "new-name", "the app")
    assert await redis_client.hgetall(keys.OrgKeys(org).project_names) == {"new-name": pid}
    by_name = await client.projects.GetProject(
        apb.GetProjectRequest(organization_id=org, name="new-name"), metadata=AUTH
    )
    assert by_name.id == pid
    # the old name is free; the project keeps its keys and decisions
    other = await client.projects.CreateProject(
        apb.CreateProjectRequest(organization_id=org, name="old-name"), metadata=AUTH
    )
    assert other.id != pid
    assert (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M))).allowed
    # only the description, cleared: an empty value is changed only when the mask names it, and
    # the name the request also carries stays
    desc = await client.projects.UpdateProject(
        apb.UpdateProjectRequest(
            project=apb.Project(organization_id=org, id=pid, name="ignored"),
            update_mask=FieldMask(paths=["description"]),
        ),
        metadata=AUTH,
    )
    assert (desc.name, desc.description) == ("new-name", "")


async def test_concurrent_creates_of_one_name_make_exactly_one_project(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", [])
    request = apb.CreateProjectRequest(organization_id=org, name="contested")
    results = await asyncio.gather(
        *(client.projects.CreateProject(request, metadata=AUTH) for _ in range(20)), return_exceptions=True
    )
    created = [r for r in results if isinstance(r, apb.Project)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 1 and len(refused) == 19
    assert {e.code() for e in refused} == {grpc.StatusCode.ALREADY_EXISTS}
    assert len([k async for k in redis_client.scan_iter(f"rl:{{{org}}}:p:*")]) == 1


async def test_concurrent_renames_to_one_name_let_exactly_one_win(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", [])
    ids = [
        (
            await client.projects.CreateProject(
                apb.CreateProjectRequest(organization_id=org, name=f"p{i}"), metadata=AUTH
            )
        ).id
        for i in range(10)
    ]
    results = await asyncio.gather(
        *(client.projects.UpdateProject(apb.UpdateProjectRequest(project=apb.Project(organization_id=org, id=p, name="winner")), metadata=AUTH) for p in ids),
        return_exceptions=True,
    )  # fmt: skip
    assert sum(isinstance(r, apb.Project) for r in results) == 1
    index = cast(dict[str, str], await redis_client.hgetall(keys.OrgKeys(org).project_names))
    assert len(index) == 10 and "winner" in index
    for name, pid in index.items():  # every index entry names its project's record, and back
        assert await redis_client.hget(keys.OrgKeys(org).project(pid), "n") == name


async def test_api_key_listing_shows_metadata_only(client: Client, redis_client: redis.asyncio.Redis) -> None:
    org = await client.org("o", [(M, "requests", "minute", 10)])
    pid, secret = await client.project(org, "a")
    listed = await client.projects.ListApiKeys(
        apb.ListApiKeysRequest(organization_id=org, project_id=pid), metadata=AUTH
    )
    (key,) = listed.keys
    assert (key.name, key.HasField("last_use_time"), key.revoked) == ("a-key", False, False)
    assert key.id.startswith("key_") and secret.startswith(key.prefix) and key.create_time.ToMilliseconds() > 0
    await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M))
    (used,) = (
        await client.projects.ListApiKeys(apb.ListApiKeysRequest(organization_id=org, project_id=pid), metadata=AUTH)
    ).keys
    assert used.HasField("last_use_time") and used.last_use_time.ToMilliseconds() > 0
    assert secret not in str(listed)
