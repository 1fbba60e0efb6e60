"""Client verbs of the CLI, all over the gRPC API: demo, check, and management.

The address and credential come from flags or RATELIMITD_ADDRESS and
RATELIMITD_TOKEN. Errors end in one line on stderr and exit status 1 (2 for
a command line or file that cannot be understood). Wherever a verb takes a
PROJECT or a MEMBER, its id or its name will do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ratelimitd.engine import ids
from ratelimitd.engine.keys import MANUAL_CLOCK
from ratelimitd.tls import ClientTls
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import admin_pb2_grpc, rate_limit_service_pb2_grpc
from ratelimitd.v1 import ratelimit_pb2 as pb

DEFAULT_ADDRESS = "127.0.0.1:50051"
SHORTHANDS = {
    "rpm": ("requests", "minute"),
    "rpd": ("requests", "day"),
    "tpm": ("tokens", "minute"),
    "tpd": ("tokens", "day"),
}


# Every ratelimitd credential is printable ASCII without spaces. Anything else (most often a line
# break or a carriage return pasted with it) cannot travel in a gRPC header.
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token``; a token that cannot be one is a command-line error."""
    if not token:
        return ()
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError(
            "the token (--token or RATELIMITD_TOKEN) contains a space, a line break, a control character or a "
            "non-ASCII character, which no ratelimitd token has; copy it again without them"
        )
    return (("authorization", f"Bearer {token}"),)


class Api:
    def __init__(self, address: str, token: str | None, tls: ClientTls | None = None) -> None:
        self.metadata = bearer(token)
        self.channel = (tls or ClientTls()).channel(address)
        self.decisions: rate_limit_service_pb2_grpc.RateLimitServiceAsyncStub = (
            rate_limit_service_pb2_grpc.RateLimitServiceStub(self.channel)
        )
        self.orgs: admin_pb2_grpc.OrganizationServiceAsyncStub = admin_pb2_grpc.OrganizationServiceStub(self.channel)
        self.projects: admin_pb2_grpc.ProjectServiceAsyncStub = admin_pb2_grpc.ProjectServiceStub(self.channel)
        self.models: admin_pb2_grpc.ModelPermissionServiceAsyncStub = admin_pb2_grpc.ModelPermissionServiceStub(
            self.channel
        )
        self.members: admin_pb2_grpc.MemberServiceAsyncStub = admin_pb2_grpc.MemberServiceStub(self.channel)
        self.creds: admin_pb2_grpc.CredentialServiceAsyncStub = admin_pb2_grpc.CredentialServiceStub(self.channel)
        self.audit: admin_pb2_grpc.AuditServiceAsyncStub = admin_pb2_grpc.AuditServiceStub(self.channel)


class CliError(Exception):
    """A problem the CLI itself found (e.g. no member of that name); one line, exit 1."""


async def resolve_project(api: Api, org: str, ref: str) -> str:
    """A project id, from an id or a name."""
    if ids.is_id("proj", ref):
        return ref
    reply = await api.projects.GetProject(apb.GetProjectRequest(organization_id=org, name=ref), metadata=api.metadata)
    return reply.id


async def resolve_member(api: Api, org: str, ref: str) -> str:
    """A member id, from an id or a name."""
    if ids.is_id("mem", ref):
        return ref
    reply = await api.members.ListMembers(
        apb.ListMembersRequest(organization_id=org, page_size=1000), metadata=api.metadata
    )
    for m in reply.members:
        if m.name == ref:
            return m.id
    raise CliError(f"no member named {ref!r} in organization {org}")


def metric_window(name: str) -> tuple[str, str]:
    """``rpm`` (and the other shorthands) or ``METRIC/WINDOW``; the server checks that they exist."""
    if name in SHORTHANDS:
        return SHORTHANDS[name]
    metric, sep, window = name.partition("/")
    if not sep:
        raise ValueError(f"limit {name!r} is not one of {', '.join(SHORTHANDS)} or METRIC/WINDOW")
    return metric, window


def parse_limit_args(model: str, items: Sequence[str]) -> list[apb.Limit]:
    """``rpm=100`` or ``requests/minute=100`` (any configured window) for one model."""
    limits = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise ValueError(f"limit {item!r} is not NAME=NUMBER (e.g. rpm=100 or tokens/day=500000)")
        metric, window = metric_window(name)
        limits.append(apb.Limit(model=model, metric=metric, window=window, limit=int(value)))
    return limits


def parse_clear_args(model: str, items: Sequence[str]) -> list[apb.LimitKey]:
    return [apb.LimitKey(model=model, metric=m, window=w) for m, w in map(metric_window, items)]


