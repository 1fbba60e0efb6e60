"""The one authentication gate: every RPC the server serves passes it before its handler.

api/wire.py's ``Guard`` asks :meth:`Gate.wrap` once per method for the handler to run,
so a handler cannot skip the gate and a new RPC cannot forget it. Each method has one
of three rules, chosen from its full name:

- ``OPEN``: health and reflection, which name nothing secret;
- ``IN_REQUEST``: the decision path (CheckAndConsume, its stream, ReportUsage,
  Envoy's ShouldRateLimit). Each request names its caller: an API key, checked by
  the decision script in the same round trip as the decision, or a project
  reference, for which the handler calls :meth:`Gate.admit_project_reference` (a
  trusted gateway's bearer credential). Nothing is added per call on this path;
- ``BEARER``: every other method of our services, and ManageProject (each of its
  operations checked as the ProjectService RPC of that name). The bearer credential is
  authenticated and engine/authz.py's table (the single source of who may do what)
  is asked about the method's operation and organization before the handler runs;
  the handler reads who called with :func:`caller`.

A method of a service the gate does not know, of ours that the authorization
table lacks, or whose request names no organization and has no scope below, is
refused: the server fails closed. :meth:`Gate.check` raises at start-up for such
a method, so the gap is found before any call.
"""

from __future__ import annotations

import contextvars
import enum
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from ratelimitd.api.errors import refuse
from ratelimitd.core.errors import InvalidArgument, PermissionDenied, RatelimitdError
from ratelimitd.engine import ids
from ratelimitd.engine.authz import POLICY, Principal, authorize
from ratelimitd.engine.credentials import Credentials

Context = grpc.aio.ServicerContext[Any, Any]
# The operation a request asks for, and the organization it names (None: the platform).
Scope = Callable[[Any, Principal], tuple[str, str | None]]


class Rule(enum.Enum):
    OPEN = "open"
    IN_REQUEST = "in_request"
    BEARER = "bearer"


OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})
IN_REQUEST_METHODS = frozenset(
    {
        "/ratelimitd.v1.RateLimitService/CheckAndConsume",
        "/ratelimitd.v1.RateLimitService/CheckAndConsumeStream",
        "/ratelimitd.v1.RateLimitService/ReportUsage",
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    }
)
BEARER_SERVICES = frozenset(
    {
        "ratelimitd.v1.OrganizationService",
        "ratelimitd.v1.ProjectService",
        "ratelimitd.v1.ModelPermissionService",
        "ratelimitd.v1.MemberService",
        "ratelimitd.v1.CredentialService",
        "ratelimitd.v1.AuditService",
        "ratelimitd.v1.UsageService",
    }
)


def _own_organization(operation: str) -> Scope:
    """Calls about the caller itself: a member's own organization, the operator's platform."""
    return lambda request, who: (operation, None if who.is_operator else who.organization_id)


def _organization_or_platform(operation: str) -> Scope:
    """Calls that work on the platform when they name no organization."""
    return lambda request, who: (operation, request.organization_id or None)


def _model_permissions(request: Any, who: Principal) -> tuple[str, str | None]:
    # The organization's list is governance, a project's is configuration: two operations.
    operation = "SetProjectModelPermissions" if request.project_id else "SetOrganizationModelPermissions"
    return operation, request.organization_id


# Methods whose operation or organization is not "the method's name, request.organization_id".
SCOPES: Mapping[str, Scope] = {
    "CreateOrganization": lambda request, who: ("CreateOrganization", None),
    "ListOrganizations": _own_organization("ListOrganizations"),
    "WhoAmI": _own_organization("WhoAmI"),
    "SetModelPermissions": _model_permissions,
    "CreateCredential": _organization_or_platform("CreateCredential"),
    "ListCredentials": _organization_or_platform("ListCredentials"),
    "RevokeCredential": _organization_or_platform("RevokeCredential"),
    "ListAuditEvents": _organization_or_platform("ListAuditEvents"),
    "SetPrice": lambda request, who: ("SetPrice", request.price.organization_id),
    # Update requests carry the resource itself, with a field mask (AIP-134).
    "UpdateProject": lambda request, who: ("UpdateProject", request.project.organization_id),
    "UpdateMember": lambda request, who: ("UpdateMember", request.member.organization_id),
    "SetUsageSettings": lambda request, who: ("SetUsageSettings", request.settings.organization_id),
}


def _managed_project(request: Any, who: Principal) -> tuple[str, str | None]:
    """ManageProject: the ProjectService operation its oneof names, scoped as that RPC is."""
    operation = request.WhichOneof("operation")
    if operation is None:
        raise InvalidArgument(f"operation is not set: set one of {', '.join(MANAGE_PROJECT_OPERATIONS)}")
    method = MANAGE_PROJECT_OPERATIONS[operation]
    return (SCOPES.get(method) or _by_name(method))(getattr(request, operation), who)


