"""Bad management input: a precise status and message for every field, and nothing stored."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis.asyncio
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import rate_limit_service_pb2 as spb
from tests.conftest import AUTH, Client
from tests.control import M, World, make_world, snapshot, ts

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND

Call = Callable[[Client, World], Awaitable[Any]]


def new_project(name: str = "ok", description: str = "") -> Call:
    return lambda c, w: c.projects.CreateProject(
        apb.CreateProjectRequest(organization_id=w.org, name=name, description=description), metadata=AUTH
    )


def update_project(project_id: str = "", mask: list[str] | None = None, **fields: Any) -> Call:
    # No state in the closure: each backend's run of a case calls it afresh (a pop() here made
    # the second run update the world's real project).
    return lambda c, w: c.projects.UpdateProject(
        apb.UpdateProjectRequest(
            project=apb.Project(organization_id=w.org, id=project_id or w.proj, **fields),
            update_mask=None if mask is None else FieldMask(paths=mask),
        ),
        metadata=AUTH,
    )


def update_member(mask: list[str] | None = None, **fields: Any) -> Call:
    return lambda c, w: c.members.UpdateMember(
        apb.UpdateMemberRequest(
            member=apb.Member(organization_id=w.org, id=w.members["sam"], **fields),
            update_mask=None if mask is None else FieldMask(paths=mask),
        ),
        metadata=AUTH,
    )


def manage(**operation: Any) -> Call:
    """ManageProject with one operation, built from the world (ids are filled in by the lambda)."""
    return lambda c, w: c.decisions.ManageProject(
        spb.ManageProjectRequest(**{k: v(w) for k, v in operation.items()}), metadata=AUTH
    )


def org_limit(model: str = M, metric: str = "requests", window: str = "minute", value: int = 1) -> Call:
    return lambda c, w: c.orgs.SetOrganizationLimits(
        apb.SetOrganizationLimitsRequest(
            organization_id=w.org, set=[apb.Limit(model=model, metric=metric, window=window, limit=value)]
        ),
        metadata=AUTH,
    )


def add_member(name: str = "newbie", role: int = apb.ROLE_READER) -> Call:
    return lambda c, w: c.members.AddMember(
        apb.AddMemberRequest(organization_id=w.org, name=name, role=role),  # type: ignore[arg-type]
        metadata=AUTH,
    )


def models(access: int, names: list[str], project: bool = False) -> Call:
    return lambda c, w: c.models.SetModelPermissions(
        apb.SetModelPermissionsRequest(
            organization_id=w.org,
            project_id=w.proj if project else "",
            policy=apb.ModelPolicy(access=access, models=names),  # type: ignore[arg-type]
        ),
        metadata=AUTH,
    )


def audit(**fields: Any) -> Call:
    return lambda c, w: c.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(organization_id=w.org, **fields), metadata=AUTH
    )


@dataclass
class After:
    """A call refused because of what ``first`` set up (the snapshot is taken between them)."""

    first: Call
    then: Call


ALLOW, BLOCK, ALL = apb.MODEL_ACCESS_ALLOW_LIST, apb.MODEL_ACCESS_BLOCK_LIST, apb.MODEL_ACCESS_UNRESTRICTED

CASES: list[tuple[str, Call | After, grpc.StatusCode, str]] = [
    # organizations
    ("org name empty", lambda c, w: c.orgs.CreateOrganization(apb.CreateOrganizationRequest(name=" "), metadata=AUTH), INVALID, "organization name is empty"),
    ("org name long", lambda c, w: c.orgs.CreateOrganization(apb.CreateOrganizationRequest(name="o" * 129), metadata=AUTH), INVALID, "organization name is 129 characters long, at most 128"),
    ("org name control", lambda c, w: c.orgs.CreateOrganization(apb.CreateOrganizationRequest(name="a\nb"), metadata=AUTH), INVALID, "organization name contains control characters"),
    ("org id malformed", lambda c, w: c.orgs.GetOrganization(apb.GetOrganizationRequest(organization_id="acme"), metadata=AUTH), INVALID, "organization_id 'acme' is not a org_ id"),
    ("org id empty", lambda c, w: c.projects.ListProjects(apb.ListProjectsRequest(), metadata=AUTH), INVALID, "organization_id is empty"),
    ("org page size", lambda c, w: c.orgs.ListOrganizations(apb.ListOrganizationsRequest(page_size=-1), metadata=AUTH), INVALID, "page_size is -1"),
    # organization limits
    ("org limit negative", org_limit(value=-1), INVALID, "limit -1 is negative"),
    ("org limit huge", org_limit(value=10**13), INVALID, "limit 10000000000000 is above the maximum 1000000000000"),
    ("org limit metric", org_limit(metric="images"), INVALID, "metric 'images' is not one of requests, tokens"),
    ("org limit window", org_limit(window="week"), INVALID, "window 'week' is not one of minute, day"),
    ("org limit model empty", org_limit(model=""), INVALID, "model is empty"),
    ("org limit model chars", org_limit(model="a b"), INVALID, "model 'a b' has characters other than"),
    ("org limit model long", org_limit(model="m" * 129), INVALID, "model is 129 characters long, at most 128"),
    ("org limit twice", lambda c, w: c.orgs.SetOrganizationLimits(apb.SetOrganizationLimitsRequest(organization_id=w.org, set=[apb.Limit(model=M, metric="requests", window="minute", limit=1)] * 2), metadata=AUTH), INVALID, "is named twice"),
    ("org limit set and cleared", lambda c, w: c.orgs.SetOrganizationLimits(apb.SetOrganizationLimitsRequest(organization_id=w.org, set=[apb.Limit(model=M, metric="requests", window="minute", limit=1)], clear=[apb.LimitKey(model=M, metric="requests", window="minute")]), metadata=AUTH), INVALID, "is both set and cleared"),
    # projects
    ("project name empty", new_project(""), INVALID, "project name '' is not valid: 1 to 64 characters"),
    ("project name upper", new_project("MyApp"), INVALID, "project name 'MyApp' is not valid"),
    ("project name space", new_project("my app"), INVALID, "project name 'my app' is not valid"),
    ("project name dash first", new_project("-app"), INVALID, "project name '-app' is not valid"),
    ("project name underscore", new_project("my_app"), INVALID, "project name 'my_app' is not valid"),
    ("project name long", new_project("p" * 65), INVALID, "is not valid: 1 to 64 characters"),
    ("project name unicode", new_project("prüd"), INVALID, "project name 'prüd' is not valid"),
    ("project name taken", new_project("app"), EXISTS, "a project named 'app' already exists"),
    ("description long", new_project(description="d" * 1025), INVALID, "description is 1025 characters long, at most 1024"),
    ("description control", new_project(description="a\x00b"), INVALID, "description contains control characters"),
    ("get project both", lambda c, w: c.projects.GetProject(apb.GetProjectRequest(organization_id=w.org, project_id=w.proj, name="app"), metadata=AUTH), INVALID, "set exactly one of project_id and name"),
    ("get project neither", lambda c, w: c.projects.GetProject(apb.GetProjectRequest(organization_id=w.org), metadata=AUTH), INVALID, "set exactly one of project_id and name"),
    ("project id malformed", lambda c, w: c.projects.GetProject(apb.GetProjectRequest(organization_id=w.org, project_id="app"), metadata=AUTH), INVALID, "project_id 'app' is not a proj_ id"),
    ("list page size big", lambda c, w: c.projects.ListProjects(apb.ListProjectsRequest(organization_id=w.org, page_size=1001), metadata=AUTH), INVALID, "page_size is 1001; at most 1000"),
    ("list page token", lambda c, w: c.projects.ListProjects(apb.ListProjectsRequest(organization_id=w.org, page_token="garbage"), metadata=AUTH), INVALID, "page_token is not one this server issued"),
    ("update nothing", update_project(), INVALID, "nothing to update: set name or description"),
    ("update mask unknown path", update_project(mask=["name", "colour"], name="x"), INVALID, "update_mask path 'colour' cannot be updated; use 'name', 'description', '*'"),
    ("update mask output-only path", update_project(mask=["create_time"]), INVALID, "update_mask path 'create_time' cannot be updated"),
    ("update mask empty name", update_project(mask=["name"]), INVALID, "project name '' is not valid"),
    ("update name bad", update_project(name="Bad"), INVALID, "project name 'Bad' is not valid"),
    ("update name taken", After(new_project("other"), update_project(name="other")), EXISTS, "a project named 'other' already exists"),
    ("update description long", update_project(description="d" * 1025), INVALID, "description is 1025 characters long"),
    ("update missing project", update_project(project_id="proj_aaaaaaaaaaaa", name="x"), NOT_FOUND, "project proj_aaaaaaaaaaaa does not exist"),
    ("delete missing project", lambda c, w: c.projects.DeleteProject(apb.DeleteProjectRequest(organization_id=w.org, project_id="proj_aaaaaaaaaaaa"), metadata=AUTH), NOT_FOUND, "project proj_aaaaaaaaaaaa does not exist"),
    # project limits
    ("project limit above org", lambda c, w: c.projects.SetProjectLimits(apb.SetProjectLimitsRequest(organization_id=w.org, project_id=w.proj, set=[apb.Limit(model=M, metric="requests", window="minute", limit=101)]), metadata=AUTH), PRECONDITION, "project limit 101 for llama-3.1-8b-instant requests per minute is above the organization's limit 100"),
    ("project limit no org model", lambda c, w: c.projects.SetProjectLimits(apb.SetProjectLimitsRequest(organization_id=w.org, project_id=w.proj, set=[apb.Limit(model="other", metric="requests", window="minute", limit=1)]), metadata=AUTH), PRECONDITION, "has no limits for model 'other'"),
    # API keys
    ("key name empty", lambda c, w: c.projects.CreateApiKey(apb.CreateApiKeyRequest(organization_id=w.org, project_id=w.proj, name=""), metadata=AUTH), INVALID, "key name is empty"),
    ("key name long", lambda c, w: c.projects.CreateApiKey(apb.CreateApiKeyRequest(organization_id=w.org, project_id=w.proj, name="k" * 129), metadata=AUTH), INVALID, "key name is 129 characters long"),
    ("key id malformed", lambda c, w: c.projects.RevokeApiKey(apb.RevokeApiKeyRequest(organization_id=w.org, key_id="rlk_x"), metadata=AUTH), INVALID, "key_id 'rlk_x' is not a key_ id"),
    # members
    ("member name empty", add_member(""), INVALID, "member name is empty"),
    ("member name spaces", add_member(" bob"), INVALID, "member name starts or ends with whitespace"),
    ("member name long", add_member("b" * 129), INVALID, "member name is 129 characters long, at most 128"),
    ("member name control", add_member("b\tob"), INVALID, "member name contains control characters"),
    ("member role missing", add_member(role=apb.ROLE_UNSPECIFIED), INVALID, "role is not set"),
    ("member name taken", add_member("alice"), EXISTS, "a member named 'alice' already exists"),
    ("member id malformed", lambda c, w: c.members.RemoveMember(apb.RemoveMemberRequest(organization_id=w.org, member_id="alice"), metadata=AUTH), INVALID, "member_id 'alice' is not a mem_ id"),
    ("update role missing", update_member(), INVALID, "nothing to update: set role, or name it in update_mask"),
    ("update role masked but unset", update_member(mask=["role"]), INVALID, "role is not set"),
    ("update member mask path", update_member(mask=["name"], name="x", role=apb.ROLE_OWNER), INVALID, "update_mask path 'name' cannot be updated; use 'role', '*'"),
    ("members page token", lambda c, w: c.members.ListMembers(apb.ListMembersRequest(organization_id=w.org, page_token="garbage"), metadata=AUTH), INVALID, "page_token is not one this server issued"),
    ("members page size", lambda c, w: c.members.ListMembers(apb.ListMembersRequest(organization_id=w.org, page_size=1001), metadata=AUTH), INVALID, "page_size is 1001; at most 1000"),
    ("credentials page token", lambda c, w: c.creds.ListCredentials(apb.ListCredentialsRequest(organization_id=w.org, page_token="bm9wZQ=="), metadata=AUTH), INVALID, "page_token is not one this server issued"),
    ("keys page token", lambda c, w: c.projects.ListApiKeys(apb.ListApiKeysRequest(organization_id=w.org, project_id=w.proj, page_token="garbage"), metadata=AUTH), INVALID, "page_token is not one this server issued"),
    ("remove missing member", lambda c, w: c.members.RemoveMember(apb.RemoveMemberRequest(organization_id=w.org, member_id="mem_aaaaaaaaaaaa"), metadata=AUTH), NOT_FOUND, "member mem_aaaaaaaaaaaa does not exist"),
    # credentials
    ("credential name empty", lambda c, w: c.creds.CreateCredential(apb.CreateCredentialRequest(organization_id=w.org, member_id=w.members["sam"], name=""), metadata=AUTH), INVALID, "credential name is empty"),
    ("operator credential name", lambda c, w: c.creds.CreateCredential(apb.CreateCredentialRequest(name="x" * 129), metadata=AUTH), INVALID, "credential name is 129 characters long"),
    ("credential member without org", lambda c, w: c.creds.CreateCredential(apb.CreateCredentialRequest(member_id=w.members["sam"], name="x"), metadata=AUTH), INVALID, "member_id needs organization_id"),
    ("credential missing member", lambda c, w: c.creds.CreateCredential(apb.CreateCredentialRequest(organization_id=w.org, member_id="mem_aaaaaaaaaaaa", name="x"), metadata=AUTH), NOT_FOUND, "member mem_aaaaaaaaaaaa does not exist"),
    ("credential id malformed", lambda c, w: c.creds.RevokeCredential(apb.RevokeCredentialRequest(organization_id=w.org, credential_id="x"), metadata=AUTH), INVALID, "credential_id 'x' is not a cred_ id"),
    ("credential missing", lambda c, w: c.creds.RevokeCredential(apb.RevokeCredentialRequest(organization_id=w.org, credential_id="cred_aaaaaaaaaaaa"), metadata=AUTH), NOT_FOUND, "credential cred_aaaaaaaaaaaa does not exist"),
    # model permissions
    ("models with unrestricted", models(ALL, [M]), INVALID, "models must be empty when access is unrestricted"),
    ("models empty name", models(BLOCK, [M, ""]), INVALID, "models[1]: model is empty"),
    ("models wildcard", models(ALLOW, ["*"]), INVALID, "models[0]: model '*' names the default limit"),
    ("models bad chars", models(BLOCK, ["a|b"]), INVALID, "models[0]: model 'a|b' has characters other than"),
    ("models long name", models(BLOCK, ["m" * 129]), INVALID, "models[0]: model is 129 characters long, at most 128"),
    ("models twice", models(BLOCK, [M, M]), INVALID, "models[1]: model 'llama-3.1-8b-instant' is named twice"),
    ("models too many", models(BLOCK, [f"m{i}" for i in range(257)]), INVALID, "257 models are listed, at most 256"),
    ("models access unknown", models(7, []), INVALID, "policy.access 7 is not a ModelAccess value"),
    ("models access unset", models(apb.MODEL_ACCESS_UNSPECIFIED, []), INVALID, "policy.access is not set: use MODEL_ACCESS_UNRESTRICTED"),
    ("project widens org allow-list", After(models(ALLOW, [M]), models(ALLOW, [M, "other"], project=True)), PRECONDITION, "model 'other' is not on organization"),
    ("project allows org-blocked", After(models(BLOCK, ["other"]), models(ALLOW, ["other"], project=True)), PRECONDITION, "model 'other' is on organization"),
    # audit
    ("audit since after until", audit(start_time=ts(2000), end_time=ts(1000)), INVALID, "start_time (2000 ms) is after end_time (1000 ms)"),
    ("audit negative", audit(start_time=ts(-1)), INVALID, "start_time is -1 s, before 1970-01-01T00:00:00Z"),
    ("audit bad nanos", audit(end_time=Timestamp(seconds=1, nanos=-5)), INVALID, "end_time.nanos is -5"),
    # ManageProject: the same validation as ProjectService, nothing stored
    ("manage no operation", lambda c, w: c.decisions.ManageProject(spb.ManageProjectRequest(), metadata=AUTH), INVALID, "operation is not set: set one of create_project, get_project"),
    ("manage create name bad", manage(create_project=lambda w: apb.CreateProjectRequest(organization_id=w.org, name="My App")), INVALID, "project name 'My App' is not valid"),
    ("manage create name taken", manage(create_project=lambda w: apb.CreateProjectRequest(organization_id=w.org, name="app")), EXISTS, "a project named 'app' already exists"),
    ("manage update mask path", manage(update_project=lambda w: apb.UpdateProjectRequest(project=apb.Project(organization_id=w.org, id=w.proj, name="x"), update_mask=FieldMask(paths=["nam"]))), INVALID, "update_mask path 'nam' cannot be updated"),
    ("manage limit above org", manage(set_project_limits=lambda w: apb.SetProjectLimitsRequest(organization_id=w.org, project_id=w.proj, set=[apb.Limit(model=M, metric="requests", window="minute", limit=10**9)])), PRECONDITION, "is above the organization's limit"),
    ("manage key on missing project", manage(create_api_key=lambda w: apb.CreateApiKeyRequest(organization_id=w.org, project_id="proj_aaaaaaaaaaaa", name="k")), NOT_FOUND, "project proj_aaaaaaaaaaaa does not exist"),
    ("manage revoke malformed key", manage(revoke_api_key=lambda w: apb.RevokeApiKeyRequest(organization_id=w.org, key_id="k1")), INVALID, "key_id 'k1' is not a key_ id"),
    ("manage list keys page token", manage(list_api_keys=lambda w: apb.ListApiKeysRequest(organization_id=w.org, project_id=w.proj, page_token="garbage")), INVALID, "page_token is not one this server issued"),
    ("audit page token", audit(page_token="garbage"), INVALID, "page_token is not one this server issued"),
    ("audit project malformed", audit(project_id="app"), INVALID, "project_id 'app' is not a proj_ id"),
    ("audit project without org", lambda c, w: c.audit.ListAuditEvents(apb.ListAuditEventsRequest(project_id=w.proj), metadata=AUTH), INVALID, "project_id needs organization_id"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "call", "code", "message"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input_is_refused_precisely_and_stores_nothing(
    client: Client,
    redis_client: redis.asyncio.Redis,
    case: str,
    call: Call | After,
    code: grpc.StatusCode,
    message: str,
) -> None:
    world = await make_world(client)
    if isinstance(call, After):
        await call.first(client, world)
        call = call.then
    before = await snapshot(redis_client)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call(client, world)
    assert e.value.code() == code
    assert message in (e.value.details() or ""), e.value.details()
    assert await snapshot(redis_client) == before


@pytest.mark.parametrize("which", ["remove", "demote"])
async def test_the_last_owner_stays(client: Client, redis_client: redis.asyncio.Redis, which: str) -> None:
    org = await client.org("o", [])
    reply = await client.members.AddMember(
        apb.AddMemberRequest(organization_id=org, name="only", role=apb.ROLE_OWNER), metadata=AUTH
    )
    before = await snapshot(redis_client)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        if which == "remove":
            await client.members.RemoveMember(
                apb.RemoveMemberRequest(organization_id=org, member_id=reply.member.id), metadata=AUTH
            )
        else:
            await client.members.UpdateMember(
                apb.UpdateMemberRequest(
                    member=apb.Member(organization_id=org, id=reply.member.id, role=apb.ROLE_READER)
                ),
                metadata=AUTH,
            )
    assert e.value.code() == PRECONDITION
    assert "is the last owner of organization" in (e.value.details() or "")
    assert await snapshot(redis_client) == before


async def test_the_last_operator_credential_stays(client: Client, redis_client: redis.asyncio.Redis) -> None:
    (only,) = (await client.creds.ListCredentials(apb.ListCredentialsRequest(), metadata=AUTH)).credentials
    before = await snapshot(redis_client)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.creds.RevokeCredential(apb.RevokeCredentialRequest(credential_id=only.id), metadata=AUTH)
    assert e.value.code() == PRECONDITION
    assert "is the last operator credential" in (e.value.details() or "")
    assert await snapshot(redis_client) == before
