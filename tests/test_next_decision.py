"""Control-plane changes hold at the very next decision, and a refusal charges nothing."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.engine.decisions import Caller, Item
from ratelimitd.engine.outcomes import Outcome
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import AUTH, Client
from tests.control import M, add_member, bearer

OTHER = "gemma2-9b-it"


async def check(client: Client, key: str, model: str = M) -> pb.CheckResponse:
    return await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=model))


async def bucket_state(r: redis.asyncio.Redis) -> dict[str, object]:
    return {k: await r.hgetall(k) async for k in r.scan_iter("rl:{*}:b:*")}


def policy(org: str, access: int, models: list[str], project: str = "") -> apb.SetModelPermissionsRequest:
    return apb.SetModelPermissionsRequest(
        organization_id=org,
        project_id=project,
        policy=apb.ModelPolicy(access=access, models=models),  # type: ignore[arg-type]
    )


async def test_key_revoked_by_a_developer_fails_at_the_next_decision(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    pid, secret = await client.project(org, "a")
    _, dev = await add_member(client, org, "dave", apb.ROLE_DEVELOPER)
    assert (await check(client, secret)).allowed
    (key,) = (
        await client.projects.ListApiKeys(apb.ListApiKeysRequest(organization_id=org, project_id=pid), metadata=AUTH)
    ).keys
    await client.projects.RevokeApiKey(
        apb.RevokeApiKeyRequest(organization_id=org, key_id=key.id), metadata=bearer(dev)
    )
    assert (await check(client, secret)).reason == pb.REASON_INVALID_API_KEY


async def test_deleted_project_refuses_its_keys_at_once_and_nothing_else_changes(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    pid, secret = await client.project(org, "doomed", [(M, "requests", "minute", 50)])
    _, survivor = await client.project(org, "survivor")
    assert (await check(client, secret)).allowed
    buckets = await bucket_state(redis_client)

    deleted = await client.projects.DeleteProject(
        apb.DeleteProjectRequest(organization_id=org, project_id=pid), metadata=AUTH
    )
    assert deleted.name == "doomed"
    assert (await check(client, secret)).reason == pb.REASON_INVALID_API_KEY
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.decisions.CheckAndConsume(
            pb.CheckRequest(project=pb.ProjectRef(organization_id=org, project_id=pid), model=M), metadata=AUTH
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert await bucket_state(redis_client) == buckets, "usage state was touched"
    assert (await check(client, survivor)).allowed

    history = await client.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(organization_id=org, project_id=pid), metadata=AUTH
    )
    assert [e.operation for e in history.events] == [
        "DeleteProject",
        "CreateApiKey",
        "SetProjectLimits",
        "CreateProject",
    ]
    # the name is free again, for a new project with a new id
    again = await client.projects.CreateProject(
        apb.CreateProjectRequest(organization_id=org, name="doomed"), metadata=AUTH
    )
    assert again.id != pid
    assert (await check(client, secret)).reason == pb.REASON_INVALID_API_KEY


@pytest.mark.parametrize(
    ("scope", "access", "models", "blocked", "allowed"),
    [
        ("organization", apb.MODEL_ACCESS_BLOCK_LIST, [OTHER], OTHER, M),
        ("organization", apb.MODEL_ACCESS_ALLOW_LIST, [M], OTHER, M),
        ("project", apb.MODEL_ACCESS_BLOCK_LIST, [M], M, OTHER),
        ("project", apb.MODEL_ACCESS_ALLOW_LIST, [OTHER], M, OTHER),
    ],
)
async def test_newly_blocked_model_is_refused_at_the_next_decision_and_charges_nothing(
    client: Client, redis_client: redis.asyncio.Redis, scope: str, access: int, models: list[str], blocked: str,
    allowed: str,
) -> None:  # fmt: skip
    org = await client.org("o", [("*", "requests", "minute", 100)])
    pid, secret = await client.project(org, "a", [("*", "requests", "minute", 50)])
    assert (await check(client, secret, blocked)).allowed
    buckets = await bucket_state(redis_client)

    await client.models.SetModelPermissions(
        policy(org, access, models, pid if scope == "project" else ""), metadata=AUTH
    )
    refused = await check(client, secret, blocked)
    assert (refused.allowed, refused.reason) == (False, pb.REASON_MODEL_BLOCKED)
    assert f"`{blocked}` is blocked" in refused.message
    assert list(refused.buckets) == [] and refused.headers == {}
    assert await bucket_state(redis_client) == buckets, "a blocked model charged a bucket"
    assert (await check(client, secret, allowed)).allowed

    await client.models.SetModelPermissions(
        policy(org, apb.MODEL_ACCESS_UNRESTRICTED, [], pid if scope == "project" else ""), metadata=AUTH
    )
    assert (await check(client, secret, blocked)).allowed


async def test_a_blocked_item_refuses_the_whole_decision_and_names_the_item(client: Client, app: App) -> None:
    org = await client.org("o", [("*", "requests", "minute", 100)])
    pid, _ = await client.project(org, "a")
    await client.models.SetModelPermissions(policy(org, apb.MODEL_ACCESS_BLOCK_LIST, [OTHER]), metadata=AUTH)
    caller = Caller(org, "", "", pid)
    d = await app.decider.check_items(caller, [Item(M, 1, 0), Item(OTHER, 1, 0)])
    assert (d.outcome, d.detail) == (Outcome.MODEL_BLOCKED, 2)
    d = await app.decider.check_items(caller, [Item(M, 1, 0)])
    assert d.allowed and d.buckets[0].remaining == 99  # the refused decision charged nothing for M either


async def test_organization_list_tightened_later_wins_over_a_project_allow_list(client: Client) -> None:
    org = await client.org("o", [("*", "requests", "minute", 100)])
    pid, secret = await client.project(org, "a")
    await client.models.SetModelPermissions(policy(org, apb.MODEL_ACCESS_ALLOW_LIST, [M, OTHER], pid), metadata=AUTH)
    await client.models.SetModelPermissions(policy(org, apb.MODEL_ACCESS_BLOCK_LIST, [OTHER]), metadata=AUTH)
    assert (await check(client, secret, OTHER)).reason == pb.REASON_MODEL_BLOCKED
    assert (await check(client, secret, M)).allowed
    got = await client.models.GetModelPermissions(
        apb.GetModelPermissionsRequest(organization_id=org, project_id=pid), metadata=AUTH
    )
    assert list(got.project.models) == sorted([M, OTHER]), "the project's list was rewritten"


async def test_a_model_without_limits_is_not_available_rather_than_blocked(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    _, secret = await client.project(org, "a")
    await client.models.SetModelPermissions(policy(org, apb.MODEL_ACCESS_BLOCK_LIST, [OTHER]), metadata=AUTH)
    assert (await check(client, secret, OTHER)).reason == pb.REASON_MODEL_NOT_AVAILABLE


@pytest.mark.parametrize("level", ["organization", "project"])
async def test_raised_and_lowered_limits_hold_at_the_next_decision(client: Client, level: str) -> None:
    org = await client.org("o", [(M, "requests", "minute", 100)])
    pid, secret = await client.project(org, "a", [(M, "requests", "minute", 100)])

    async def set_limit(value: int) -> None:
        limit = apb.Limit(model=M, metric="requests", window="minute", limit=value)
        if level == "organization":
            await client.orgs.SetOrganizationLimits(
                apb.SetOrganizationLimitsRequest(organization_id=org, set=[limit]), metadata=AUTH
            )
        else:
            await client.projects.SetProjectLimits(
                apb.SetProjectLimitsRequest(organization_id=org, project_id=pid, set=[limit]), metadata=AUTH
            )

    await set_limit(2)
    assert [(await check(client, secret)).allowed for _ in range(3)] == [True, True, False]
    await set_limit(4)  # raised: room for two more at once
    assert [(await check(client, secret)).allowed for _ in range(3)] == [True, True, False]
    await set_limit(3)  # lowered below what was used: refused at once
    refused = await check(client, secret)
    assert not refused.allowed and refused.binding.limit == 3
    expected = pb.REASON_ORGANIZATION_LIMIT if level == "organization" else pb.REASON_PROJECT_LIMIT
    assert refused.reason == expected