def emit(args: argparse.Namespace, message: Message, table: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))
    else:
        print(table())


def render(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def when(ms: int) -> str:
    """Milliseconds since the epoch as UTC time for tables; "-" for never."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def when_stamp(msg: Message, field: str) -> str:
    """A Timestamp field as ``when`` shows it; "-" when absent."""
    return when(getattr(msg, field).ToMilliseconds()) if msg.HasField(field) else "-"


def stamp(ms: int) -> Timestamp | None:
    """Unix milliseconds as a request's Timestamp; None (absent) for 0."""
    if not ms:
        return None
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


def _opt(msg: Message, field: str) -> str:
    return str(getattr(msg, field)) if msg.HasField(field) else "-"


def limits_table(limits: Sequence[apb.Limit]) -> str:
    return render([(x.model, x.metric, x.window, x.limit) for x in limits], ("MODEL", "METRIC", "WINDOW", "LIMIT"))


def project_limits_table(reply: apb.ProjectLimits) -> str:
    rows = [
        (e.model, e.metric, e.window, _opt(e, "custom"), _opt(e, "organization"), e.effective) for e in reply.effective
    ]
    return render(rows, ("MODEL", "METRIC", "WINDOW", "PROJECT", "ORGANIZATION (CEILING)", "EFFECTIVE"))


def decision_text(reply: pb.CheckResponse) -> str:
    verdict = "ALLOWED" if reply.allowed else f"REFUSED ({pb.Reason.Name(reply.reason)})"
    lines = [verdict]
    if reply.message:
        lines.append(reply.message)
    rows = [
        (pb.Scope.Name(b.scope).removeprefix("SCOPE_").lower(), b.metric, b.window, b.limit, b.remaining,
         f"{b.reset_after_ms}ms")
        for b in reply.buckets
    ]  # fmt: skip
    if rows:
        lines += ["", render(rows, ("SCOPE", "METRIC", "WINDOW", "LIMIT", "REMAINING", "RESET"))]
    if reply.headers:
        lines += ["", *(f"{k}: {v}" for k, v in sorted(reply.headers.items()))]
    lines += ["", f"request id: {reply.request_id}"]
    return "\n".join(lines)


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


# -- verbs -----------------------------------------------------------------


async def check(api: Api, args: argparse.Namespace) -> int:
    # Always a request id of our own, so a retry after a timeout cannot charge twice.
    request = pb.CheckRequest(
        api_key=args.api_key, model=args.model, requests=args.requests, tokens=args.tokens,
        request_id=args.request_id or new_request_id(),
    )  # fmt: skip
    reply = await retry_unavailable(lambda: api.decisions.CheckAndConsume(request))
    emit(args, reply, lambda: decision_text(reply))
    return 0 if reply.allowed else 3


async def org_create(api: Api, args: argparse.Namespace) -> int:
    org = await api.orgs.CreateOrganization(apb.CreateOrganizationRequest(name=args.name), metadata=api.metadata)
    emit(args, org, lambda: render([(org.id, org.name)], ("ID", "NAME")))
    return 0


async def org_limits(api: Api, args: argparse.Namespace) -> int:
    if args.set or args.clear:
        reply = await api.orgs.SetOrganizationLimits(
            apb.SetOrganizationLimitsRequest(
                organization_id=args.org,
                set=parse_limit_args(args.model, args.set),
                clear=parse_clear_args(args.model, args.clear),
            ),
            metadata=api.metadata,
        )
    else:
        reply = await api.orgs.GetOrganizationLimits(
            apb.GetOrganizationLimitsRequest(organization_id=args.org), metadata=api.metadata
        )
    emit(args, reply, lambda: limits_table(reply.limits))
    return 0


async def project_create(api: Api, args: argparse.Namespace) -> int:
    p = await api.projects.CreateProject(
        apb.CreateProjectRequest(organization_id=args.org, name=args.name, description=args.description),
        metadata=api.metadata,
    )
    emit(args, p, lambda: projects_table([p]))
    return 0


async def project_limits(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project)
    if args.set or args.clear:
        reply = await api.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(
                organization_id=args.org,
                project_id=project,
                set=parse_limit_args(args.model, args.set),
                clear=parse_clear_args(args.model, args.clear),
            ),
            metadata=api.metadata,
        )
    else:
        reply = await api.projects.GetProjectLimits(
            apb.GetProjectLimitsRequest(organization_id=args.org, project_id=project), metadata=api.metadata
        )
    emit(args, reply, lambda: project_limits_table(reply))
    return 0


