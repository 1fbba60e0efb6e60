"""ManageProject: every operation answers exactly as the ProjectService RPC it names.

Bad input and refused roles are in the tables of test_control_validation.py and
test_authz_matrix.py; here, each operation's reply is compared with what the
resource service says about the same state.
"""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio
from google.protobuf.field_mask_pb2 import FieldMask

from ratelimitd.api.gate import MANAGE_PROJECT_OPERATIONS
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import rate_limit_service_pb2 as spb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import AUTH, Client
from tests.control import M, Metadata, make_world, snapshot


async def manage(client: Client, md: Metadata = AUTH, **operation: object) -> spb.ManageProjectResponse:
    reply: spb.ManageProjectResponse = await client.decisions.ManageProject(
        spb.ManageProjectRequest(**operation),  # type: ignore[arg-type]
        metadata=md,
    )
    return reply


def lim(value: int) -> apb.Limit:
    return apb.Limit(model=M, metric="requests", window="minute", limit=value)


def test_every_operation_of_the_request_has_a_project_service_method_and_a_result() -> None:
    operations = spb.ManageProjectRequest.DESCRIPTOR.oneofs_by_name["operation"].fields
    results = {f.name: f.message_type for f in spb.ManageProjectResponse.DESCRIPTOR.oneofs_by_name["result"].fields}
    project_service = apb.DESCRIPTOR.services_by_name["ProjectService"]
    assert {f.name for f in operations} == set(MANAGE_PROJECT_OPERATIONS)
    # each reply type has one result field to go in (api/manage.py places replies by type)
    assert len(set(results.values())) == len(results)
    for field in operations:
        method = project_service.methods_by_name[MANAGE_PROJECT_OPERATIONS[field.name]]
        # the request is the RPC's own request, and its reply type has a result field
        assert method.input_type == field.message_type
        assert method.output_type in results.values()


async def test_reads_answer_as_the_resource_service(client: Client) -> None:
    world = await make_world(client)
    org, proj = world.org, world.proj
    await client.projects.SetProjectLimits(
        apb.SetProjectLimitsRequest(organization_id=org, project_id=proj, set=[lim(7)]), metadata=AUTH
    )
    get = apb.GetProjectRequest(organization_id=org, project_id=proj)
    assert (await manage(client, get_project=get)).project == await client.projects.GetProject(get, metadata=AUTH)
    listing = apb.ListProjectsRequest(organization_id=org)
    assert (await manage(client, list_projects=listing)).projects == await client.projects.ListProjects(
        listing, metadata=AUTH
    )
    limits = apb.GetProjectLimitsRequest(organization_id=org, project_id=proj, models=["other"])
    got = (await manage(client, get_project_limits=limits)).limits
    assert got == await client.projects.GetProjectLimits(limits, metadata=AUTH)
    assert [x.limit for x in got.custom] == [7]
    keys = apb.ListApiKeysRequest(organization_id=org, project_id=proj)
    api_keys = (await manage(client, list_api_keys=keys)).api_keys
    assert api_keys == await client.projects.ListApiKeys(keys, metadata=AUTH)
    assert [k.id for k in api_keys.keys] == [world.key_id]


async def test_writes_are_the_resource_service_writes(client: Client) -> None:
    world = await make_world(client)
    org = world.org
    created = (
        await manage(client, create_project=apb.CreateProjectRequest(organization_id=org, name="beta", description="b"))
    ).project
    get = apb.GetProjectRequest(organization_id=org, project_id=created.id)
    assert created == await client.projects.GetProject(get, metadata=AUTH)
    assert (created.name, created.description) == ("beta", "b")

    update = apb.UpdateProjectRequest(
        project=apb.Project(organization_id=org, id=created.id, name="gamma"), update_mask=FieldMask(paths=["*"])
    )
    updated = (await manage(client, update_project=update)).project
    assert (updated.name, updated.description) == ("gamma", "")  # "*": the empty description too
    assert updated == await client.projects.GetProject(get, metadata=AUTH)

    limits = apb.SetProjectLimitsRequest(organization_id=org, project_id=created.id, set=[lim(1)])
    set_reply = (await manage(client, set_project_limits=limits)).limits
    assert set_reply == await client.projects.GetProjectLimits(
        apb.GetProjectLimitsRequest(organization_id=org, project_id=created.id), metadata=AUTH
    )

    made = (
        await manage(
            client, create_api_key=apb.CreateApiKeyRequest(organization_id=org, project_id=created.id, name="k")
        )
    ).created_api_key
    assert made.secret.startswith(made.key.prefix) and made.key.project_id == created.id
    check = pb.CheckRequest(api_key=made.secret, model=M)
    first, second = [await client.decisions.CheckAndConsume(check) for _ in range(2)]
    assert (first.reason, second.reason) == (pb.REASON_ALLOWED, pb.REASON_PROJECT_LIMIT)  # the limit set above

    revoked = (
        await manage(client, revoke_api_key=apb.RevokeApiKeyRequest(organization_id=org, key_id=made.key.id))
    ).revoked_api_key
    (listed,) = (
        await client.projects.ListApiKeys(
            apb.ListApiKeysRequest(organization_id=org, project_id=created.id), metadata=AUTH
        )
    ).keys
    assert revoked == listed and revoked.revoked
    assert (await client.decisions.CheckAndConsume(check)).reason == pb.REASON_INVALID_API_KEY

    deleted = (
        await manage(client, delete_project=apb.DeleteProjectRequest(organization_id=org, project_id=created.id))
    ).project
    assert deleted == updated
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.projects.GetProject(get, metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # the same engine calls: the audit trail names the resource operations
    events = await client.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(organization_id=org, project_id=created.id), metadata=AUTH
    )
    assert [e.operation for e in events.events] == [
        "DeleteProject", "RevokeApiKey", "CreateApiKey", "SetProjectLimits", "UpdateProject", "CreateProject",
    ]  # fmt: skip


async def test_a_reader_is_refused_with_the_resource_service_status_and_message(
    client: Client, redis_client: redis.asyncio.Redis
) -> None:
    world = await make_world(client)
    reader = world.tokens["reader"]
    create = apb.CreateProjectRequest(organization_id=world.org, name="nope")
    before = await snapshot(redis_client)
    with pytest.raises(grpc.aio.AioRpcError) as direct:
        await client.projects.CreateProject(create, metadata=reader)
    with pytest.raises(grpc.aio.AioRpcError) as managed:
        await manage(client, reader, create_project=create)
    assert managed.value.code() == direct.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert managed.value.details() == direct.value.details()
    assert "CreateProject needs" in (managed.value.details() or "")
    assert await snapshot(redis_client) == before


async def test_without_a_credential_it_is_unauthenticated(client: Client) -> None:
    world = await make_world(client)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await manage(client, (), get_project=apb.GetProjectRequest(organization_id=world.org, project_id=world.proj))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