MANAGE_PROJECT = "/ratelimitd.v1.RateLimitService/ManageProject"
# ManageProject's oneof operation -> the ProjectService method it is (api/manage.py answers with it).
MANAGE_PROJECT_OPERATIONS: Mapping[str, str] = {
    "create_project": "CreateProject",
    "get_project": "GetProject",
    "update_project": "UpdateProject",
    "delete_project": "DeleteProject",
    "list_projects": "ListProjects",
    "set_project_limits": "SetProjectLimits",
    "get_project_limits": "GetProjectLimits",
    "create_api_key": "CreateApiKey",
    "list_api_keys": "ListApiKeys",
    "revoke_api_key": "RevokeApiKey",
}
# The operations the scopes above can name, for the start-up check.
_SCOPED_OPERATIONS = {
    "SetModelPermissions": ("SetProjectModelPermissions", "SetOrganizationModelPermissions"),
    "ManageProject": tuple(MANAGE_PROJECT_OPERATIONS.values()),
}


def _by_name(operation: str) -> Scope:
    return lambda request, who: (operation, request.organization_id)


def rule_of(method: str) -> Rule | None:
    """The rule for a full method name ("/pkg.Service/Method"); None: no rule (refused)."""
    service, _, name = method.strip("/").rpartition("/")
    if service in OPEN_SERVICES:
        return Rule.OPEN
    if method in IN_REQUEST_METHODS:
        return Rule.IN_REQUEST
    if method == MANAGE_PROJECT:
        return Rule.BEARER if all(op in POLICY for op in operations(name)) else None
    if service in BEARER_SERVICES and all(op in POLICY for op in operations(name)):
        if name in SCOPES or _names_organization(service, name):
            return Rule.BEARER
    return None


def _names_organization(service: str, name: str) -> bool:
    """Whether the method's request has the organization_id the default scope reads."""
    try:
        method = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        return False
    return method is not None and "organization_id" in method.input_type.fields_by_name


def operations(name: str) -> tuple[str, ...]:
    """The authorization table's operations a method's calls can name."""
    return _SCOPED_OPERATIONS.get(name, (name,))


_caller: contextvars.ContextVar[Principal] = contextvars.ContextVar("ratelimitd_caller")


def caller() -> Principal:
    """Who made the current BEARER call (the gate set it before the handler ran)."""
    return _caller.get()


def bearer(context: Context) -> str | None:
    """The ``authorization`` metadata of a call."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


class Gate:
    """Authenticates and authorizes; built before storage is up, opened once it is."""

    def __init__(self) -> None:
        self._credentials: Credentials | None = None
        self._storage_failed: Callable[[], None] = lambda: None

    def open(self, credentials: Credentials, storage_failed: Callable[[], None]) -> None:
        self._credentials = credentials
        self._storage_failed = storage_failed

    @staticmethod
    def check(methods: Iterable[str]) -> None:
        """Raises at start-up for a served method without a rule."""
        missing = sorted(m for m in methods if rule_of(m) is None)
        if missing:
            raise RuntimeError(
                f"no access rule for {', '.join(missing)}: add it to api/gate.py and engine/authz.py's POLICY"
            )

    async def admit_project_reference(self, context: Context, organization_id: str, project_id: str) -> None:
        """Raises unless the call's bearer credential may decide for this project by reference
        (a trusted gateway). The credential is checked first: nothing is said about the ids
        to a caller without one."""
        principal = await self._authenticate(context)
        if not ids.is_id("org", organization_id):
            raise InvalidArgument(f"project.organization_id {organization_id[:80]!r} is not an org_ id")
        if not ids.is_id("proj", project_id):
            raise InvalidArgument(f"project.project_id {project_id[:80]!r} is not a proj_ id")
        authorize(principal, "CheckAndConsumeByProject", organization_id)

    async def _authenticate(self, context: Context) -> Principal:
        if self._credentials is None:  # a call before start-up finished: nothing can be checked yet
            raise PermissionDenied("the server is starting; try again shortly")
        return await self._credentials.authenticate(bearer(context))

    def wrap(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        """The handler that runs for ``method``: as it is, behind the bearer check, or a refusal."""
        rule = rule_of(method)
        if rule is Rule.OPEN or rule is Rule.IN_REQUEST:
            return behaviour
        if rule is Rule.BEARER and inspect.iscoroutinefunction(behaviour):
            name = method.rpartition("/")[2]
            scope = _managed_project if method == MANAGE_PROJECT else SCOPES.get(name) or _by_name(name)
            return self._behind_bearer(method, behaviour, scope)
        return self._refusing(method)

    def _behind_bearer(self, method: str, behaviour: Callable[..., Any], scope: Scope) -> Callable[..., Any]:
        async def gated(request: Any, context: Context) -> Any:
            try:
                principal = await self._authenticate(context)
                authorize(principal, *scope(request, principal))
            except RatelimitdError as e:
                await refuse(context, e, method, self._storage_failed)
            _caller.set(principal)
            return await behaviour(request, context)

        return gated

    @staticmethod
    def _refusing(method: str) -> Callable[..., Any]:
        async def refused(request: Any, context: Context) -> Any:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{method} has no access rule on this server, so it is refused"
            )

        return refused