async def key_create(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project)
    reply = await api.projects.CreateApiKey(
        apb.CreateApiKeyRequest(organization_id=args.org, project_id=project, name=args.name),
        metadata=api.metadata,
    )
    emit(
        args,
        reply,
        lambda: f"{reply.secret}\n\nkey id {reply.key.id}; the secret above is shown only now, keep it safe.",
    )
    return 0


def keys_table(keys: Sequence[apb.ApiKey]) -> str:
    return render(
        [(k.id, k.name, k.prefix + "…", when_stamp(k, "create_time"), when_stamp(k, "last_use_time"),
          "revoked" if k.revoked else "active")
         for k in keys],
        ("ID", "NAME", "PREFIX", "CREATED", "LAST USED", "STATE"),
    )  # fmt: skip


async def key_list(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project)
    reply = await api.projects.ListApiKeys(
        apb.ListApiKeysRequest(organization_id=args.org, project_id=project, page_size=1000), metadata=api.metadata
    )
    emit(args, reply, lambda: keys_table(reply.keys))
    return 0


async def key_revoke(api: Api, args: argparse.Namespace) -> int:
    reply = await api.projects.RevokeApiKey(
        apb.RevokeApiKeyRequest(organization_id=args.org, key_id=args.key), metadata=api.metadata
    )
    emit(args, reply, lambda: keys_table([reply]))
    return 0


# -- organizations and projects ----------------------------------------------------


def orgs_table(orgs: Sequence[apb.Organization]) -> str:
    return render([(o.id, o.name, when_stamp(o, "create_time")) for o in orgs], ("ID", "NAME", "CREATED"))


def projects_table(projects: Sequence[apb.Project]) -> str:
    return render(
        [(p.id, p.name, when_stamp(p, "create_time"), p.description) for p in projects],
        ("ID", "NAME", "CREATED", "DESCRIPTION"),
    )


async def org_list(api: Api, args: argparse.Namespace) -> int:
    reply = apb.ListOrganizationsResponse()
    while True:
        page = await api.orgs.ListOrganizations(
            apb.ListOrganizationsRequest(page_token=reply.next_page_token, page_size=1000), metadata=api.metadata
        )
        reply.organizations.extend(page.organizations)
        reply.next_page_token = page.next_page_token
        if not page.next_page_token:
            break
    emit(args, reply, lambda: orgs_table(reply.organizations))
    return 0


async def org_get(api: Api, args: argparse.Namespace) -> int:
    org = await api.orgs.GetOrganization(apb.GetOrganizationRequest(organization_id=args.org), metadata=api.metadata)
    emit(args, org, lambda: orgs_table([org]))
    return 0


async def project_list(api: Api, args: argparse.Namespace) -> int:
    """Every page, unless --page-size or --page-token asks for one page."""
    one_page = bool(args.page_size or args.page_token)
    reply = apb.ListProjectsResponse(next_page_token=args.page_token or "")
    while True:
        page = await api.projects.ListProjects(
            apb.ListProjectsRequest(
                organization_id=args.org, page_size=args.page_size or 1000, page_token=reply.next_page_token
            ),
            metadata=api.metadata,
        )
        reply.projects.extend(page.projects)
        reply.next_page_token = page.next_page_token
        if one_page or not page.next_page_token:
            break

    def table() -> str:
        text = projects_table(reply.projects)
        return text + (f"\n\nnext page: --page-token {reply.next_page_token}" if reply.next_page_token else "")

    emit(args, reply, table)
    return 0


async def project_get(api: Api, args: argparse.Namespace) -> int:
    request = apb.GetProjectRequest(organization_id=args.org)
    if ids.is_id("proj", args.project):
        request.project_id = args.project
    else:
        request.name = args.project
    p = await api.projects.GetProject(request, metadata=api.metadata)
    emit(args, p, lambda: projects_table([p]))
    return 0


async def project_update(api: Api, args: argparse.Namespace) -> int:
    if args.name is None and args.description is None:
        raise ValueError("project update: give --name and/or --description")
    request = apb.UpdateProjectRequest(
        project=apb.Project(organization_id=args.org, id=await resolve_project(api, args.org, args.project))
    )
    if args.name is not None:
        request.project.name = args.name
        request.update_mask.paths.append("name")
    if args.description is not None:
        request.project.description = args.description
        request.update_mask.paths.append("description")
    p = await api.projects.UpdateProject(request, metadata=api.metadata)
    emit(args, p, lambda: projects_table([p]))
    return 0


async def project_delete(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project)
    p = await api.projects.DeleteProject(
        apb.DeleteProjectRequest(organization_id=args.org, project_id=project), metadata=api.metadata
    )
    emit(args, p, lambda: f"deleted project {p.name} ({p.id}); its API keys no longer work")
    return 0


