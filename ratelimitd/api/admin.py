"""The management services over the control plane.

Each method does two things: one engine call, and the reply. api/gate.py has
authenticated and authorized the caller before the method runs (``caller()`` says
who it is, for the audit trail). Rules live in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from ratelimitd.api.errors import rpc
from ratelimitd.api.gate import caller
from ratelimitd.api.wellknown import by_creation, milliseconds, page, timestamp, timestamp_or_none, update_paths
from ratelimitd.core.errors import InvalidArgument
from ratelimitd.engine.audit import AuditEvent
from ratelimitd.engine.authz import Principal, Role
from ratelimitd.engine.control import ApiKeyInfo, ControlPlane, EffectiveLimit
from ratelimitd.engine.credentials import CredentialInfo, Credentials
from ratelimitd.engine.limits import LimitSpec
from ratelimitd.engine.members import MemberInfo, Members
from ratelimitd.engine.organizations import OrganizationInfo
from ratelimitd.engine.permissions import Access, ModelPermissions, ModelPolicy
from ratelimitd.engine.projects import ProjectInfo
from ratelimitd.v1 import admin_pb2 as pb
from ratelimitd.v1 import admin_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

_ROLES: dict[int, Role] = {pb.ROLE_OWNER: Role.OWNER, pb.ROLE_DEVELOPER: Role.DEVELOPER, pb.ROLE_READER: Role.READER}
_ROLE_PB = {v: pb.Role.ValueType(k) for k, v in _ROLES.items()}
_ACCESS: dict[int, Access] = {
    pb.MODEL_ACCESS_UNRESTRICTED: Access.UNRESTRICTED,
    pb.MODEL_ACCESS_ALLOW_LIST: Access.ALLOW,
    pb.MODEL_ACCESS_BLOCK_LIST: Access.BLOCK,
}
_ACCESS_PB = {v: pb.ModelAccess.ValueType(k) for k, v in _ACCESS.items()}


def _role(value: int) -> Role:
    role = _ROLES.get(value)
    if role is None:
        raise InvalidArgument("role is not set: use ROLE_OWNER, ROLE_DEVELOPER or ROLE_READER")
    return role


def _access(value: int) -> Access:
    access = _ACCESS.get(value)
    if value == pb.MODEL_ACCESS_UNSPECIFIED:
        raise InvalidArgument(
            "policy.access is not set: use MODEL_ACCESS_UNRESTRICTED, MODEL_ACCESS_ALLOW_LIST or "
            "MODEL_ACCESS_BLOCK_LIST"
        )
    if access is None:
        raise InvalidArgument(f"policy.access {value} is not a ModelAccess value")
    return access


def _limits(specs: Sequence[LimitSpec]) -> list[pb.Limit]:
    return [pb.Limit(model=s.model, metric=s.dimension.metric, window=s.dimension.window, limit=s.value) for s in specs]


def _effective(e: EffectiveLimit) -> pb.EffectiveLimit:
    msg = pb.EffectiveLimit(model=e.model, metric=e.dimension.metric, window=e.dimension.window)
    if e.custom is not None:
        msg.custom = e.custom
    if e.organization is not None:
        msg.organization = e.organization
    if e.effective is not None:
        msg.effective = e.effective
    return msg


def _organization(o: OrganizationInfo) -> pb.Organization:
    return pb.Organization(id=o.id, name=o.name, create_time=timestamp(o.created_at_ms))


def _project(p: ProjectInfo) -> pb.Project:
    return pb.Project(
        id=p.id, organization_id=p.organization_id, name=p.name, description=p.description,
        create_time=timestamp(p.created_at_ms),
    )  # fmt: skip


def _key(k: ApiKeyInfo) -> pb.ApiKey:
    return pb.ApiKey(
        id=k.id, project_id=k.project_id, name=k.name, prefix=k.prefix, create_time=timestamp(k.created_at_ms),
        last_use_time=timestamp_or_none(k.last_used_at_ms), revoked=k.revoked,
    )  # fmt: skip


def _policy(p: ModelPolicy) -> pb.ModelPolicy:
    return pb.ModelPolicy(access=_ACCESS_PB[p.access], models=p.models)


def _member(m: MemberInfo) -> pb.Member:
    return pb.Member(
        id=m.id, organization_id=m.organization_id, name=m.name, role=_ROLE_PB[m.role],
        create_time=timestamp(m.created_at_ms),
    )  # fmt: skip


def _credential(c: CredentialInfo) -> pb.Credential:
    return pb.Credential(
        id=c.id, kind=c.kind, name=c.name, create_time=timestamp(c.created_at_ms),
        organization_id=c.organization_id, member_id=c.member_id,
    )  # fmt: skip


def _principal(p: Principal) -> pb.Principal:
    return pb.Principal(
        credential_id=p.credential_id, kind=p.kind, name=p.name, organization_id=p.organization_id,
        member_id=p.member_id, role=_ROLE_PB[p.role] if p.role else pb.ROLE_UNSPECIFIED,
    )  # fmt: skip


def _event(e: AuditEvent) -> pb.AuditEvent:
    a = e.actor
    role = _ROLE_PB.get(Role(a["role"])) if a.get("role") else None
    actor = pb.Principal(
        credential_id=a.get("cred", ""), kind=a.get("kind", ""), name=a.get("name", ""),
        member_id=a.get("member", ""), role=role or pb.ROLE_UNSPECIFIED,
    )  # fmt: skip
    return pb.AuditEvent(
        id=e.id, event_time=timestamp(e.time_ms), operation=e.operation, actor=actor, project_id=e.project_id,
        target=e.target, before=e.before, after=e.after,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Management:
    """The engine objects the management services use."""

    control: ControlPlane
    credentials: Credentials
    members: Members
    permissions: ModelPermissions


class _Servicer:
    def __init__(self, management: Management, storage_failed: Callable[[], None]) -> None:
        self.m = management
        self.control = management.control
        self.storage_failed = storage_failed


class OrganizationServicer(_Servicer, admin_pb2_grpc.OrganizationServiceServicer):
    @rpc
    async def CreateOrganization(self, request: pb.CreateOrganizationRequest, context: Context) -> pb.Organization:
        actor = caller()
        return _organization(await self.control.create_organization(request.name, actor=actor))

    @rpc
    async def GetOrganization(self, request: pb.GetOrganizationRequest, context: Context) -> pb.Organization:
        return _organization(await self.control.get_organization(request.organization_id))

    @rpc
    async def ListOrganizations(
        self, request: pb.ListOrganizationsRequest, context: Context
    ) -> pb.ListOrganizationsResponse:
        principal = caller()
        own = None if principal.is_operator else principal.organization_id
        orgs, token = await self.control.list_organizations(request.page_size, request.page_token, only=own)
        return pb.ListOrganizationsResponse(organizations=[_organization(o) for o in orgs], next_page_token=token)

    @rpc
    async def SetOrganizationLimits(
        self, request: pb.SetOrganizationLimitsRequest, context: Context
    ) -> pb.OrganizationLimits:
        actor = caller()
        specs = await self.control.set_organization_limits(
            request.organization_id,
            [(x.model, x.metric, x.window, x.limit) for x in request.set],
            [(x.model, x.metric, x.window) for x in request.clear],
            actor=actor,
        )
        return pb.OrganizationLimits(organization_id=request.organization_id, limits=_limits(specs))

    @rpc
    async def GetOrganizationLimits(
        self, request: pb.GetOrganizationLimitsRequest, context: Context
    ) -> pb.OrganizationLimits:
        specs = await self.control.organization_limits(request.organization_id)
        return pb.OrganizationLimits(organization_id=request.organization_id, limits=_limits(specs))


_PROJECT_UPDATABLE = ("name", "description")
_MEMBER_UPDATABLE = ("role",)


class ProjectServicer(_Servicer, admin_pb2_grpc.ProjectServiceServicer):
    @rpc
    async def CreateProject(self, request: pb.CreateProjectRequest, context: Context) -> pb.Project:
        actor = caller()
        return _project(
            await self.control.create_project(request.organization_id, request.name, request.description, actor=actor)
        )

    @rpc
    async def GetProject(self, request: pb.GetProjectRequest, context: Context) -> pb.Project:
        return _project(await self.control.get_project(request.organization_id, request.project_id, request.name))

    @rpc
    async def ListProjects(self, request: pb.ListProjectsRequest, context: Context) -> pb.ListProjectsResponse:
        projects, token = await self.control.list_projects(
            request.organization_id, request.page_size, request.page_token
        )
        return pb.ListProjectsResponse(projects=[_project(p) for p in projects], next_page_token=token)

    @rpc
    async def UpdateProject(self, request: pb.UpdateProjectRequest, context: Context) -> pb.Project:
        project = request.project
        actor = caller()
        populated = {f.name for f, _ in project.ListFields()}
        paths = update_paths(request.update_mask, request.HasField("update_mask"), _PROJECT_UPDATABLE, populated)
        return _project(
            await self.control.update_project(
                project.organization_id,
                project.id,
                project.name if "name" in paths else None,
                project.description if "description" in paths else None,
                actor=actor,
            )
        )

    @rpc
    async def DeleteProject(self, request: pb.DeleteProjectRequest, context: Context) -> pb.Project:
        actor = caller()
        return _project(await self.control.delete_project(request.organization_id, request.project_id, actor=actor))

    async def _project_limits(self, org_id: str, project_id: str, models: Sequence[str] = ()) -> pb.ProjectLimits:
        custom = await self.control.project_limits(org_id, project_id)
        effective = await self.control.effective_limits(org_id, project_id, models)
        return pb.ProjectLimits(
            organization_id=org_id,
            project_id=project_id,
            custom=_limits(custom),
            effective=[_effective(e) for e in effective],
        )

    @rpc
    async def SetProjectLimits(self, request: pb.SetProjectLimitsRequest, context: Context) -> pb.ProjectLimits:
        actor = caller()
        await self.control.set_project_limits(
            request.organization_id,
            request.project_id,
            [(x.model, x.metric, x.window, x.limit) for x in request.set],
            [(x.model, x.metric, x.window) for x in request.clear],
            actor=actor,
        )
        return await self._project_limits(request.organization_id, request.project_id)

    @rpc
    async def GetProjectLimits(self, request: pb.GetProjectLimitsRequest, context: Context) -> pb.ProjectLimits:
        return await self._project_limits(request.organization_id, request.project_id, list(request.models))

    @rpc
    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Context) -> pb.CreateApiKeyResponse:
        actor = caller()
        info, secret = await self.control.create_api_key(
            request.organization_id, request.project_id, request.name, actor=actor
        )
        return pb.CreateApiKeyResponse(key=_key(info), secret=secret)

    @rpc
    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Context) -> pb.ListApiKeysResponse:
        infos = await self.control.list_api_keys(request.organization_id, request.project_id)
        infos, token = page(infos, lambda i: by_creation(i.created_at_ms, i.id), request.page_size, request.page_token)
        return pb.ListApiKeysResponse(keys=[_key(i) for i in infos], next_page_token=token)

    @rpc
    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Context) -> pb.ApiKey:
        actor = caller()
        return _key(await self.control.revoke_api_key(request.organization_id, request.key_id, actor=actor))


class ModelPermissionServicer(_Servicer, admin_pb2_grpc.ModelPermissionServiceServicer):
    async def _reply(self, org_id: str, project_id: str) -> pb.ModelPermissions:
        org, project = await self.m.permissions.get(org_id, project_id)
        reply = pb.ModelPermissions(organization_id=org_id, project_id=project_id, organization=_policy(org))
        if project is not None:
            reply.project.CopyFrom(_policy(project))
        return reply

    @rpc
    async def GetModelPermissions(
        self, request: pb.GetModelPermissionsRequest, context: Context
    ) -> pb.ModelPermissions:
        return await self._reply(request.organization_id, request.project_id)

    @rpc
    async def SetModelPermissions(
        self, request: pb.SetModelPermissionsRequest, context: Context
    ) -> pb.ModelPermissions:
        actor = caller()
        await self.m.permissions.set(
            request.organization_id,
            request.project_id,
            _access(request.policy.access),
            list(request.policy.models),
            actor=actor,
        )
        return await self._reply(request.organization_id, request.project_id)


class MemberServicer(_Servicer, admin_pb2_grpc.MemberServiceServicer):
    @rpc
    async def AddMember(self, request: pb.AddMemberRequest, context: Context) -> pb.AddMemberResponse:
        actor = caller()
        member, cred, token = await self.m.members.add(
            request.organization_id, request.name, _role(request.role), actor=actor
        )
        return pb.AddMemberResponse(member=_member(member), credential=_credential(cred), token=token)

    @rpc
    async def ListMembers(self, request: pb.ListMembersRequest, context: Context) -> pb.ListMembersResponse:
        members, token = page(
            await self.m.members.list_members(request.organization_id),
            lambda m: f"{m.name}\x00{m.id}",
            request.page_size,
            request.page_token,
        )
        return pb.ListMembersResponse(members=[_member(m) for m in members], next_page_token=token)

    @rpc
    async def UpdateMember(self, request: pb.UpdateMemberRequest, context: Context) -> pb.Member:
        member = request.member
        actor = caller()
        populated = {f.name for f, _ in member.ListFields()}
        update_paths(request.update_mask, request.HasField("update_mask"), _MEMBER_UPDATABLE, populated)
        role = _role(member.role)
        return _member(await self.m.members.update_role(member.organization_id, member.id, role, actor=actor))

    @rpc
    async def RemoveMember(self, request: pb.RemoveMemberRequest, context: Context) -> pb.Member:
        actor = caller()
        return _member(await self.m.members.remove(request.organization_id, request.member_id, actor=actor))


class CredentialServicer(_Servicer, admin_pb2_grpc.CredentialServiceServicer):
    @rpc
    async def CreateCredential(
        self, request: pb.CreateCredentialRequest, context: Context
    ) -> pb.CreateCredentialResponse:
        org_id = request.organization_id
        actor = caller()
        if org_id:
            cred, token = await self.m.members.create_credential(org_id, request.member_id, request.name, actor=actor)
        else:
            if request.member_id:
                raise InvalidArgument("member_id needs organization_id")
            cred, token = await self.m.credentials.create_operator(request.name, actor=actor)
        return pb.CreateCredentialResponse(credential=_credential(cred), token=token)

    @rpc
    async def ListCredentials(self, request: pb.ListCredentialsRequest, context: Context) -> pb.ListCredentialsResponse:
        org_id = request.organization_id
        creds = await (self.m.members.list_credentials(org_id) if org_id else self.m.credentials.list_operators())
        creds, token = page(creds, lambda c: by_creation(c.created_at_ms, c.id), request.page_size, request.page_token)
        return pb.ListCredentialsResponse(credentials=[_credential(c) for c in creds], next_page_token=token)

    @rpc
    async def RevokeCredential(self, request: pb.RevokeCredentialRequest, context: Context) -> pb.Credential:
        org_id = request.organization_id
        actor = caller()
        if org_id:
            cred = await self.m.members.revoke_credential(org_id, request.credential_id, actor=actor)
        else:
            cred = await self.m.credentials.revoke_operator(request.credential_id, actor=actor)
        return _credential(cred)

    @rpc
    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Context) -> pb.Principal:
        return _principal(caller())


class AuditServicer(_Servicer, admin_pb2_grpc.AuditServiceServicer):
    @rpc
    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Context) -> pb.ListAuditEventsResponse:
        org_id = request.organization_id
        since_ms = milliseconds("start_time", request.start_time, request.HasField("start_time"))
        until_ms = milliseconds("end_time", request.end_time, request.HasField("end_time"))
        events, token = await self.m.control.read_audit(
            org_id, request.project_id, since_ms, until_ms, request.page_size, request.page_token
        )
        return pb.ListAuditEventsResponse(events=[_event(e) for e in events], next_page_token=token)
