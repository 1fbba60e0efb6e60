"""The CLI's connection to a server: one channel, our services' stubs, and the credential.

The credential rides on every call through a client interceptor, so no verb
passes it by hand and none can forget it.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ratelimitd.cli.errors import NotUnderstood, Refused
from ratelimitd.cli.pages import collect
from ratelimitd.engine import ids
from ratelimitd.tls import ClientTls
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import admin_pb2_grpc, rate_limit_service_pb2_grpc, usage_pb2_grpc

# Every ratelimitd credential is printable ASCII without spaces. Anything else (most often a line
# break or a carriage return pasted with it) cannot travel in a gRPC header.
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token``; a token that cannot be one is a command-line error."""
    if not token:
        return ()
    if not _TOKEN_RE.fullmatch(token):
        raise NotUnderstood(
            "the token (--token or RATELIMITD_TOKEN) contains a space, a line break, a control character or a "
            "non-ASCII character, which no ratelimitd token has; copy it again without them"
        )
    return (("authorization", f"Bearer {token}"),)


class Credential(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the credential's metadata to every unary call made on the channel (the CLI makes no
    streaming call; one that does would need the stream interceptors too)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        with_credential = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return await continuation(with_credential, request)


class Api:
    """Stubs of every service on one channel; close it with ``await api.channel.close()``."""

    def __init__(self, address: str, token: str | None, tls: ClientTls | None = None) -> None:
        self.has_token = bool(token)
        credential = bearer(token)
        interceptors = [Credential(credential)] if credential else []
        self.channel = (tls or ClientTls()).channel(address, interceptors)
        channel = self.channel
        self.decisions: rate_limit_service_pb2_grpc.RateLimitServiceAsyncStub = (
            rate_limit_service_pb2_grpc.RateLimitServiceStub(channel)
        )
        self.orgs: admin_pb2_grpc.OrganizationServiceAsyncStub = admin_pb2_grpc.OrganizationServiceStub(channel)
        self.projects: admin_pb2_grpc.ProjectServiceAsyncStub = admin_pb2_grpc.ProjectServiceStub(channel)
        self.models: admin_pb2_grpc.ModelPermissionServiceAsyncStub = admin_pb2_grpc.ModelPermissionServiceStub(channel)
        self.members: admin_pb2_grpc.MemberServiceAsyncStub = admin_pb2_grpc.MemberServiceStub(channel)
        self.creds: admin_pb2_grpc.CredentialServiceAsyncStub = admin_pb2_grpc.CredentialServiceStub(channel)
        self.audit: admin_pb2_grpc.AuditServiceAsyncStub = admin_pb2_grpc.AuditServiceStub(channel)
        self.usage: usage_pb2_grpc.UsageServiceAsyncStub = usage_pb2_grpc.UsageServiceStub(channel)


async def resolve_project(api: Api, org: str, ref: str) -> str:
    """A project id, from an id or a name."""
    if ids.is_id("proj", ref):
        return ref
    reply = await api.projects.GetProject(apb.GetProjectRequest(organization_id=org, name=ref))
    return reply.id


async def list_members(api: Api, org: str) -> apb.ListMembersResponse:
    """Every member of ``org``, all pages read."""
    members, _ = await collect(
        lambda token, size: api.members.ListMembers(
            apb.ListMembersRequest(organization_id=org, page_token=token, page_size=size)
        ),
        lambda page: page.members,
    )
    return apb.ListMembersResponse(members=members)


async def resolve_member(api: Api, org: str, ref: str) -> str:
    """A member id, from an id or a name."""
    if ids.is_id("mem", ref):
        return ref
    reply = await list_members(api, org)
    for m in reply.members:
        if m.name == ref:
            return m.id
    raise Refused(f"no member named {ref!r} in organization {org}")


# Back-off between attempts of a call that storage left UNAVAILABLE: about 6 s in all,
# enough for a restart or a failover, short enough for a terminal.
RETRY_DELAYS_S = (0.2, 0.4, 0.8, 1.6, 3.2)

T = TypeVar("T")


async def retry_unavailable(attempt: Callable[[], Awaitable[T]]) -> T:
    """Runs ``attempt`` again while the server answers UNAVAILABLE. The caller must send the
    same request id every time: a timed-out call may have been applied, and only the same
    id makes the retry exact (the decision replayed, the report counted once)."""
    for delay in RETRY_DELAYS_S:
        try:
            return await attempt()
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        await asyncio.sleep(delay)
    return await attempt()


def new_request_id() -> str:
    return "cli_" + os.urandom(12).hex()
