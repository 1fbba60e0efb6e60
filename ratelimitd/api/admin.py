"""OrganizationService and ProjectService over the control plane.

Every call authenticates its bearer credential first; today only the operator
credential exists (organization roles come with the control-plane work).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from ratelimitd.api.auth import authorization
from ratelimitd.api.errors import rpc
from ratelimitd.engine.control import ApiKeyInfo, ControlPlane, EffectiveLimit, ProjectInfo
from ratelimitd.engine.credentials import Credentials, Principal
from ratelimitd.engine.limits import LimitSpec
from ratelimitd.v1 import admin_pb2 as pb
from ratelimitd.v1 import admin_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


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


def _project(p: ProjectInfo) -> pb.Project:
    return pb.Project(
        id=p.id, organization_id=p.organization_id, name=p.name, description=p.description,
        created_at_ms=p.created_at_ms,
    )  # fmt: skip


def _key(k: ApiKeyInfo) -> pb.ApiKey:
    return pb.ApiKey(
        id=k.id, project_id=k.project_id, name=k.name, prefix=k.prefix, created_at_ms=k.created_at_ms,
        last_used_at_ms=k.last_used_at_ms, revoked=k.revoked,
    )  # fmt: skip


class _Authenticated:
    def __init__(self, control: ControlPlane, credentials: Credentials, storage_failed: Callable[[], None]) -> None:
        self.control = control
        self.credentials = credentials
        self.storage_failed = storage_failed

    async def principal(self, context: Context) -> Principal:
        return await self.credentials.authenticate(authorization(context))


class OrganizationServicer(_Authenticated, admin_pb2_grpc.OrganizationServiceServicer):
    @rpc
    async def CreateOrganization(self, request: pb.CreateOrganizationRequest, context: Context) -> pb.Organization:
        await self.principal(context)
        org = await self.control.create_organization(request.name)
        return pb.Organization(id=org.id, name=org.name, created_at_ms=org.created_at_ms)

    @rpc
    async def SetOrganizationLimits(
        self, request: pb.SetOrganizationLimitsRequest, context: Context
    ) -> pb.OrganizationLimits:
        await self.principal(context)
        specs = await self.control.set_organization_limits(
            request.organization_id,
            [(x.model, x.metric, x.window, x.limit) for x in request.set],
            [(x.model, x.metric, x.window) for x in request.clear],
        )
        return pb.OrganizationLimits(organization_id=request.organization_id, limits=_limits(specs))

    @rpc
    async def GetOrganizationLimits(
        self, request: pb.GetOrganizationLimitsRequest, context: Context
    ) -> pb.OrganizationLimits:
        await self.principal(context)
        specs = await self.control.organization_limits(request.organization_id)
        return pb.OrganizationLimits(organization_id=request.organization_id, limits=_limits(specs))


class ProjectServicer(_Authenticated, admin_pb2_grpc.ProjectServiceServicer):
    @rpc
    async def CreateProject(self, request: pb.CreateProjectRequest, context: Context) -> pb.Project:
        await self.principal(context)
        return _project(await self.control.create_project(request.organization_id, request.name, request.description))

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
        await self.principal(context)
        await self.control.set_project_limits(
            request.organization_id,
            request.project_id,
            [(x.model, x.metric, x.window, x.limit) for x in request.set],
            [(x.model, x.metric, x.window) for x in request.clear],
        )
        return await self._project_limits(request.organization_id, request.project_id)

    @rpc
    async def GetProjectLimits(self, request: pb.GetProjectLimitsRequest, context: Context) -> pb.ProjectLimits:
        await self.principal(context)
        return await self._project_limits(request.organization_id, request.project_id, list(request.models))

    @rpc
    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Context) -> pb.CreateApiKeyResponse:
        await self.principal(context)
        info, secret = await self.control.create_api_key(request.organization_id, request.project_id, request.name)
        return pb.CreateApiKeyResponse(key=_key(info), secret=secret)

    @rpc
    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Context) -> pb.ListApiKeysResponse:
        await self.principal(context)
        infos = await self.control.list_api_keys(request.organization_id, request.project_id)
        return pb.ListApiKeysResponse(keys=[_key(i) for i in infos])

    @rpc
    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Context) -> pb.ApiKey:
        await self.principal(context)
        return _key(await self.control.revoke_api_key(request.organization_id, request.key_id))
