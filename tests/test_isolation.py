"""A member of organization A learns nothing about organization B.

Whatever it names of B (the organization, a project by id or by name, a key, a
member, a credential), the answer is NOT_FOUND worded exactly as for an id that
never existed, and B is left untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import redis.asyncio

from ratelimitd.engine import ids
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from tests.conftest import AUTH, Client
from tests.control import M, Metadata, add_member, bearer, snapshot, ts, usd
from tests.test_authz_matrix import usage


class Other:
    """Organization B's identifiers, or made-up ones of the same kinds."""

    def __init__(self, org: str, proj: str, proj_name: str, key: str, member: str, cred: str) -> None:
        self.org, self.proj, self.proj_name, self.key, self.member, self.cred = org, proj, proj_name, key, member, cred


def made_up() -> Other:
    return Other(
        ids.new_id("org"), ids.new_id("proj"), "no-such-project", "key_" + ids.new_id("x")[2:], ids.new_id("mem"),
        ids.new_id("cred"),
    )  # fmt: skip


Call = Callable[[Client, str, Other, Metadata], Awaitable[Any]]

# (case, call): ``a`` is the caller's own organization, ``o`` the other's ids.
CASES: list[tuple[str, Call]] = [
    ("GetOrganization", lambda c, a, o, md: c.orgs.GetOrganization(apb.GetOrganizationRequest(organization_id=o.org), metadata=md)),
    ("GetOrganizationLimits", lambda c, a, o, md: c.orgs.GetOrganizationLimits(apb.GetOrganizationLimitsRequest(organization_id=o.org), metadata=md)),
    ("ListProjects", lambda c, a, o, md: c.projects.ListProjects(apb.ListProjectsRequest(organization_id=o.org), metadata=md)),
    ("CreateProject in B", lambda c, a, o, md: c.projects.CreateProject(apb.CreateProjectRequest(organization_id=o.org, name="x"), metadata=md)),
    ("GetProject by id", lambda c, a, o, md: c.projects.GetProject(apb.GetProjectRequest(organization_id=o.org, project_id=o.proj), metadata=md)),
    ("GetProject by name", lambda c, a, o, md: c.projects.GetProject(apb.GetProjectRequest(organization_id=o.org, name=o.proj_name), metadata=md)),
    ("GetProject by B's id in A", lambda c, a, o, md: c.projects.GetProject(apb.GetProjectRequest(organization_id=a, project_id=o.proj), metadata=md)),
    ("GetProject by B's name in A", lambda c, a, o, md: c.projects.GetProject(apb.GetProjectRequest(organization_id=a, name=o.proj_name), metadata=md)),
    ("UpdateProject", lambda c, a, o, md: c.projects.UpdateProject(apb.UpdateProjectRequest(project=apb.Project(organization_id=o.org, id=o.proj, name="mine")), metadata=md)),
    ("UpdateProject B's id in A", lambda c, a, o, md: c.projects.UpdateProject(apb.UpdateProjectRequest(project=apb.Project(organization_id=a, id=o.proj, name="mine")), metadata=md)),
    ("DeleteProject", lambda c, a, o, md: c.projects.DeleteProject(apb.DeleteProjectRequest(organization_id=o.org, project_id=o.proj), metadata=md)),
    ("DeleteProject B's id in A", lambda c, a, o, md: c.projects.DeleteProject(apb.DeleteProjectRequest(organization_id=a, project_id=o.proj), metadata=md)),
    ("GetProjectLimits", lambda c, a, o, md: c.projects.GetProjectLimits(apb.GetProjectLimitsRequest(organization_id=o.org, project_id=o.proj), metadata=md)),
    ("SetProjectLimits B's id in A", lambda c, a, o, md: c.projects.SetProjectLimits(apb.SetProjectLimitsRequest(organization_id=a, project_id=o.proj, set=[apb.Limit(model=M, metric="requests", window="minute", limit=1)]), metadata=md)),
    ("CreateApiKey B's id in A", lambda c, a, o, md: c.projects.CreateApiKey(apb.CreateApiKeyRequest(organization_id=a, project_id=o.proj, name="k"), metadata=md)),
    ("ListApiKeys", lambda c, a, o, md: c.projects.ListApiKeys(apb.ListApiKeysRequest(organization_id=o.org, project_id=o.proj), metadata=md)),
    ("ListApiKeys B's id in A", lambda c, a, o, md: c.projects.ListApiKeys(apb.ListApiKeysRequest(organization_id=a, project_id=o.proj), metadata=md)),
    ("RevokeApiKey", lambda c, a, o, md: c.projects.RevokeApiKey(apb.RevokeApiKeyRequest(organization_id=o.org, key_id=o.key), metadata=md)),
    ("RevokeApiKey B's id in A", lambda c, a, o, md: c.projects.RevokeApiKey(apb.RevokeApiKeyRequest(organization_id=a, key_id=o.key), metadata=md)),
    ("GetModelPermissions", lambda c, a, o, md: c.models.GetModelPermissions(apb.GetModelPermissionsRequest(organization_id=o.org), metadata=md)),
    ("SetModelPermissions B's id in A", lambda c, a, o, md: c.models.SetModelPermissions(apb.SetModelPermissionsRequest(organization_id=a, project_id=o.proj, policy=apb.ModelPolicy(access=apb.MODEL_ACCESS_BLOCK_LIST, models=[M])), metadata=md)),
    ("ListMembers", lambda c, a, o, md: c.members.ListMembers(apb.ListMembersRequest(organization_id=o.org), metadata=md)),
    ("AddMember", lambda c, a, o, md: c.members.AddMember(apb.AddMemberRequest(organization_id=o.org, name="mole", role=apb.ROLE_OWNER), metadata=md)),
    ("UpdateMember", lambda c, a, o, md: c.members.UpdateMember(apb.UpdateMemberRequest(member=apb.Member(organization_id=o.org, id=o.member, role=apb.ROLE_READER)), metadata=md)),
    ("UpdateMember B's id in A", lambda c, a, o, md: c.members.UpdateMember(apb.UpdateMemberRequest(member=apb.Member(organization_id=a, id=o.member, role=apb.ROLE_READER)), metadata=md)),
    ("RemoveMember B's id in A", lambda c, a, o, md: c.members.RemoveMember(apb.RemoveMemberRequest(organization_id=a, member_id=o.member), metadata=md)),
    ("CreateCredential B's member in A", lambda c, a, o, md: c.creds.CreateCredential(apb.CreateCredentialRequest(organization_id=a, member_id=o.member, name="x"), metadata=md)),
    ("ListCredentials", lambda c, a, o, md: c.creds.ListCredentials(apb.ListCredentialsRequest(organization_id=o.org), metadata=md)),
    ("RevokeCredential", lambda c, a, o, md: c.creds.RevokeCredential(apb.RevokeCredentialRequest(organization_id=o.org, credential_id=o.cred), metadata=md)),
    ("RevokeCredential B's id in A", lambda c, a, o, md: c.creds.RevokeCredential(apb.RevokeCredentialRequest(organization_id=a, credential_id=o.cred), metadata=md)),
    ("ListAuditEvents", lambda c, a, o, md: c.audit.ListAuditEvents(apb.ListAuditEventsRequest(organization_id=o.org), metadata=md)),
    ("GetUsage", lambda c, a, o, md: usage(c).GetUsage(upb.GetUsageRequest(organization_id=o.org, start_time=ts(0), end_time=ts(86_400_000), granularity=upb.GRANULARITY_DAY), metadata=md)),
    ("GetSpend", lambda c, a, o, md: usage(c).GetSpend(upb.GetSpendRequest(organization_id=o.org), metadata=md)),
    ("GetLimitState", lambda c, a, o, md: usage(c).GetLimitState(upb.GetLimitStateRequest(organization_id=o.org, project_id=o.proj), metadata=md)),
    ("GetLimitState B's project in A", lambda c, a, o, md: usage(c).GetLimitState(upb.GetLimitStateRequest(organization_id=a, project_id=o.proj, models=[M]), metadata=md)),
    ("GetRequestMetrics B's project in A", lambda c, a, o, md: usage(c).GetRequestMetrics(upb.GetRequestMetricsRequest(organization_id=a, project_id=o.proj, granularity=upb.GRANULARITY_HOUR), metadata=md)),
    ("ListRequestLogs", lambda c, a, o, md: usage(c).ListRequestLogs(upb.ListRequestLogsRequest(organization_id=o.org, project_id=o.proj), metadata=md)),
    ("ListRequestLogs B's id in A", lambda c, a, o, md: usage(c).ListRequestLogs(upb.ListRequestLogsRequest(organization_id=a, project_id=o.proj), metadata=md)),
    ("SetSpendLimit", lambda c, a, o, md: usage(c).SetSpendLimit(upb.SetSpendLimitRequest(organization_id=o.org, limit_usd_micros=usd(1)), metadata=md)),
    ("SetSpendLimit B's id in A", lambda c, a, o, md: usage(c).SetSpendLimit(upb.SetSpendLimitRequest(organization_id=a, project_id=o.proj, limit_usd_micros=usd(1)), metadata=md)),
    ("ListPrices", lambda c, a, o, md: usage(c).ListPrices(upb.ListPricesRequest(organization_id=o.org), metadata=md)),
    ("CheckAndConsume by B's project", lambda c, a, o, md: c.decisions.CheckAndConsume(pb.CheckRequest(project=pb.ProjectRef(organization_id=o.org, project_id=o.proj), model=M), metadata=md)),
]  # fmt: skip


