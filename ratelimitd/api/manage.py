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
from ratelimitd.api.gate import MANAGE_PROJECT_OPERATIONS
from ratelimitd.v1 import rate_limit_service_pb2 as pb

# The reply of each ProjectService method goes in the result field of its message type.
_RESULT_FIELD = {
    f.message_type.full_name: f.name
    for f in pb.ManageProjectResponse.DESCRIPTOR.oneofs_by_name["result"].fields
    if f.message_type is not None
}


class ProjectManager:
    def __init__(self, projects: ProjectServicer) -> None:
        self._projects = projects

    async def manage(
        self, request: pb.ManageProjectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ManageProjectResponse:
        operation = request.WhichOneof("operation")
        assert operation is not None, "api/gate.py refuses a ManageProject without an operation"
        method = MANAGE_PROJECT_OPERATIONS[operation]
        reply = await getattr(self._projects, method)(getattr(request, operation), context)
        return pb.ManageProjectResponse(**{_RESULT_FIELD[reply.DESCRIPTOR.full_name]: reply})
