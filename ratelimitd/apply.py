"""``ratelimitd apply -f FILE``: make an organization match a YAML file (docs/apply.md).

The rule: a section the file writes is matched exactly; a section it leaves
out is left alone. Projects and members the file does not name are kept,
unless ``--prune`` is given (deleting a project stops its keys, so it is
never implicit). Every change goes through the gRPC API with the caller's
credential, so the same authorization and validation apply, and each change
is atomic on its own; a second run with the same file changes nothing.

Changes are made in an order that cannot trip over itself: the organization's
model list before projects' lists (which must fit inside it), new Owners
before old ones are demoted or removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf.message import Message

from ratelimitd.client_cli import ROLE_NAMES, ROLES, SHORTHANDS, Api, metric_window
from ratelimitd.v1 import admin_pb2 as apb

LimitKey = tuple[str, str, str]  # model, metric, window
T = TypeVar("T")

_SHORT = {v: k for k, v in SHORTHANDS.items()}
ACCESS = {"allow": apb.MODEL_ACCESS_ALLOW_LIST, "block": apb.MODEL_ACCESS_BLOCK_LIST}


@dataclass(frozen=True)
class Policy:
    access: str  # "unrestricted", "allow" or "block"
    models: tuple[str, ...]

    def text(self) -> str:
        return self.access if self.access == "unrestricted" else f"{self.access} [{', '.join(self.models)}]"

    def message(self) -> apb.ModelPolicy:
        return apb.ModelPolicy(access=ACCESS.get(self.access, apb.MODEL_ACCESS_UNRESTRICTED), models=self.models)


UNRESTRICTED = Policy("unrestricted", ())


@dataclass
class ProjectSpec:
    description: str | None = None
    limits: dict[LimitKey, int] | None = None
    models: Policy | None = None


@dataclass
class Spec:
    organization: str
    models: Policy | None = None
    projects: dict[str, ProjectSpec] | None = None
    members: dict[str, str] | None = None


# -- reading the file ------------------------------------------------------------


class SpecError(ValueError):
    pass


def _mapping(value: Any, where: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping, found {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise SpecError(f"{where}: key {key!r} must be a string (quote it)")
        if allowed is not None and key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r} (expected one of {', '.join(allowed)})")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{where}: expected a string, found {type(value).__name__}")
    return value


def _policy(value: Any, where: str) -> Policy:
    if value == "unrestricted":
        return UNRESTRICTED
    spec = _mapping(value, where, ("allow", "block"))
    if len(spec) != 1:
        raise SpecError(f"{where}: give exactly one of 'allow' or 'block' (or the word unrestricted)")
    ((access, models),) = spec.items()
    if not isinstance(models, list):
        raise SpecError(f"{where}.{access}: expected a list of model names")
    return Policy(access, tuple(sorted(_string(m, f"{where}.{access}[{i}]") for i, m in enumerate(models))))


def _limits(value: Any, where: str) -> dict[LimitKey, int]:
    limits = {}
    for model, entries in _mapping(value, where).items():
        for name, number in _mapping(entries, f"{where}.{model}").items():
            try:
                metric, window = metric_window(name)
            except ValueError as e:
                raise SpecError(f"{where}.{model}.{name}: {e}") from None
            if isinstance(number, bool) or not isinstance(number, int):
                raise SpecError(f"{where}.{model}.{name}: {number!r} is not a whole number")
            if (model, metric, window) in limits:
                raise SpecError(f"{where}.{model}.{name}: the same limit is named twice")
            limits[(model, metric, window)] = number
    return limits


def load(text: str, source: str) -> Spec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
    top = _mapping(raw, source, ("organization", "models", "projects", "members"))
    if "organization" not in top:
        raise SpecError(f"{source}: 'organization' (the organization's id) is required")
    spec = Spec(_string(top["organization"], f"{source}: organization"))
    if "models" in top:
        spec.models = _policy(top["models"], "models")
    if "projects" in top:
        spec.projects = {}
        for name, body in _mapping(top["projects"], "projects").items():
            where = f"projects.{name}"
            p = _mapping(body, where, ("description", "limits", "models"))
            spec.projects[name] = ProjectSpec(
                description=_string(p["description"] or "", f"{where}.description") if "description" in p else None,
                limits=_limits(p["limits"], f"{where}.limits") if "limits" in p else None,
                models=_policy(p["models"], f"{where}.models") if "models" in p else None,
            )
    if "members" in top:
        spec.members = {}
        for name, role in _mapping(top["members"], "members").items():
            if role not in ROLES:
                raise SpecError(f"members.{name}: role {role!r} is not one of {', '.join(ROLES)}")
            spec.members[name] = role
    return spec


# -- making it so ----------------------------------------------------------------


def _limit_text(key: LimitKey, value: int | None) -> str:
    model, metric, window = key
    name = _SHORT.get((metric, window), f"{metric}/{window}")
    return f"{model} {name}={value}" if value is not None else f"{model} {name}"


def _from_message(p: apb.ModelPolicy) -> Policy:
    names = {v: k for k, v in ACCESS.items()}
    return Policy(names.get(p.access, "unrestricted"), tuple(sorted(p.models)))


@dataclass
class Change:
    sign: str  # "+" created, "~" changed, "-" deleted
    kind: str
    name: str
    detail: str = ""
    token: str = ""

    def line(self) -> str:
        text = f"{self.sign} {self.kind} {self.name}" + (f": {self.detail}" if self.detail else "")
        return text + (f"\n    token (shown only now, keep it safe): {self.token}" if self.token else "")


@dataclass
class Applier:
    api: Api
    spec: Spec
    dry_run: bool
    prune: bool
    report: Callable[[Change], None]
    changes: list[Change] = field(default_factory=list)

    async def _make(
        self, change: Change, method: Callable[..., Awaitable[T]] | None = None, request: Message | None = None
    ) -> T | None:
        """Makes one change, ``method(request)``, unless this is a dry run; then reports it.

        Reported only once made, so the output lists exactly what happened.
        """
        result = None
        if method is not None and not self.dry_run:
            result = await method(request, metadata=self.api.metadata)
        self.changes.append(change)
        self.report(change)
        return result

    @property
    def org(self) -> str:
        return self.spec.organization

    async def run(self) -> None:
        md = self.api.metadata
        await self.api.orgs.GetOrganization(apb.GetOrganizationRequest(organization_id=self.org), metadata=md)
        if self.spec.models is not None:
            await self._models("", "organization", self.org, self.spec.models)
        if self.spec.projects is not None:
            await self._projects(self.spec.projects)
        if self.spec.members is not None:
            await self._members(self.spec.members)

    async def _models(self, project_id: str | None, kind: str, name: str, want: Policy) -> None:
        """``project_id`` "" is the organization's list; None a project this dry run did not create."""
        md = self.api.metadata
        have = UNRESTRICTED
        if project_id is not None:
            got = await self.api.models.GetModelPermissions(
                apb.GetModelPermissionsRequest(organization_id=self.org, project_id=project_id), metadata=md
            )
            have = _from_message(got.project if project_id else got.organization)
        if have == want:
            return
        request = apb.SetModelPermissionsRequest(
            organization_id=self.org, project_id=project_id or "", policy=want.message()
        )
        await self._make(
            Change("~", kind, name, f"models {have.text()} -> {want.text()}"),
            None if project_id is None else self.api.models.SetModelPermissions,
            request,
        )

    async def _existing_projects(self) -> dict[str, apb.Project]:
        found: dict[str, apb.Project] = {}
        token = ""
        while True:
            page = await self.api.projects.ListProjects(
                apb.ListProjectsRequest(organization_id=self.org, page_size=1000, page_token=token),
                metadata=self.api.metadata,
            )
            found.update((p.name, p) for p in page.projects)
            token = page.next_page_token
            if not token:
                return found

    async def _projects(self, wanted: Mapping[str, ProjectSpec]) -> None:
        existing = await self._existing_projects()
        for name, want in wanted.items():
            project = existing.get(name)
            if project is None:
                create = apb.CreateProjectRequest(
                    organization_id=self.org, name=name, description=want.description or ""
                )
                project = await self._make(
                    Change("+", "project", name, want.description or ""),
                    self.api.projects.CreateProject,
                    create,
                )
            elif want.description is not None and want.description != project.description:
                update = apb.UpdateProjectRequest(
                    organization_id=self.org, project_id=project.id, description=want.description
                )
                await self._make(
                    Change("~", "project", name, f"description {project.description!r} -> {want.description!r}"),
                    self.api.projects.UpdateProject,
                    update,
                )
            project_id = project.id if project is not None else None
            if want.limits is not None:
                await self._limits(project_id, name, want.limits)
            if want.models is not None:
                await self._models(project_id, "project", name, want.models)
        if self.prune:
            for name, project in sorted(existing.items()):
                if name not in wanted:
                    delete = apb.DeleteProjectRequest(organization_id=self.org, project_id=project.id)
                    await self._make(
                        Change("-", "project", name, "deleted; its API keys stop working"),
                        self.api.projects.DeleteProject,
                        delete,
                    )

    async def _limits(self, project_id: str | None, name: str, want: dict[LimitKey, int]) -> None:
        md = self.api.metadata
        have: dict[LimitKey, int] = {}
        if project_id is not None:
            got = await self.api.projects.GetProjectLimits(
                apb.GetProjectLimitsRequest(organization_id=self.org, project_id=project_id), metadata=md
            )
            have = {(x.model, x.metric, x.window): x.limit for x in got.custom}
        to_set = {k: v for k, v in sorted(want.items()) if have.get(k) != v}
        to_clear = sorted(k for k in have if k not in want)
        if not to_set and not to_clear:
            return
        parts = [_limit_text(k, v) + (f" (was {have[k]})" if k in have else "") for k, v in to_set.items()]
        parts += [f"clear {_limit_text(k, None)} (was {have[k]})" for k in to_clear]
        request = apb.SetProjectLimitsRequest(
            organization_id=self.org,
            project_id=project_id or "",
            set=[apb.Limit(model=m, metric=me, window=w, limit=v) for (m, me, w), v in to_set.items()],
            clear=[apb.LimitKey(model=m, metric=me, window=w) for m, me, w in to_clear],
        )
        await self._make(
            Change("~", "project", name, "limits " + "; ".join(parts)),
            None if project_id is None else self.api.projects.SetProjectLimits,
            request,
        )

    async def _members(self, wanted: Mapping[str, str]) -> None:
        md = self.api.metadata
        listed = await self.api.members.ListMembers(apb.ListMembersRequest(organization_id=self.org), metadata=md)
        existing = {m.name: m for m in listed.members}
        for name, role in wanted.items():
            if name not in existing:
                change = Change("+", "member", name, role)
                add = apb.AddMemberRequest(organization_id=self.org, name=name, role=ROLES[role])
                if not self.dry_run:
                    change.token = (await self.api.members.AddMember(add, metadata=md)).token
                await self._make(change)
        # Promotions to Owner first, so demoting or removing an old Owner never leaves none.
        changed = [(n, r) for n, r in wanted.items() if n in existing and ROLES[r] != existing[n].role]
        for name, role in sorted(changed, key=lambda c: c[1] != "owner"):
            member = existing[name]
            update = apb.UpdateMemberRequest(organization_id=self.org, member_id=member.id, role=ROLES[role])
            await self._make(
                Change("~", "member", name, f"{ROLE_NAMES[member.role]} -> {role}"),
                self.api.members.UpdateMember,
                update,
            )
        if self.prune:
            for name, member in sorted(existing.items()):
                if name not in wanted:
                    remove = apb.RemoveMemberRequest(organization_id=self.org, member_id=member.id)
                    await self._make(
                        Change("-", "member", name, "removed; its credentials are revoked"),
                        self.api.members.RemoveMember,
                        remove,
                    )


def read_spec(source: str) -> Spec:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as e:
        raise SpecError(f"{source}: cannot read: {e.strerror}") from None
    return load(text, source)


async def run(api: Api, args: argparse.Namespace) -> int:
    spec = read_spec(args.file)  # a small local file, read before any call is made
    quiet = bool(args.json)
    applier = Applier(api, spec, args.dry_run, args.prune, (lambda c: None) if quiet else (lambda c: print(c.line())))
    await applier.run()
    n = len(applier.changes)
    if quiet:
        changes = [dataclasses.asdict(c) for c in applier.changes]
        print(json.dumps({"dry_run": args.dry_run, "changes": changes}, indent=2))
    elif args.dry_run:
        print(f"dry run: {n} change{'s' if n != 1 else ''} would be made; nothing was changed")
    else:
        print(f"{n} change{'s' if n != 1 else ''}" if n else "no changes")
    return 0
