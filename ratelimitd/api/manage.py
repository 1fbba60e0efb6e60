"""ManageProject: the design card's one RPC for projects, answered by ProjectService itself.

Each operation of the request's oneof is a ProjectService request message, and
is handed to the ProjectService servicer's method of that name unchanged: the
same authorization (authz.POLICY under the method's own name), the same
validation, the same engine call and the same reply, so nothing here can
drift from the resource service.
"""

from __future__ import annotations

from typing import Any

import grpc

from ratelimitd.api.admin import ProjectServicer
from ratelimitd.engine.errors import InvalidArgument
from ratelimitd.v1 import rate_limit_service_pb2 as pb

# oneof operation -> (the ProjectService method, the oneof result field its reply goes in)
OPERATIONS: dict[str, tuple[str, str]] = {
    "create_project": ("CreateProject", "project"),
    "get_project": ("GetProject", "project"),
    "update_project": ("UpdateProject", "project"),
    "delete_project": ("DeleteProject", "project"),
    "list_projects": ("ListProjects", "projects"),
    "set_project_limits": ("SetProjectLimits", "limits"),
    "get_project_limits": ("GetProjectLimits", "limits"),
    "create_api_key": ("CreateApiKey", "created_api_key"),
    "list_api_keys": ("ListApiKeys", "api_keys"),
    "revoke_api_key": ("RevokeApiKey", "revoked_api_key"),
}


class ProjectManager:
    def __init__(self, projects: ProjectServicer) -> None:
        self._projects = projects

    async def manage(
        self, request: pb.ManageProjectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ManageProjectResponse:
        operation = request.WhichOneof("operation")
        if operation is None:
            raise InvalidArgument(f"operation is not set: set one of {', '.join(OPERATIONS)}")
        method, result = OPERATIONS[operation]
        reply = await getattr(self._projects, method)(getattr(request, operation), context)
        return pb.ManageProjectResponse(**{result: reply})