async def details(call: Call, client: Client, a: str, o: Other, md: Metadata) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call(client, a, o, md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    text = e.value.details() or ""
    for value in (o.org, o.proj, o.proj_name, o.key, o.member, o.cred):
        text = text.replace(value, "<id>")
    return text


@pytest.mark.parametrize(("case", "call"), CASES, ids=[c[0] for c in CASES])
async def test_other_organizations_look_like_nothing(
    client: Client, redis_client: redis.asyncio.Redis, case: str, call: Call
) -> None:
    a = await client.org("a", [(M, "requests", "minute", 10)])
    _, owner = await add_member(client, a, "alice", apb.ROLE_OWNER)
    b = await client.org("b", [(M, "requests", "minute", 10)])
    b_proj, b_secret = await client.project(b, "b-only")
    b_member, _ = await add_member(client, b, "bob", apb.ROLE_OWNER)
    b_key = (
        (await client.projects.ListApiKeys(apb.ListApiKeysRequest(organization_id=b, project_id=b_proj), metadata=AUTH))
        .keys[0]
        .id
    )
    b_cred = (
        (await client.creds.ListCredentials(apb.ListCredentialsRequest(organization_id=b), metadata=AUTH))
        .credentials[0]
        .id
    )
    other = Other(b, b_proj, "b-only", b_key, b_member, b_cred)
    before = await snapshot(redis_client)

    real = await details(call, client, a, other, bearer(owner))
    assert real == await details(call, client, a, made_up(), bearer(owner)), (
        "the answer tells B's ids from made-up ones"
    )
    assert await snapshot(redis_client) == before
    assert b_secret  # B's key still decides normally
    assert (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=b_secret, model=M))).allowed


async def test_members_list_only_their_own_organization(client: Client) -> None:
    a = await client.org("a", [])
    await client.org("b", [])
    _, token = await add_member(client, a, "alice", apb.ROLE_READER)
    mine = await client.orgs.ListOrganizations(apb.ListOrganizationsRequest(), metadata=bearer(token))
    assert [o.id for o in mine.organizations] == [a]
    everything = await client.orgs.ListOrganizations(apb.ListOrganizationsRequest(), metadata=AUTH)
    assert len(everything.organizations) == 2


async def test_audit_filtered_by_another_organizations_project_is_empty(client: Client) -> None:
    a = await client.org("a", [(M, "requests", "minute", 10)])
    _, owner = await add_member(client, a, "alice", apb.ROLE_OWNER)
    b = await client.org("b", [(M, "requests", "minute", 10)])
    b_proj, _ = await client.project(b, "b-only")
    reply = await client.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(organization_id=a, project_id=b_proj), metadata=bearer(owner)
    )
    assert list(reply.events) == []
