"""Every management operation x every kind of caller -> the expected status.

The expectations are written out here, independently of authz.POLICY, so the
table is the specification a reviewer reads; a coverage test checks that no
RPC and no policy entry is missing from it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from ratelimitd.engine.authz import POLICY
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import rate_limit_service_pb2 as spb
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from ratelimitd.v1 import usage_pb2_grpc
from tests.conftest import Client
from tests.control import M, Metadata, World, make_world, ts, usd

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

Call = Callable[[Client, World, Metadata], Awaitable[Any]]


def usage(client: Client) -> usage_pb2_grpc.UsageServiceAsyncStub:
    return usage_pb2_grpc.UsageServiceStub(client.channel)


def manage(client: Client, md: Metadata, **operation: Any) -> Awaitable[spb.ManageProjectResponse]:
    return client.decisions.ManageProject(spb.ManageProjectRequest(**operation), metadata=md)


def lim(model: str, value: int) -> apb.Limit:
    return apb.Limit(model=model, metric="requests", window="minute", limit=value)


# operation, the call, expected for: operator, owner, developer, reader
# (no credential and a revoked credential are UNAUTHENTICATED for every row)
MATRIX: list[tuple[str, Call, tuple[grpc.StatusCode, grpc.StatusCode, grpc.StatusCode, grpc.StatusCode]]] = [
    ("CreateOrganization", lambda c, w, md: c.orgs.CreateOrganization(apb.CreateOrganizationRequest(name="new"), metadata=md), (OK, DENIED, DENIED, DENIED)),
    ("ListOrganizations", lambda c, w, md: c.orgs.ListOrganizations(apb.ListOrganizationsRequest(), metadata=md), (OK, OK, OK, OK)),
    ("GetOrganization", lambda c, w, md: c.orgs.GetOrganization(apb.GetOrganizationRequest(organization_id=w.org), metadata=md), (OK, OK, OK, OK)),
    ("SetOrganizationLimits", lambda c, w, md: c.orgs.SetOrganizationLimits(apb.SetOrganizationLimitsRequest(organization_id=w.org, set=[lim(M, 200)]), metadata=md), (OK, DENIED, DENIED, DENIED)),
    ("GetOrganizationLimits", lambda c, w, md: c.orgs.GetOrganizationLimits(apb.GetOrganizationLimitsRequest(organization_id=w.org), metadata=md), (OK, OK, OK, OK)),
    ("CreateProject", lambda c, w, md: c.projects.CreateProject(apb.CreateProjectRequest(organization_id=w.org, name="new"), metadata=md), (OK, OK, OK, DENIED)),
    ("GetProject", lambda c, w, md: c.projects.GetProject(apb.GetProjectRequest(organization_id=w.org, name="app"), metadata=md), (OK, OK, OK, OK)),
    ("ListProjects", lambda c, w, md: c.projects.ListProjects(apb.ListProjectsRequest(organization_id=w.org), metadata=md), (OK, OK, OK, OK)),
    ("UpdateProject", lambda c, w, md: c.projects.UpdateProject(apb.UpdateProjectRequest(project=apb.Project(organization_id=w.org, id=w.proj, description="d")), metadata=md), (OK, OK, OK, DENIED)),
    ("DeleteProject", lambda c, w, md: c.projects.DeleteProject(apb.DeleteProjectRequest(organization_id=w.org, project_id=w.proj), metadata=md), (OK, OK, OK, DENIED)),
    ("SetProjectLimits", lambda c, w, md: c.projects.SetProjectLimits(apb.SetProjectLimitsRequest(organization_id=w.org, project_id=w.proj, set=[lim(M, 5)]), metadata=md), (OK, OK, OK, DENIED)),
    ("GetProjectLimits", lambda c, w, md: c.projects.GetProjectLimits(apb.GetProjectLimitsRequest(organization_id=w.org, project_id=w.proj), metadata=md), (OK, OK, OK, OK)),
    ("CreateApiKey", lambda c, w, md: c.projects.CreateApiKey(apb.CreateApiKeyRequest(organization_id=w.org, project_id=w.proj, name="k"), metadata=md), (OK, OK, OK, DENIED)),
    ("ListApiKeys", lambda c, w, md: c.projects.ListApiKeys(apb.ListApiKeysRequest(organization_id=w.org, project_id=w.proj), metadata=md), (OK, OK, OK, OK)),
    ("RevokeApiKey", lambda c, w, md: c.projects.RevokeApiKey(apb.RevokeApiKeyRequest(organization_id=w.org, key_id=w.key_id), metadata=md), (OK, OK, OK, DENIED)),
    ("GetModelPermissions", lambda c, w, md: c.models.GetModelPermissions(apb.GetModelPermissionsRequest(organization_id=w.org, project_id=w.proj), metadata=md), (OK, OK, OK, OK)),
    ("SetOrganizationModelPermissions", lambda c, w, md: c.models.SetModelPermissions(apb.SetModelPermissionsRequest(organization_id=w.org, policy=apb.ModelPolicy(access=apb.MODEL_ACCESS_BLOCK_LIST, models=["x"])), metadata=md), (OK, OK, OK, DENIED)),
    ("SetProjectModelPermissions", lambda c, w, md: c.models.SetModelPermissions(apb.SetModelPermissionsRequest(organization_id=w.org, project_id=w.proj, policy=apb.ModelPolicy(access=apb.MODEL_ACCESS_ALLOW_LIST, models=[M])), metadata=md), (OK, OK, OK, DENIED)),
    ("AddMember", lambda c, w, md: c.members.AddMember(apb.AddMemberRequest(organization_id=w.org, name="newbie", role=apb.ROLE_READER), metadata=md), (OK, OK, OK, DENIED)),
    ("ListMembers", lambda c, w, md: c.members.ListMembers(apb.ListMembersRequest(organization_id=w.org), metadata=md), (OK, OK, OK, OK)),
    ("UpdateMember", lambda c, w, md: c.members.UpdateMember(apb.UpdateMemberRequest(member=apb.Member(organization_id=w.org, id=w.members["sam"], role=apb.ROLE_DEVELOPER)), metadata=md), (OK, OK, OK, DENIED)),
    ("RemoveMember", lambda c, w, md: c.members.RemoveMember(apb.RemoveMemberRequest(organization_id=w.org, member_id=w.members["sam"]), metadata=md), (OK, OK, OK, DENIED)),
    ("CreateCredential", lambda c, w, md: c.creds.CreateCredential(apb.CreateCredentialRequest(organization_id=w.org, member_id=w.members["sam"], name="ci"), metadata=md), (OK, OK, OK, DENIED)),
    ("ListCredentials", lambda c, w, md: c.creds.ListCredentials(apb.ListCredentialsRequest(organization_id=w.org), metadata=md), (OK, OK, OK, DENIED)),
    ("RevokeCredential", lambda c, w, md: c.creds.RevokeCredential(apb.RevokeCredentialRequest(organization_id=w.org, credential_id=w.spare_credential), metadata=md), (OK, OK, OK, DENIED)),
    ("CreateCredential (operator)", lambda c, w, md: c.creds.CreateCredential(apb.CreateCredentialRequest(name="ops"), metadata=md), (OK, DENIED, DENIED, DENIED)),
    ("ListCredentials (operator)", lambda c, w, md: c.creds.ListCredentials(apb.ListCredentialsRequest(), metadata=md), (OK, DENIED, DENIED, DENIED)),
    ("RevokeCredential (operator)", lambda c, w, md: c.creds.RevokeCredential(apb.RevokeCredentialRequest(credential_id=w.spare_operator_credential), metadata=md), (OK, DENIED, DENIED, DENIED)),
    ("WhoAmI", lambda c, w, md: c.creds.WhoAmI(apb.WhoAmIRequest(), metadata=md), (OK, OK, OK, OK)),
    ("ListAuditEvents", lambda c, w, md: c.audit.ListAuditEvents(apb.ListAuditEventsRequest(organization_id=w.org, project_id=w.proj), metadata=md), (OK, OK, OK, DENIED)),
    ("ListAuditEvents (platform)", lambda c, w, md: c.audit.ListAuditEvents(apb.ListAuditEventsRequest(), metadata=md), (OK, DENIED, DENIED, DENIED)),
    ("GetUsage", lambda c, w, md: usage(c).GetUsage(upb.GetUsageRequest(organization_id=w.org, start_time=ts(0), end_time=ts(86_400_000), granularity=upb.GRANULARITY_DAY), metadata=md), (OK, OK, OK, OK)),
    ("GetSpend", lambda c, w, md: usage(c).GetSpend(upb.GetSpendRequest(organization_id=w.org), metadata=md), (OK, OK, OK, OK)),
    ("ListRequestLogs", lambda c, w, md: usage(c).ListRequestLogs(upb.ListRequestLogsRequest(organization_id=w.org, project_id=w.proj), metadata=md), (OK, OK, OK, OK)),
    ("ListPrices", lambda c, w, md: usage(c).ListPrices(upb.ListPricesRequest(organization_id=w.org), metadata=md), (OK, OK, OK, OK)),
    ("GetUsageSettings", lambda c, w, md: usage(c).GetUsageSettings(upb.GetUsageSettingsRequest(organization_id=w.org), metadata=md), (OK, OK, OK, OK)),
    ("GetLimitState", lambda c, w, md: usage(c).GetLimitState(upb.GetLimitStateRequest(organization_id=w.org, project_id=w.proj), metadata=md), (OK, OK, OK, OK)),
    ("GetRequestMetrics", lambda c, w, md: usage(c).GetRequestMetrics(upb.GetRequestMetricsRequest(organization_id=w.org, project_id=w.proj, granularity=upb.GRANULARITY_HOUR), metadata=md), (OK, OK, OK, OK)),
    ("SetSpendLimit", lambda c, w, md: usage(c).SetSpendLimit(upb.SetSpendLimitRequest(organization_id=w.org, project_id=w.proj, limit_usd_micros=usd(10)), metadata=md), (OK, OK, OK, DENIED)),
    ("SetPrice", lambda c, w, md: usage(c).SetPrice(upb.SetPriceRequest(price=upb.Price(organization_id=w.org, model=M, input_usd_micros_per_million=usd(1))), metadata=md), (OK, OK, OK, DENIED)),
    ("SetUsageSettings", lambda c, w, md: usage(c).SetUsageSettings(upb.SetUsageSettingsRequest(settings=upb.UsageSettings(organization_id=w.org, cached_tokens_count_toward_limits=True)), metadata=md), (OK, DENIED, DENIED, DENIED)),
    # ManageProject: each operation exactly as the ProjectService RPC it names (no rules of its own)
    ("ManageProject create_project", lambda c, w, md: manage(c, md, create_project=apb.CreateProjectRequest(organization_id=w.org, name="new")), (OK, OK, OK, DENIED)),
    ("ManageProject get_project", lambda c, w, md: manage(c, md, get_project=apb.GetProjectRequest(organization_id=w.org, name="app")), (OK, OK, OK, OK)),
    ("ManageProject update_project", lambda c, w, md: manage(c, md, update_project=apb.UpdateProjectRequest(project=apb.Project(organization_id=w.org, id=w.proj, description="d"))), (OK, OK, OK, DENIED)),
    ("ManageProject delete_project", lambda c, w, md: manage(c, md, delete_project=apb.DeleteProjectRequest(organization_id=w.org, project_id=w.proj)), (OK, OK, OK, DENIED)),
    ("ManageProject list_projects", lambda c, w, md: manage(c, md, list_projects=apb.ListProjectsRequest(organization_id=w.org)), (OK, OK, OK, OK)),
    ("ManageProject set_project_limits", lambda c, w, md: manage(c, md, set_project_limits=apb.SetProjectLimitsRequest(organization_id=w.org, project_id=w.proj, set=[lim(M, 5)])), (OK, OK, OK, DENIED)),
    ("ManageProject get_project_limits", lambda c, w, md: manage(c, md, get_project_limits=apb.GetProjectLimitsRequest(organization_id=w.org, project_id=w.proj)), (OK, OK, OK, OK)),
    ("ManageProject create_api_key", lambda c, w, md: manage(c, md, create_api_key=apb.CreateApiKeyRequest(organization_id=w.org, project_id=w.proj, name="k")), (OK, OK, OK, DENIED)),
    ("ManageProject list_api_keys", lambda c, w, md: manage(c, md, list_api_keys=apb.ListApiKeysRequest(organization_id=w.org, project_id=w.proj)), (OK, OK, OK, OK)),
    ("ManageProject revoke_api_key", lambda c, w, md: manage(c, md, revoke_api_key=apb.RevokeApiKeyRequest(organization_id=w.org, key_id=w.key_id)), (OK, OK, OK, DENIED)),
    ("CheckAndConsumeByProject", lambda c, w, md: c.decisions.CheckAndConsume(pb.CheckRequest(project=pb.ProjectRef(organization_id=w.org, project_id=w.proj), model=M), metadata=md), (OK, DENIED, DENIED, DENIED)),
]  # fmt: skip

CALLERS = ("operator", "owner", "developer", "reader", "none", "revoked")
CASES = [
    pytest.param(call, caller, expected[i] if i < 4 else UNAUTHENTICATED, id=f"{name}-{caller}")
    for name, call, expected in MATRIX
    for i, caller in enumerate(CALLERS)
]


@pytest.mark.parametrize(("call", "caller", "expected"), CASES)
async def test_who_may_do_what(client: Client, call: Call, caller: str, expected: grpc.StatusCode) -> None:
    world = await make_world(client)
    try:
        await call(client, world, world.tokens[caller])
        code = OK
    except grpc.aio.AioRpcError as e:
        code = e.code()
        assert e.details(), "an error must say why"
    assert code == expected


def test_the_matrix_covers_every_rpc_and_every_policy_entry() -> None:
    from ratelimitd.v1 import admin_pb2, usage_pb2

    rpcs = {m.name for f in (admin_pb2, usage_pb2) for s in f.DESCRIPTOR.services_by_name.values() for m in s.methods}
    covered = {name.split(" ")[0] for name, _, _ in MATRIX}
    assert rpcs - covered == {"SetModelPermissions"}  # its rows are named after the two scopes it serves
    operations = {f.name for f in spb.ManageProjectRequest.DESCRIPTOR.oneofs_by_name["operation"].fields}
    assert operations == {name.split(" ")[1] for name, _, _ in MATRIX if name.startswith("ManageProject ")}
    policy_names = {name for name, _, _ in MATRIX if " " not in name}
    assert set(POLICY) - policy_names == set()
