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
import functools
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from ratelimitd.client_cli import ROLE_NAMES, ROLES, SHORTHANDS, Api, metric_window
from ratelimitd.engine.control import validate_description, validate_project_name
from ratelimitd.engine.errors import InvalidArgument
from ratelimitd.engine.limits import (
    MAX_LIMITS_PER_CALL,
    MAX_LIMITS_PER_SCOPE,
    METRICS,
    validate_limit_value,
    validate_model,
)
from ratelimitd.engine.members import validate_member_name
from ratelimitd.engine.permissions import Access, validate_policy
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
    spec = _read(text, source)
    problems = _problems(spec)
    if problems:
        raise SpecError("\n".join(problems))
    return spec


def _read(text: str, source: str) -> Spec:
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


def _problems(spec: Spec) -> list[str]:
    """Every value the server would refuse on its own, each with where it is in the file."""
    problems: list[str] = []

    def check(where: str, validate: Callable[..., object], *args: Any) -> None:
        try:
            validate(*args)
        except InvalidArgument as e:
            problems.append(f"{where}: {e.message}")

    def check_policy(where: str, policy: Policy | None) -> None:
        if policy is None or policy.access == "unrestricted":
            return
        if policy.access == "allow" and not policy.models:
            problems.append(f"{where}.allow: an empty allow list would refuse every model; name at least one")
        check(f"{where}.{policy.access}", validate_policy, Access(policy.access), policy.models)

    check_policy("models", spec.models)
    for name, project in (spec.projects or {}).items():
        where = f"projects.{name}"
        check(where, validate_project_name, name)
        if project.description is not None:
            check(f"{where}.description", validate_description, project.description)
        for (model, metric, window), value in sorted((project.limits or {}).items()):
            at = f"{where}.limits.{model}.{_limit_text((model, metric, window), None).split(' ', 1)[1]}"
            check(at, functools.partial(validate_model, wildcard=True), model)
            if metric not in METRICS:
                problems.append(f"{at}: metric {metric!r} is not one of {', '.join(METRICS)}")
            check(at, validate_limit_value, value)
        check_policy(f"{where}.models", project.models)
        if len(project.limits or {}) > MAX_LIMITS_PER_SCOPE:
            problems.append(
                f"{where}.limits: {len(project.limits or {})} limits; a project holds at most {MAX_LIMITS_PER_SCOPE}"
            )
    for name in spec.members or {}:
        check(f"members.{name}", validate_member_name, name)
    return problems


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
class Step:
    """One planned change, and the call that makes it (None: nothing to call, e.g. a member's token is set by it)."""

    change: Change
    act: Callable[[], Awaitable[None]] | None = None


def _org_ceiling(org_limits: Mapping[LimitKey, int], key: LimitKey) -> tuple[int | None, bool]:
    """The organization's limit over a project limit, and whether the model may have one at all.

    As set_project_limits.lua reads it: the model's own entry when the organization
    has any for that model, else its "*" entry; no entry at all means no ceiling.
    """
    model, metric, window = key
    if model != "*" and any(m == model for m, _, _ in org_limits):
        return org_limits.get(key), True
    star = {(me, w): v for (m, me, w), v in org_limits.items() if m == "*"}
    return star.get((metric, window)), bool(star)


