"""The control plane: organizations and projects (organizations.py, projects.py), limits
and API keys.

Not on the decision hot path. Every write that must be checked against other
state is atomic with its check: a Lua script (a project limit against the
organization's) or an optimistic transaction (``storage.redis.transaction``:
a project name against the name index), so no concurrent change can slip
between the check and the write. Every change appends its audit event in the
same atomic step. Callers authorize first (authz.py); methods here take the
acting principal only to record it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from redis.asyncio.client import Pipeline

from ratelimitd.core import keys
from ratelimitd.core.errors import FailedPrecondition, InvalidArgument, NotFound
from ratelimitd.engine import ids
from ratelimitd.engine.audit import AuditEvent, actor_json
from ratelimitd.engine.authz import INTERNAL, Principal
from ratelimitd.engine.limits import (
    MAX_LIMITS_PER_SCOPE,
    WILDCARD,
    Dimension,
    LimitSpec,
    check_batch_size,
    check_scope_size,
    parse_limit_field,
    unique_fields,
    validate_limit_value,
    validate_model,
)
from ratelimitd.engine.organizations import as_strs, now_ms, validate_name
from ratelimitd.engine.projects import Projects
from ratelimitd.storage.redis import begin_writes, key_exists, storage_errors, transaction


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    id: str
    project_id: str
    name: str
    prefix: str
    created_at_ms: int
    last_used_at_ms: int
    revoked: bool


@dataclass(frozen=True, slots=True)
class EffectiveLimit:
    model: str
    dimension: Dimension
    custom: int | None
    organization: int | None

    @property
    def effective(self) -> int | None:
        values = [v for v in (self.custom, self.organization) if v is not None]
        return min(values) if values else None


class ControlPlane(Projects):
    """Organizations and projects (the base classes), their limits, API keys and audit trail."""

    def _specs(self, entries: Iterable[tuple[str, str, str, int]]) -> list[LimitSpec]:
        specs = [
            LimitSpec(validate_model(model, wildcard=True), self.dims.get(metric, window), validate_limit_value(value))
            for model, metric, window, value in entries
        ]
        unique_fields((s.model, s.dimension) for s in specs)
        return specs

    def _clear_fields(self, entries: Iterable[tuple[str, str, str]]) -> list[str]:
        return unique_fields(
            (validate_model(model, wildcard=True), self.dims.get(metric, window)) for model, metric, window in entries
        )

    def _changes(
        self, set_: Sequence[tuple[str, str, str, int]], clear: Sequence[tuple[str, str, str]]
    ) -> tuple[list[LimitSpec], list[str]]:
        """Limits to set and fields to clear, validated; naming one limit in both is an error."""
        check_batch_size(len(set_), len(clear))
        specs = self._specs(set_)
        clears = self._clear_fields(clear)
        if overlap := {s.field for s in specs} & set(clears):
            raise InvalidArgument(f"limit {sorted(overlap)[0]} is both set and cleared")
        return specs, clears

    async def set_organization_limits(
        self,
        org_id: str,
        set_: Sequence[tuple[str, str, str, int]],
        clear: Sequence[tuple[str, str, str]],
        *,
        actor: Principal = INTERNAL,
    ) -> list[LimitSpec]:
        specs, clears = self._changes(set_, clear)
        k = await self.require_organization(org_id)

        async def change(pipe: Pipeline) -> None:
            before = {f: int(v) for f, v in as_strs(await pipe.hgetall(k.org_limits)).items()}
            after = {f: v for f, v in before.items() if f not in clears} | {s.field: s.value for s in specs}
            check_scope_size(len(before), len(after), f"organization {org_id}")
            begin_writes(pipe)
            if specs:
                pipe.hset(k.org_limits, mapping={s.field: s.value for s in specs})
            if clears:
                pipe.hdel(k.org_limits, *clears)
            keys.invalidate_decision_config(pipe, k)
            self.audit.append(pipe, k.audit, actor, "SetOrganizationLimits", org_id, before=before, after=after)

        await transaction(self._redis, [k.org_limits], change)
        return await self.organization_limits(org_id)

    async def organization_limits(self, org_id: str) -> list[LimitSpec]:
        k = await self.require_organization(org_id)
        with storage_errors():
            raw = as_strs(await self._redis.hgetall(k.org_limits))
        return self._decode_limits(raw)

    def _decode_limits(self, raw: dict[str, str]) -> list[LimitSpec]:
        specs = []
        for field, value in raw.items():
            parsed = parse_limit_field(field, self.dims)
            if parsed is not None:
                specs.append(LimitSpec(parsed[0], parsed[1], int(value)))
        order = {d: i for i, d in enumerate(self.dims.all)}
        return sorted(specs, key=lambda s: (s.model == WILDCARD, s.model, order[s.dimension]))

    # -- projects ------------------------------------------------------------

    async def set_project_limits(
        self,
        org_id: str,
        project_id: str,
        set_: Sequence[tuple[str, str, str, int]],
        clear: Sequence[tuple[str, str, str]],
        *,
        actor: Principal = INTERNAL,
    ) -> list[LimitSpec]:
        specs, clears = self._changes(set_, clear)
        k = await self.require_project(org_id, project_id)
        args: list[str | int] = [
            self.audit.max_events, actor_json(actor), project_id, MAX_LIMITS_PER_SCOPE, len(self.dims.all),
            *(d.name for d in self.dims.all), len(specs),
        ]  # fmt: skip
        for s in specs:
            args += (s.model, s.dimension.name, s.value)
        args += clears
        with storage_errors():
            reply = await self._scripts.set_project_limits(
                keys=[k.org_limits, k.project_limits(project_id), k.project(project_id), k.audit, k.state],
                args=args,
                client=self._redis,
            )
        status = reply[0]
        if status == "not_found":
            raise NotFound(f"project {project_id} does not exist in organization {org_id}")
        if status == "no_model":
            raise FailedPrecondition(
                f"organization {org_id} has no limits for model {reply[1]!r} (nor a '*' default), "
                "so a project cannot have one"
            )
        if status == "too_many":
            check_scope_size(int(reply[1]), int(reply[2]), f"project {project_id}")
        if status == "above":
            model, dim, value, ceiling = reply[1], reply[2], reply[3], reply[4]
            metric, window = dim.split("|")
            raise FailedPrecondition(
                f"project limit {value} for {model} {metric} per {window} is above the organization's limit "
                f"{ceiling}; a project limit may only be equal to or below it"
            )
        return await self.project_limits(org_id, project_id)

    async def project_limits(self, org_id: str, project_id: str) -> list[LimitSpec]:
        k = await self.require_project(org_id, project_id)
        with storage_errors():
            raw = as_strs(await self._redis.hgetall(k.project_limits(project_id)))
        return self._decode_limits(raw)

    async def effective_limits(self, org_id: str, project_id: str, models: Sequence[str] = ()) -> list[EffectiveLimit]:
        """Custom vs inherited for every model either level names (plus ``models``),
        resolved by the Lua decisions use (effective_limits.lua)."""
        for m in models:
            validate_model(m, wildcard=True)
        k = await self.require_project(org_id, project_id)
        dims = self.dims.all
        with storage_errors():
            org_raw = as_strs(await self._redis.hgetall(k.org_limits))
            proj_raw = as_strs(await self._redis.hgetall(k.project_limits(project_id)))
        named = {s.model for s in (*self._decode_limits(org_raw), *self._decode_limits(proj_raw))}
        names = sorted(named | set(models), key=lambda m: (m == WILDCARD, m))
        with storage_errors():
            raw = await self._scripts.effective_limits(
                keys=[k.org_limits, k.project_limits(project_id)],
                args=[len(dims), *(d.name for d in dims), *names],
                client=self._redis,
            )
        values = [None if int(v) < 0 else int(v) for v in raw]
        result = []
        for n, model in enumerate(names):
            base = 2 * len(dims) * n
            for i, dim in enumerate(dims):
                org_value, custom = values[base + i], values[base + len(dims) + i]
                if org_value is not None or custom is not None:
                    result.append(EffectiveLimit(model, dim, custom, org_value))
        return result

    # -- API keys ------------------------------------------------------------

    async def create_api_key(
        self, org_id: str, project_id: str, name: str, *, actor: Principal = INTERNAL
    ) -> tuple[ApiKeyInfo, str]:
        validate_name("key name", name)
        ids.require_id("proj", "project_id", project_id)
        k = await self.require_organization(org_id)
        key_id, secret = ids.new_api_key(org_id)
        info = ApiKeyInfo(key_id, project_id, name, secret[: ids.VISIBLE_PREFIX_LENGTH], now_ms(), 0, False)

        async def change(pipe: Pipeline) -> None:
            # Watched: a key is never created for a project deleted meanwhile.
            if not await key_exists(pipe, k.project(project_id)):
                raise NotFound(f"project {project_id} does not exist in organization {org_id}")
            begin_writes(pipe)
            pipe.hset(
                k.api_key(key_id),
                mapping={
                    "h": ids.sha256_hex(secret),
                    "p": project_id,
                    "n": name,
                    "x": info.prefix,
                    "c": info.created_at_ms,
                },
            )
            pipe.sadd(k.project_api_keys(project_id), key_id)
            self.audit.append(
                pipe, k.audit, actor, "CreateApiKey", key_id, project_id=project_id,
                after={"name": name, "prefix": info.prefix, "revoked": False},
            )  # fmt: skip

        await transaction(self._redis, [k.project(project_id)], change)
        return info, secret

    async def list_api_keys(self, org_id: str, project_id: str) -> list[ApiKeyInfo]:
        k = await self.require_project(org_id, project_id)
        with storage_errors():
            key_ids = sorted(cast(set[str], await self._redis.smembers(k.project_api_keys(project_id))))
            async with self._redis.pipeline(transaction=False) as pipe:
                for key_id in key_ids:
                    pipe.hgetall(k.api_key(key_id))
                records = [as_strs(r) for r in await pipe.execute()]
        infos = [self._key_info(key_id, rec) for key_id, rec in zip(key_ids, records, strict=True) if rec]
        return sorted(infos, key=lambda i: (i.created_at_ms, i.id))

    @staticmethod
    def _key_info(key_id: str, rec: dict[str, str]) -> ApiKeyInfo:
        return ApiKeyInfo(
            key_id, rec["p"], rec.get("n", ""), rec.get("x", ""), int(rec.get("c", 0)), int(rec.get("u", 0)),
            rec.get("r") == "1",
        )  # fmt: skip

    async def revoke_api_key(self, org_id: str, key_id: str, *, actor: Principal = INTERNAL) -> ApiKeyInfo:
        """Effective at the very next decision (decide.lua reads the flag). Revoking twice changes nothing."""
        ids.require_id("key", "key_id", key_id)
        k = await self.require_organization(org_id)

        async def change(pipe: Pipeline) -> ApiKeyInfo:
            rec = as_strs(await pipe.hgetall(k.api_key(key_id)))
            if not rec:
                raise NotFound(f"API key {key_id} does not exist in organization {org_id}")
            old = self._key_info(key_id, rec)
            begin_writes(pipe)
            if not old.revoked:
                pipe.hset(k.api_key(key_id), "r", "1")
                self.audit.append(
                    pipe, k.audit, actor, "RevokeApiKey", key_id, project_id=old.project_id,
                    before={"name": old.name, "prefix": old.prefix, "revoked": False},
                    after={"name": old.name, "prefix": old.prefix, "revoked": True},
                )  # fmt: skip
            return dataclasses.replace(old, revoked=True)

        return await transaction(self._redis, [k.api_key(key_id)], change)

    # -- audit ---------------------------------------------------------------

    async def read_audit(
        self, org_id: str, project_id: str, since_ms: int, until_ms: int, page_size: int, page_token: str
    ) -> tuple[list[AuditEvent], str]:
        """An organization's trail, or the platform's when ``org_id`` is ""; newest first."""
        if project_id:
            if not org_id:
                raise InvalidArgument("project_id needs organization_id")
            # Not required to exist: a deleted project's history stays readable.
            ids.require_id("proj", "project_id", project_id)
        stream = (await self.require_organization(org_id)).audit if org_id else keys.PLATFORM_AUDIT
        return await self.audit.read(
            stream, project_id=project_id, since_ms=since_ms, until_ms=until_ms, page_size=page_size,
            page_token=page_token,
        )  # fmt: skip
