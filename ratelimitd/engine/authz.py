"""Who may do what: principals, organization roles, and the one authorization table.

Every management call names its operation and its organization, and the API
layer calls :func:`authorize` with both before doing anything else; no other
code decides access. The platform operator may do everything. An organization
member may act only inside its own organization, and only with a role that the
table lists for the operation. Roles exist only at the organization level, so
a role never grants more inside a project than at the organization.

A member naming another organization gets NOT_FOUND, worded exactly as for an
organization that does not exist, so nothing leaks about other organizations.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from ratelimitd.core.errors import NotFound, PermissionDenied
from ratelimitd.engine import ids

OPERATOR = "operator"
MEMBER = "member"


class Role(enum.StrEnum):
    OWNER = "owner"
    # Today the same rights as OWNER (the reference: "Currently same as Owner");
    # a distinct role so the two can diverge without migrating anyone.
    DEVELOPER = "developer"
    READER = "reader"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the platform operator, or a member of one organization."""

    credential_id: str
    kind: str  # OPERATOR or MEMBER
    name: str
    organization_id: str = ""
    member_id: str = ""
    role: Role | None = None

    @property
    def is_operator(self) -> bool:
        return self.kind == OPERATOR

    def describe(self) -> str:
        if self.is_operator:
            return f"operator credential {self.credential_id} ({self.name})"
        return f"{self.role} {self.name} ({self.member_id}, credential {self.credential_id})"


# Changes made by code that uses the engine directly rather than through the
# API (tools, benchmarks, tests); the audit trail names it so.
INTERNAL = Principal("", "internal", "ratelimitd")

_ANYONE = frozenset(Role)
_WRITERS = frozenset({Role.OWNER, Role.DEVELOPER})
# Governance: members, credentials, audit, the organization's model list and
# budget, prices. The reference says of Developer "Currently same as Owner",
# so today it is the same set; the separate name marks where they would part.
_OWNERS = frozenset({Role.OWNER, Role.DEVELOPER})
_OPERATOR_ONLY: frozenset[Role] = frozenset()

# Operation -> the member roles allowed (the operator is always allowed).
# Platform-scoped calls (no organization) are the operator's alone whatever
# this says: creating operator credentials, reading the platform audit trail.
POLICY: Mapping[str, frozenset[Role]] = {
    # organizations: created and limited by the platform
    "CreateOrganization": _OPERATOR_ONLY,
    "ListOrganizations": _ANYONE,  # a member sees only its own
    "GetOrganization": _ANYONE,
    "SetOrganizationLimits": _OPERATOR_ONLY,
    "GetOrganizationLimits": _ANYONE,
    # projects, their limits and API keys
    "CreateProject": _WRITERS,
    "GetProject": _ANYONE,
    "ListProjects": _ANYONE,
    "UpdateProject": _WRITERS,
    "DeleteProject": _WRITERS,
    "SetProjectLimits": _WRITERS,
    "GetProjectLimits": _ANYONE,
    "CreateApiKey": _WRITERS,
    "ListApiKeys": _ANYONE,
    "RevokeApiKey": _WRITERS,
    # model permissions: the organization's list is governance, a project's is configuration
    "GetModelPermissions": _ANYONE,
    "SetOrganizationModelPermissions": _OWNERS,
    "SetProjectModelPermissions": _WRITERS,
    # people and their credentials
    "AddMember": _OWNERS,
    "ListMembers": _ANYONE,
    "UpdateMember": _OWNERS,
    "RemoveMember": _OWNERS,
    "CreateCredential": _OWNERS,
    "ListCredentials": _OWNERS,
    "RevokeCredential": _OWNERS,
    "WhoAmI": _ANYONE,
    "ListAuditEvents": _OWNERS,
    # usage, spend and logs: everyone in the organization reads them; what counts
    # toward limits is the platform's; prices and the spend limit are the Owner's
    "GetUsage": _ANYONE,
    "GetSpend": _ANYONE,
    "ListRequestLogs": _ANYONE,
    "ListPrices": _ANYONE,
    "GetUsageSettings": _ANYONE,
    "GetLimitState": _ANYONE,
    "GetRequestMetrics": _ANYONE,
    "SetSpendLimit": _OWNERS,
    "SetPrice": _OWNERS,
    "SetUsageSettings": _OPERATOR_ONLY,
    # decisions by project id instead of an API key: a trusted gateway only
    "CheckAndConsumeByProject": _OPERATOR_ONLY,
}


def authorize(principal: Principal, operation: str, organization_id: str | None) -> None:
    """Raises unless ``principal`` may run ``operation`` on ``organization_id``.

    ``None`` means the call is platform-scoped (it names no organization).
    A malformed organization id is INVALID_ARGUMENT for everyone: saying so
    reveals nothing.
    """
    roles = POLICY[operation]
    if organization_id is not None:
        ids.require_id("org", "organization_id", organization_id)
    if principal.is_operator:
        return
    if organization_id is None:
        raise PermissionDenied(f"{operation} without an organization is for the platform operator only")
    if organization_id != principal.organization_id:
        raise NotFound(f"organization {organization_id} does not exist")
    if principal.role not in roles:
        needed = " or ".join(sorted(roles)) if roles else "the platform operator"
        raise PermissionDenied(f"{operation} needs {needed}; this credential's role is {principal.role}")