@dataclass
class Applier:
    """Plans every change against what the server has, finds every problem, and only then makes them.

    A file the server would refuse in part (a project limit above the
    organization's, a project model list wider than the organization's) is
    refused as a whole before anything changes, in a dry run as in a real one.
    """

    api: Api
    spec: Spec
    prune: bool
    steps: list[Step] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    project_ids: dict[str, str] = field(default_factory=dict)  # by name; a new project's once it is created

    @property
    def org(self) -> str:
        return self.spec.organization

    @property
    def changes(self) -> list[Change]:
        return [step.change for step in self.steps]

    async def plan(self) -> None:
        md = self.api.metadata
        await self.api.orgs.GetOrganization(apb.GetOrganizationRequest(organization_id=self.org), metadata=md)
        got = await self.api.models.GetModelPermissions(
            apb.GetModelPermissionsRequest(organization_id=self.org), metadata=md
        )
        org_policy = _from_message(got.organization)
        if self.spec.models is not None:
            self._models("", "organization", self.org, org_policy, self.spec.models)
            org_policy = self.spec.models
        if self.spec.projects is not None:
            await self._projects(self.spec.projects, org_policy)
        if self.spec.members is not None:
            await self._members(self.spec.members)

    async def make(self, report: Callable[[Change], None]) -> None:
        """Makes the planned changes in order, reporting each once it is made."""
        for step in self.steps:
            if step.act is not None:
                await step.act()
            report(step.change)

    def _step(self, change: Change, act: Callable[[], Awaitable[None]] | None = None) -> None:
        self.steps.append(Step(change, act))

    def _call(
        self, method: Callable[..., Awaitable[Any]], request: Message | Callable[[], Message]
    ) -> Callable[[], Awaitable[None]]:
        """A step's call; a request that names a new project is built when it is made, once it has its id."""

        async def act() -> None:
            await method(request if isinstance(request, Message) else request(), metadata=self.api.metadata)

        return act

    def _models(self, project: str, kind: str, name: str, have: Policy, want: Policy) -> None:
        """``project``: "" for the organization's list, else the project's name."""
        if have == want:
            return

        def request() -> apb.SetModelPermissionsRequest:
            project_id = self.project_ids[project] if project else ""
            return apb.SetModelPermissionsRequest(
                organization_id=self.org, project_id=project_id, policy=want.message()
            )

        self._step(
            Change("~", kind, name, f"models {have.text()} -> {want.text()}"),
            self._call(self.api.models.SetModelPermissions, request),
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

    async def _projects(self, wanted: Mapping[str, ProjectSpec], org_policy: Policy) -> None:
        md = self.api.metadata
        existing = await self._existing_projects()
        self.project_ids = {name: p.id for name, p in existing.items()}
        got = await self.api.orgs.GetOrganizationLimits(
            apb.GetOrganizationLimitsRequest(organization_id=self.org), metadata=md
        )
        org_limits = {(x.model, x.metric, x.window): x.limit for x in got.limits}
        for name, want in wanted.items():
            project = existing.get(name)
            if project is None:
                self._step(Change("+", "project", name, want.description or ""), self._create(name, want))
            elif want.description is not None and want.description != project.description:
                update = apb.UpdateProjectRequest(
                    project=apb.Project(organization_id=self.org, id=project.id, description=want.description),
                    update_mask=FieldMask(paths=["description"]),
                )
                self._step(
                    Change("~", "project", name, f"description {project.description!r} -> {want.description!r}"),
                    self._call(self.api.projects.UpdateProject, update),
                )
            if want.limits is not None:
                self._check_limits(name, want.limits, org_limits)
                await self._limits(project, name, want.limits)
            if want.models is not None:
                self._check_narrows(name, org_policy, want.models)
                have = UNRESTRICTED
                if project is not None:
                    got_models = await self.api.models.GetModelPermissions(
                        apb.GetModelPermissionsRequest(organization_id=self.org, project_id=project.id), metadata=md
                    )
                    have = _from_message(got_models.project)
                self._models(name, "project", name, have, want.models)
        if self.prune:
            for name, project in sorted(existing.items()):
                if name not in wanted:
                    delete = apb.DeleteProjectRequest(organization_id=self.org, project_id=project.id)
                    self._step(
                        Change("-", "project", name, "deleted; its API keys stop working"),
                        self._call(self.api.projects.DeleteProject, delete),
                    )

    def _create(self, name: str, want: ProjectSpec) -> Callable[[], Awaitable[None]]:
        async def act() -> None:
            create = apb.CreateProjectRequest(organization_id=self.org, name=name, description=want.description or "")
            created = await self.api.projects.CreateProject(create, metadata=self.api.metadata)
            self.project_ids[name] = created.id

        return act

    def _check_limits(self, name: str, want: Mapping[LimitKey, int], org_limits: Mapping[LimitKey, int]) -> None:
        for key, value in sorted(want.items()):
            ceiling, available = _org_ceiling(org_limits, key)
            where = f"projects.{name}.limits.{key[0]}.{_limit_text(key, None).split(' ', 1)[1]}"
            if not available:
                self.problems.append(
                    f"{where}: organization {self.org} has no limits for model {key[0]!r} (nor a '*' default), "
                    "so a project cannot have one"
                )
            elif ceiling is not None and value > ceiling:
                self.problems.append(
                    f"{where}: {value} is above the organization's limit {ceiling}; "
                    "a project limit may only be equal to or below it"
                )

    def _check_narrows(self, name: str, org_policy: Policy, want: Policy) -> None:
        if want.access != "allow" or org_policy.access == "unrestricted":
            return
        for model in want.models:
            if (model in org_policy.models) != (org_policy.access == "allow"):
                where = "is not on" if org_policy.access == "allow" else "is on"
                self.problems.append(
                    f"projects.{name}.models: model {model!r} {where} the organization's {org_policy.access} list; "
                    "a project's allow-list may only name models the organization allows"
                )

    async def _limits(self, project: apb.Project | None, name: str, want: dict[LimitKey, int]) -> None:
        have: dict[LimitKey, int] = {}
        if project is not None:
            got = await self.api.projects.GetProjectLimits(
                apb.GetProjectLimitsRequest(organization_id=self.org, project_id=project.id),
                metadata=self.api.metadata,
            )
            have = {(x.model, x.metric, x.window): x.limit for x in got.custom}
        to_set = {k: v for k, v in sorted(want.items()) if have.get(k) != v}
        to_clear = sorted(k for k in have if k not in want)
        if not to_set and not to_clear:
            return
        if len(to_set) + len(to_clear) > MAX_LIMITS_PER_CALL:
            self.problems.append(
                f"projects.{name}.limits: {len(to_set) + len(to_clear)} limits change at once; the server takes at "
                f"most {MAX_LIMITS_PER_CALL} in one call, so apply the file in steps"
            )
            return
        parts = [_limit_text(k, v) + (f" (was {have[k]})" if k in have else "") for k, v in to_set.items()]
        parts += [f"clear {_limit_text(k, None)} (was {have[k]})" for k in to_clear]

        def request() -> apb.SetProjectLimitsRequest:
            return apb.SetProjectLimitsRequest(
                organization_id=self.org,
                project_id=self.project_ids[name],
                set=[apb.Limit(model=m, metric=me, window=w, limit=v) for (m, me, w), v in to_set.items()],
                clear=[apb.LimitKey(model=m, metric=me, window=w) for m, me, w in to_clear],
            )

        self._step(
            Change("~", "project", name, "limits " + "; ".join(parts)),
            self._call(self.api.projects.SetProjectLimits, request),
        )

    async def _members(self, wanted: Mapping[str, str]) -> None:
        md = self.api.metadata
        listed = await self.api.members.ListMembers(
            apb.ListMembersRequest(organization_id=self.org, page_size=1000), metadata=md
        )
        existing = {m.name: m for m in listed.members}
        for name, role in wanted.items():
            if name not in existing:
                self._step(*self._add_member(name, role))
        # Promotions to Owner first, so demoting or removing an old Owner never leaves none.
        changed = [(n, r) for n, r in wanted.items() if n in existing and ROLES[r] != existing[n].role]
        for name, role in sorted(changed, key=lambda c: c[1] != "owner"):
            member = existing[name]
            update = apb.UpdateMemberRequest(
                member=apb.Member(organization_id=self.org, id=member.id, role=ROLES[role]),
                update_mask=FieldMask(paths=["role"]),
            )
            self._step(
                Change("~", "member", name, f"{ROLE_NAMES[member.role]} -> {role}"),
                self._call(self.api.members.UpdateMember, update),
            )
        if self.prune:
            for name, member in sorted(existing.items()):
                if name not in wanted:
                    remove = apb.RemoveMemberRequest(organization_id=self.org, member_id=member.id)
                    self._step(
                        Change("-", "member", name, "removed; its credentials are revoked"),
                        self._call(self.api.members.RemoveMember, remove),
                    )
        owners_before = any(m.role == apb.ROLE_OWNER for m in existing.values())
        kept = {} if self.prune else {n: ROLE_NAMES[m.role] for n, m in existing.items()}
        if owners_before and "owner" not in {**kept, **wanted}.values():
            self.problems.append("members: the organization would have no Owner left; name at least one")

    def _add_member(self, name: str, role: str) -> tuple[Change, Callable[[], Awaitable[None]]]:
        change = Change("+", "member", name, role)

        async def act() -> None:
            add = apb.AddMemberRequest(organization_id=self.org, name=name, role=ROLES[role])
            change.token = (await self.api.members.AddMember(add, metadata=self.api.metadata)).token

        return change, act


def _refuse(problems: list[str], code: int) -> int:
    for problem in problems:
        print(f"ratelimitd: {problem}", file=sys.stderr)
    if len(problems) > 1 or code == 1:
        n = len(problems)
        print(f"ratelimitd: nothing was changed ({n} problem{'s' if n != 1 else ''})", file=sys.stderr)
    return code


def read_spec(source: str) -> Spec:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as e:
        raise SpecError(f"{source}: cannot read: {e.strerror}") from None
    return load(text, source)


async def run(api: Api, args: argparse.Namespace) -> int:
    try:
        spec = read_spec(args.file)  # a small local file, read and checked before any call is made
    except SpecError as e:
        return _refuse(str(e).splitlines(), 2)
    quiet = bool(args.json)
    applier = Applier(api, spec, args.prune)
    await applier.plan()
    if applier.problems:
        return _refuse(applier.problems, 1)
    report: Callable[[Change], None] = (lambda c: None) if quiet else (lambda c: print(c.line()))
    if args.dry_run:
        for change in applier.changes:
            report(change)
    else:
        await applier.make(report)
    n = len(applier.changes)
    if quiet:
        changes = [dataclasses.asdict(c) for c in applier.changes]
        print(json.dumps({"dry_run": args.dry_run, "changes": changes}, indent=2))
    elif args.dry_run:
        print(f"dry run: {n} change{'s' if n != 1 else ''} would be made; nothing was changed")
    else:
        print(f"{n} change{'s' if n != 1 else ''}" if n else "no changes")
    return 0
