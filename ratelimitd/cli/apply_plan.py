"""Planning an ``apply``: every change against what the server has, and only then making them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from ratelimitd.cli.apply_spec import UNRESTRICTED, LimitKey, Policy, ProjectSpec, Spec, from_message, limit_text
from ratelimitd.cli.client import Api, list_members
from ratelimitd.cli.members import ROLE_NAMES, ROLES
from ratelimitd.cli.projects import list_projects
from ratelimitd.engine.limits import MAX_LIMITS_PER_CALL
from ratelimitd.v1 import admin_pb2 as apb


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
        await self.api.orgs.GetOrganization(apb.GetOrganizationRequest(organization_id=self.org))
        got = await self.api.models.GetModelPermissions(apb.GetModelPermissionsRequest(organization_id=self.org))
        org_policy = from_message(got.organization)
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
            await method(request if isinstance(request, Message) else request())

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
        projects, _ = await list_projects(self.api, self.org)
        return {p.name: p for p in projects}

    async def _projects(self, wanted: Mapping[str, ProjectSpec], org_policy: Policy) -> None:
        existing = await self._existing_projects()
        self.project_ids = {name: p.id for name, p in existing.items()}
        got = await self.api.orgs.GetOrganizationLimits(apb.GetOrganizationLimitsRequest(organization_id=self.org))
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
                        apb.GetModelPermissionsRequest(organization_id=self.org, project_id=project.id)
                    )
                    have = from_message(got_models.project)
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
            created = await self.api.projects.CreateProject(create)
            self.project_ids[name] = created.id

        return act

    def _check_limits(self, name: str, want: Mapping[LimitKey, int], org_limits: Mapping[LimitKey, int]) -> None:
        for key, value in sorted(want.items()):
            ceiling, available = _org_ceiling(org_limits, key)
            where = f"projects.{name}.limits.{key[0]}.{limit_text(key, None).split(' ', 1)[1]}"
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
                apb.GetProjectLimitsRequest(organization_id=self.org, project_id=project.id)
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
        parts = [limit_text(k, v) + (f" (was {have[k]})" if k in have else "") for k, v in to_set.items()]
        parts += [f"clear {limit_text(k, None)} (was {have[k]})" for k in to_clear]

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
        listed = await list_members(self.api, self.org)
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
            change.token = (await self.api.members.AddMember(add)).token

        return change, act
