"""Model permissions: which models an organization, and each of its projects, may use.

Each scope (the organization, or one project) is either unrestricted, an
allow-list (only these models), or a block-list (every model but these). A
decision passes only if both the organization's and the project's lists let
the model through, so a project can narrow what its organization allows and
never widen it. Setting a project allow-list that names a model the
organization does not allow is refused; an organization list changed later
simply wins at decision time, like a lowered organization limit, and no
project setting is rewritten.

These lists are on top of availability: a model with no limit (and no ``*``
limit) is not available at all (REASON_MODEL_NOT_AVAILABLE). A blocked model
is refused with REASON_MODEL_BLOCKED before any bucket is charged. decide.lua
reads both scopes in one HMGET per item (layout in keys.py, ``mp``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from ratelimitd.core import keys
from ratelimitd.core.errors import FailedPrecondition, InvalidArgument, NotFound
from ratelimitd.engine import ids
from ratelimitd.engine.audit import Audit
from ratelimitd.engine.authz import INTERNAL, Principal
from ratelimitd.engine.control import ControlPlane
from ratelimitd.engine.limits import validate_model
from ratelimitd.storage.redis import begin_writes, key_exists, storage_errors, transaction

MAX_MODELS = 256
ORGANIZATION_SCOPE = "o"


class Access(enum.StrEnum):
    UNRESTRICTED = "unrestricted"
    ALLOW = "allow"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    access: Access
    models: tuple[str, ...]  # sorted

    def record(self) -> dict[str, Any]:
        return {"access": str(self.access), "models": list(self.models)}

    def permits(self, model: str) -> bool:
        if self.access is Access.ALLOW:
            return model in self.models
        if self.access is Access.BLOCK:
            return model not in self.models
        return True


UNRESTRICTED = ModelPolicy(Access.UNRESTRICTED, ())


def validate_policy(access: Access, models: Sequence[str]) -> ModelPolicy:
    if access is Access.UNRESTRICTED and models:
        raise InvalidArgument("models must be empty when access is unrestricted")
    if len(models) > MAX_MODELS:
        raise InvalidArgument(f"{len(models)} models are listed, at most {MAX_MODELS} are allowed")
    seen: set[str] = set()
    for i, model in enumerate(models):
        try:
            validate_model(model, wildcard=False)
        except InvalidArgument as e:
            raise InvalidArgument(f"models[{i}]: {e.message}") from None
        if model in seen:
            raise InvalidArgument(f"models[{i}]: model {model!r} is named twice")
        seen.add(model)
    return ModelPolicy(access, tuple(sorted(models)))


def _scope(project_id: str) -> str:
    return f"p:{project_id}" if project_id else ORGANIZATION_SCOPE


def _policy(raw: dict[str, str], scope: str) -> ModelPolicy:
    mode = raw.get(scope)
    if mode is None:
        return UNRESTRICTED
    prefix = scope + "|"
    return ModelPolicy(Access(mode), tuple(sorted(f[len(prefix) :] for f in raw if f.startswith(prefix))))


class ModelPermissions:
    def __init__(self, redis: Redis, control: ControlPlane, audit: Audit) -> None:
        self._redis = redis
        self._control = control
        self._audit = audit

    async def get(self, org_id: str, project_id: str = "") -> tuple[ModelPolicy, ModelPolicy | None]:
        """The organization's policy, and the project's when ``project_id`` is given."""
        k = await (self._control.require_project(org_id, project_id) if project_id else
                   self._control.require_organization(org_id))  # fmt: skip
        with storage_errors():
            raw = cast(dict[str, str], await self._redis.hgetall(k.model_permissions))
        return _policy(raw, ORGANIZATION_SCOPE), _policy(raw, _scope(project_id)) if project_id else None

    async def set(
        self, org_id: str, project_id: str, access: Access, models: Sequence[str], *, actor: Principal = INTERNAL
    ) -> ModelPolicy:
        """Replaces the whole policy of one scope: the organization (``project_id`` "") or a project."""
        policy = validate_policy(access, models)
        if project_id:
            ids.require_id("proj", "project_id", project_id)
        k = await self._control.require_organization(org_id)
        scope = _scope(project_id)
        watched = [k.model_permissions, *([k.project(project_id)] if project_id else [])]

        async def change(pipe: Pipeline) -> ModelPolicy:
            if project_id and not await key_exists(pipe, k.project(project_id)):
                raise NotFound(f"project {project_id} does not exist in organization {org_id}")
            raw = cast(dict[str, str], await pipe.hgetall(k.model_permissions))
            before = _policy(raw, scope)
            if project_id and policy.access is Access.ALLOW:
                _check_narrows(org_id, _policy(raw, ORGANIZATION_SCOPE), policy)
            begin_writes(pipe)
            stale = [f for f in raw if f == scope or f.startswith(scope + "|")]
            if stale:
                pipe.hdel(k.model_permissions, *stale)
            if policy.access is not Access.UNRESTRICTED:
                pipe.hset(k.model_permissions, scope, str(policy.access))
                if policy.models:
                    pipe.hset(k.model_permissions, mapping={f"{scope}|{m}": "1" for m in policy.models})
            keys.invalidate_decision_config(pipe, k)
            operation = "SetProjectModelPermissions" if project_id else "SetOrganizationModelPermissions"
            self._audit.append(
                pipe, k.audit, actor, operation, project_id or org_id, project_id=project_id,
                before=before.record(), after=policy.record(),
            )  # fmt: skip
            return policy

        return await transaction(self._redis, watched, change)


def _check_narrows(org_id: str, org: ModelPolicy, project: ModelPolicy) -> None:
    for model in project.models:
        if not org.permits(model):
            where = "is not on" if org.access is Access.ALLOW else "is on"
            raise FailedPrecondition(
                f"model {model!r} {where} organization {org_id}'s {org.access} list; "
                "a project's allow-list may only name models the organization allows"
            )