# -- model permissions ---------------------------------------------------------------

ACCESS_NAMES = {
    apb.MODEL_ACCESS_UNRESTRICTED: "unrestricted",
    apb.MODEL_ACCESS_ALLOW_LIST: "allow",
    apb.MODEL_ACCESS_BLOCK_LIST: "block",
}


def policy_text(policy: apb.ModelPolicy) -> str:
    name = ACCESS_NAMES[policy.access]
    return name if policy.access == apb.MODEL_ACCESS_UNRESTRICTED else f"{name}: {', '.join(policy.models) or '(none)'}"


def permissions_table(reply: apb.ModelPermissions) -> str:
    rows = [("organization", reply.organization_id, policy_text(reply.organization))]
    if reply.HasField("project"):
        rows.append(("project", reply.project_id, policy_text(reply.project)))
    return render(rows, ("SCOPE", "ID", "MODELS"))


async def models_show(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project) if args.project else ""
    reply = await api.models.GetModelPermissions(
        apb.GetModelPermissionsRequest(organization_id=args.org, project_id=project), metadata=api.metadata
    )
    emit(args, reply, lambda: permissions_table(reply))
    return 0


async def models_set(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project) if args.project else ""
    if args.allow is not None:
        if not args.allow:
            raise ValueError(
                "models set --allow needs at least one model: an empty allow list would refuse every model "
                "(--unrestricted removes the list)"
            )
        policy = apb.ModelPolicy(access=apb.MODEL_ACCESS_ALLOW_LIST, models=args.allow)
    elif args.block is not None:
        policy = apb.ModelPolicy(access=apb.MODEL_ACCESS_BLOCK_LIST, models=args.block)
    else:
        policy = apb.ModelPolicy(access=apb.MODEL_ACCESS_UNRESTRICTED)
    reply = await api.models.SetModelPermissions(
        apb.SetModelPermissionsRequest(organization_id=args.org, project_id=project, policy=policy),
        metadata=api.metadata,
    )
    emit(args, reply, lambda: permissions_table(reply))
    return 0


# -- members and credentials -----------------------------------------------------------

ROLES = {"owner": apb.ROLE_OWNER, "developer": apb.ROLE_DEVELOPER, "reader": apb.ROLE_READER}
ROLE_NAMES = {v: k for k, v in ROLES.items()} | {apb.ROLE_UNSPECIFIED: "-"}


def members_table(members: Sequence[apb.Member]) -> str:
    return render(
        [(m.id, m.name, ROLE_NAMES[m.role], when_stamp(m, "create_time")) for m in members],
        ("ID", "NAME", "ROLE", "ADDED"),
    )


def credentials_table(creds: Sequence[apb.Credential]) -> str:
    return render(
        [(c.id, c.kind, c.name, c.member_id or "-", when_stamp(c, "create_time")) for c in creds],
        ("ID", "KIND", "NAME", "MEMBER", "CREATED"),
    )


def _shown_once(token: str, what: str) -> str:
    return f"{token}\n\n{what}; the token above is shown only now, keep it safe."


async def member_add(api: Api, args: argparse.Namespace) -> int:
    reply = await api.members.AddMember(
        apb.AddMemberRequest(organization_id=args.org, name=args.name, role=ROLES[args.role]), metadata=api.metadata
    )
    emit(args, reply, lambda: _shown_once(reply.token, f"member {reply.member.name} ({reply.member.id}) added"))
    return 0


async def member_list(api: Api, args: argparse.Namespace) -> int:
    reply = await api.members.ListMembers(
        apb.ListMembersRequest(organization_id=args.org, page_size=1000), metadata=api.metadata
    )
    emit(args, reply, lambda: members_table(reply.members))
    return 0


async def member_role(api: Api, args: argparse.Namespace) -> int:
    member = await resolve_member(api, args.org, args.member)
    reply = await api.members.UpdateMember(
        apb.UpdateMemberRequest(
            member=apb.Member(organization_id=args.org, id=member, role=ROLES[args.role]),
            update_mask=FieldMask(paths=["role"]),
        ),
        metadata=api.metadata,
    )
    emit(args, reply, lambda: members_table([reply]))
    return 0


async def member_remove(api: Api, args: argparse.Namespace) -> int:
    member = await resolve_member(api, args.org, args.member)
    reply = await api.members.RemoveMember(
        apb.RemoveMemberRequest(organization_id=args.org, member_id=member), metadata=api.metadata
    )
    emit(args, reply, lambda: f"removed member {reply.name} ({reply.id}) and revoked its credentials")
    return 0


async def credential_create(api: Api, args: argparse.Namespace) -> int:
    if bool(args.org) != bool(args.member):
        raise ValueError(
            "credential create: give both --org and --member (a member's credential) or neither (operator)"
        )
    member = await resolve_member(api, args.org, args.member) if args.member else ""
    reply = await api.creds.CreateCredential(
        apb.CreateCredentialRequest(organization_id=args.org or "", member_id=member, name=args.name),
        metadata=api.metadata,
    )
    emit(args, reply, lambda: _shown_once(reply.token, f"credential {reply.credential.id} created"))
    return 0


async def credential_list(api: Api, args: argparse.Namespace) -> int:
    reply = await api.creds.ListCredentials(
        apb.ListCredentialsRequest(organization_id=args.org or "", page_size=1000), metadata=api.metadata
    )
    emit(args, reply, lambda: credentials_table(reply.credentials))
    return 0


async def credential_revoke(api: Api, args: argparse.Namespace) -> int:
    reply = await api.creds.RevokeCredential(
        apb.RevokeCredentialRequest(organization_id=args.org or "", credential_id=args.credential),
        metadata=api.metadata,
    )
    emit(args, reply, lambda: credentials_table([reply]))
    return 0


async def whoami(api: Api, args: argparse.Namespace) -> int:
    me = await api.creds.WhoAmI(apb.WhoAmIRequest(), metadata=api.metadata)

    def text() -> str:
        if me.kind == "operator":
            return f"platform operator (credential {me.credential_id}, {me.name})"
        role = ROLE_NAMES[me.role]
        return f"{me.name}: {role} of {me.organization_id} (member {me.member_id}, credential {me.credential_id})"

    emit(args, me, text)
    return 0


# -- audit ---------------------------------------------------------------------------

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str) -> int:
    """Unix milliseconds from '2025-06-01', '2025-06-01T12:00:00Z', '90m' or '7d' (ago), or a number of ms."""
    if text.isdigit():
        return int(text)
    if m := _AGO.match(text):
        return int(time.time() * 1000) - int(m[1]) * _UNIT_S[m[2]] * 1000
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"time {text!r} is not ISO 8601 (2025-06-01T12:00:00Z), N[smhd] ago, or milliseconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _change(before: str, after: str) -> str:
    b, a = json.loads(before or "null"), json.loads(after or "null")
    if b is None:
        return "+ " + json.dumps(a, separators=(",", ":"))
    if a is None:
        return "- " + json.dumps(b, separators=(",", ":"))
    if isinstance(b, dict) and isinstance(a, dict):
        return "; ".join(
            f"{k}: {json.dumps(b.get(k))} -> {json.dumps(a.get(k))}"
            for k in sorted(b.keys() | a.keys())
            if b.get(k) != a.get(k)
        )
    return f"{json.dumps(b)} -> {json.dumps(a)}"


def _actor(p: apb.Principal) -> str:
    return "operator" if p.kind == "operator" else f"{p.name} ({ROLE_NAMES[p.role]})"


def audit_table(events: Sequence[apb.AuditEvent]) -> str:
    return render(
        [(when_stamp(e, "event_time"), _actor(e.actor), e.operation, e.project_id or "-", e.target,
          _change(e.before, e.after))
         for e in events],
        ("TIME", "WHO", "OPERATION", "PROJECT", "TARGET", "CHANGE"),
    )  # fmt: skip


async def audit(api: Api, args: argparse.Namespace) -> int:
    # An id is used as it is, so a deleted project's history stays readable.
    project = await resolve_project(api, args.org, args.project) if args.project else ""
    request = apb.ListAuditEventsRequest(
        organization_id=args.org or "",
        project_id=project,
        start_time=stamp(parse_time(args.since)) if args.since else None,
        end_time=stamp(parse_time(args.until)) if args.until else None,
    )
    reply = apb.ListAuditEventsResponse()
    while len(reply.events) < args.limit:
        request.page_size = min(1000, args.limit - len(reply.events))
        page = await api.audit.ListAuditEvents(request, metadata=api.metadata)
        reply.events.extend(page.events)
        request.page_token = reply.next_page_token = page.next_page_token
        if not page.next_page_token:
            break
    emit(args, reply, lambda: audit_table(reply.events))
    return 0


async def health(api: Api, args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = await health_pb2_grpc.HealthStub(api.channel).Check(
        health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
    )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


# -- demo --------------------------------------------------------------------

DEMO_MODEL = "llama-3.3-70b-versatile"


async def _burst(api: Api, secret: str, n: int) -> tuple[int, int, int]:
    """n concurrent requests; (admitted, refused by project, refused by organization)."""
    req = pb.CheckRequest(api_key=secret, model=DEMO_MODEL)
    replies = await asyncio.gather(*(api.decisions.CheckAndConsume(req) for _ in range(n)))
    return (
        sum(r.allowed for r in replies),
        sum(r.reason == pb.REASON_PROJECT_LIMIT for r in replies),
        sum(r.reason == pb.REASON_ORGANIZATION_LIMIT for r in replies),
    )


async def _demo_org(api: Api, label: str) -> dict[str, str]:
    md = api.metadata
    org = await api.orgs.CreateOrganization(apb.CreateOrganizationRequest(name=f"demo: {label}"), metadata=md)
    await api.orgs.SetOrganizationLimits(
        apb.SetOrganizationLimitsRequest(organization_id=org.id, set=parse_limit_args(DEMO_MODEL, ["rpm=100"])),
        metadata=md,
    )
    secrets = {}
    for name, custom in (("myapp-prod", 80), ("myapp-staging", 30), ("myapp-dev", None)):
        p = await api.projects.CreateProject(apb.CreateProjectRequest(organization_id=org.id, name=name), metadata=md)
        if custom is not None:
            await api.projects.SetProjectLimits(
                apb.SetProjectLimitsRequest(
                    organization_id=org.id, project_id=p.id, set=parse_limit_args(DEMO_MODEL, [f"rpm={custom}"])
                ),
                metadata=md,
            )
        key = await api.projects.CreateApiKey(
            apb.CreateApiKeyRequest(organization_id=org.id, project_id=p.id, name="demo"), metadata=md
        )
        secrets[name] = key.secret
    return secrets


async def run_demo(api: Api, out: Callable[[str], None]) -> None:
    out(f"Organization limit: 100 requests/minute on {DEMO_MODEL}")
    out("  myapp-prod 80/min (custom)   myapp-staging 30/min (custom)   myapp-dev inherits 100/min")
    out("Each scenario starts from full buckets (a fresh organization); requests are sent at once.\n")
    rows: list[tuple[str, str, int, int, int, int]] = []

    for name in ("myapp-prod", "myapp-staging", "myapp-dev"):
        keys = await _demo_org(api, f"{name} alone")
        ok, by_project, by_org = await _burst(api, keys[name], 120)
        rows.append((f"{name} alone", name, 120, ok, by_project, by_org))

    keys = await _demo_org(api, "shared ceiling")
    for name, n in (("myapp-prod", 80), ("myapp-staging", 15), ("myapp-dev", 20)):
        ok, by_project, by_org = await _burst(api, keys[name], n)
        rows.append(("prod 80, staging 15, then dev", name, n, ok, by_project, by_org))

    keys = await _demo_org(api, "110 at once")
    (p_ok, p_proj, p_org), (s_ok, s_proj, s_org) = await asyncio.gather(
        _burst(api, keys["myapp-prod"], 80), _burst(api, keys["myapp-staging"], 30)
    )
    rows.append(("prod + staging together", "myapp-prod", 80, p_ok, p_proj, p_org))
    rows.append(("prod + staging together", "myapp-staging", 30, s_ok, s_proj, s_org))
    out(render(rows, ("SCENARIO", "PROJECT", "SENT", "ADMITTED", "REFUSED:PROJECT", "REFUSED:ORG")))
    out(f"\nprod + staging admitted {p_ok + s_ok} of 110: the organization's 100/min is a hard ceiling.")


async def demo(api: Api | None, args: argparse.Namespace) -> int:
    if api is not None:
        await run_demo(api, print)
        return 0
    # No server named: run a private one on an embedded Valkey in a temporary directory.
    from ratelimitd.app import App
    from ratelimitd.settings import Settings

    with tempfile.TemporaryDirectory(prefix="ratelimitd-demo-") as tmp:
        token = "rlt_demo"
        # A stopped clock: the buckets drain with time, so on a slow or busy machine a burst
        # that takes a second would see an extra request admitted, and the demo would not
        # show the reference's exact numbers. (A server given with --address runs on real time.)
        app = App(Settings.load(listen="127.0.0.1:0", data_dir=Path(tmp), operator_token=token, manual_clock=True))
        await app.start()
        await app.redis.set(MANUAL_CLOCK, time.time_ns() // 1000)
        print(f"(a private ratelimitd on 127.0.0.1:{app.port} with an embedded Valkey; pass --address to use yours)\n")
        try:
            local = Api(f"127.0.0.1:{app.port}", token)
            await run_demo(local, print)
            await local.channel.close()
        finally:
            await app.stop(0)
    return 0


# -- wiring ------------------------------------------------------------------

Verb = Callable[[Api, argparse.Namespace], Awaitable[int]]


def verb_command(verb: Verb, *, demo_mode: bool = False) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        async def go() -> int:
            if demo_mode and not args.address:
                return await demo(None, args)
            api = Api(args.address or DEFAULT_ADDRESS, args.token, client_tls(args))
            try:
                return await verb(api, args)
            except grpc.aio.AioRpcError as e:
                print(f"ratelimitd: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
            except CliError as e:
                print(f"ratelimitd: {e}", file=sys.stderr)
                return 1
            finally:
                await api.channel.close()

        from ratelimitd.cli import run_async

        return run_async(go())

    return run


def client_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--address", default=os.environ.get("RATELIMITD_ADDRESS"), help=f"server host:port (default {DEFAULT_ADDRESS})"
    )
    p.add_argument("--token", default=os.environ.get("RATELIMITD_TOKEN"), help="credential (or RATELIMITD_TOKEN)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env = os.environ.get
    tls = p.add_argument_group("TLS (docs/operations.md); any of these turns TLS on")
    tls.add_argument(
        "--tls", action="store_true", default=_flag(env("RATELIMITD_TLS")), help="TLS, trusting the system's roots"
    )
    tls.add_argument("--tls-ca", default=env("RATELIMITD_TLS_CA"), help="PEM CA to trust for the server's certificate")
    tls.add_argument(
        "--tls-cert",
        default=env("RATELIMITD_TLS_CLIENT_CERT"),
        help="PEM client certificate, for mTLS (with --tls-key)",
    )
    tls.add_argument("--tls-key", default=env("RATELIMITD_TLS_CLIENT_KEY"), help="PEM private key of --tls-cert")
    tls.add_argument(
        "--tls-server-name",
        default=env("RATELIMITD_TLS_SERVER_NAME"),
        help="verify the server's certificate for this name instead of the address's host",
    )
    return p


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def client_tls(args: argparse.Namespace) -> ClientTls:
    return ClientTls(
        enabled=args.tls, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = client_flags(
        sub.add_parser("demo", help="run the reference's worked example (org 100/min; prod 80, staging 30)")
    )
    p.set_defaults(func=verb_command(demo, demo_mode=True))

    p = client_flags(sub.add_parser("check", help="ask for one decision (CheckAndConsume); exit 3 when refused"))
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--request-id")
    p.set_defaults(func=verb_command(check))

    p = client_flags(sub.add_parser("health", help="ask the server's gRPC health service; exit 0 only when SERVING"))
    p.add_argument("--service", default="", help="'' (whole server) or 'storage'")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=verb_command(health))

    org = sub.add_parser("org", help="organizations").add_subparsers(dest="verb", required=True)
    p = client_flags(org.add_parser("create", help="create an organization (operator)"))
    p.add_argument("name")
    p.set_defaults(func=verb_command(org_create))
    p = client_flags(org.add_parser("list", help="list organizations (a member sees its own)"))
    p.set_defaults(func=verb_command(org_list))
    p = client_flags(org.add_parser("get", help="show one organization"))
    p.add_argument("org")
    p.set_defaults(func=verb_command(org_get))
    p = client_flags(org.add_parser("limits", help="show, or with --set/--clear change, organization limits"))
    p.add_argument("org")
    _limit_flags(p)
    p.set_defaults(func=verb_command(org_limits))

    proj = sub.add_parser("project", help="projects").add_subparsers(dest="verb", required=True)
    p = client_flags(proj.add_parser("create", help="create a project"))
    p.add_argument("org")
    p.add_argument("name")
    p.add_argument("--description", default="")
    p.set_defaults(func=verb_command(project_create))
    p = client_flags(proj.add_parser("list", help="list projects by name (every page unless --page-size/--page-token)"))
    p.add_argument("org")
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--page-token", default="")
    p.set_defaults(func=verb_command(project_list))
    p = client_flags(proj.add_parser("get", help="show one project"))
    p.add_argument("org")
    p.add_argument("project")
    p.set_defaults(func=verb_command(project_get))
    p = client_flags(proj.add_parser("update", help="rename a project and/or change its description"))
    p.add_argument("org")
    p.add_argument("project")
    p.add_argument("--name")
    p.add_argument("--description")
    p.set_defaults(func=verb_command(project_update))
    p = client_flags(proj.add_parser("delete", help="delete a project; its keys stop working at once"))
    p.add_argument("org")
    p.add_argument("project")
    p.set_defaults(func=verb_command(project_delete))
    p = client_flags(proj.add_parser("limits", help="show effective limits, or with --set/--clear change custom ones"))
    p.add_argument("org")
    p.add_argument("project")
    _limit_flags(p)
    p.set_defaults(func=verb_command(project_limits))

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="verb", required=True)
    p = client_flags(key.add_parser("create", help="create an API key; the secret is printed once"))
    p.add_argument("org")
    p.add_argument("project")
    p.add_argument("name")
    p.set_defaults(func=verb_command(key_create))
    p = client_flags(key.add_parser("list", help="list a project's API keys (metadata only)"))
    p.add_argument("org")
    p.add_argument("project")
    p.set_defaults(func=verb_command(key_list))
    p = client_flags(key.add_parser("revoke", help="revoke an API key, effective for the next decision"))
    p.add_argument("org")
    p.add_argument("key")
    p.set_defaults(func=verb_command(key_revoke))

    models = sub.add_parser("models", help="model permissions").add_subparsers(dest="verb", required=True)
    p = client_flags(models.add_parser("show", help="show the organization's (and a project's) model permissions"))
    p.add_argument("org")
    p.add_argument("project", nargs="?")
    p.set_defaults(func=verb_command(models_show))
    p = client_flags(
        models.add_parser("set", help="replace the organization's (or with --project a project's) model list")
    )
    p.add_argument("org")
    p.add_argument("--project", help="a project's list instead of the organization's")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--allow", nargs="*", metavar="MODEL", help="only these models")
    which.add_argument("--block", nargs="*", metavar="MODEL", help="every model but these")
    which.add_argument("--unrestricted", action="store_true", help="no list")
    p.set_defaults(func=verb_command(models_set))

    member = sub.add_parser("member", help="organization members").add_subparsers(dest="verb", required=True)
    p = client_flags(member.add_parser("add", help="add a member; its first token is printed once"))
    p.add_argument("org")
    p.add_argument("name", help="unique in the organization, e.g. an e-mail address")
    p.add_argument("--role", choices=ROLES, required=True)
    p.set_defaults(func=verb_command(member_add))
    p = client_flags(member.add_parser("list", help="list members"))
    p.add_argument("org")
    p.set_defaults(func=verb_command(member_list))
    p = client_flags(member.add_parser("role", help="change a member's role"))
    p.add_argument("org")
    p.add_argument("member")
    p.add_argument("role", choices=ROLES)
    p.set_defaults(func=verb_command(member_role))
    p = client_flags(member.add_parser("remove", help="remove a member and revoke its credentials"))
    p.add_argument("org")
    p.add_argument("member")
    p.set_defaults(func=verb_command(member_remove))

    cred = sub.add_parser("credential", help="management credentials").add_subparsers(dest="verb", required=True)
    p = client_flags(
        cred.add_parser("create", help="a member's (--org, --member) or an operator credential; printed once")
    )
    p.add_argument("name")
    p.add_argument("--org")
    p.add_argument("--member")
    p.set_defaults(func=verb_command(credential_create))
    p = client_flags(
        cred.add_parser("list", help="an organization's member credentials, or without --org the operator's")
    )
    p.add_argument("--org")
    p.set_defaults(func=verb_command(credential_list))
    p = client_flags(cred.add_parser("revoke", help="revoke a credential (--org for a member's)"))
    p.add_argument("credential")
    p.add_argument("--org")
    p.set_defaults(func=verb_command(credential_revoke))

    p = client_flags(sub.add_parser("whoami", help="who the credential speaks for"))
    p.set_defaults(func=verb_command(whoami))

    p = client_flags(sub.add_parser("audit", help="the audit trail, newest first (without ORG: the platform's)"))
    p.add_argument("org", nargs="?")
    p.add_argument("--project", help="only this project's events")
    p.add_argument("--since", help="2025-06-01, 2025-06-01T12:00:00Z, 90m or 7d (ago)")
    p.add_argument("--until", help="same forms as --since")
    p.add_argument("--limit", type=int, default=50, help="at most this many events (default 50)")
    p.set_defaults(func=verb_command(audit))

    from ratelimitd import apply

    p = client_flags(sub.add_parser("apply", help="make an organization match a YAML file (docs/apply.md)"))
    p.add_argument("-f", "--file", required=True, help="the YAML file ('-' for stdin)")
    p.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    p.add_argument("--prune", action="store_true", help="also delete projects and remove members the file omits")
    p.set_defaults(func=verb_command(apply.run))


def _limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="*", help="model the limits are for ('*' = default for all models)")
    p.add_argument("--set", nargs="*", default=[], metavar="LIMIT", help="rpm=100 tpm=6000 or requests/day=1000")
    p.add_argument("--clear", nargs="*", default=[], metavar="NAME", help="rpm tpd or tokens/minute")
