"""The control plane: organizations, projects, limits and API keys.

Not on the decision hot path; every write that must be checked against other
state (a project limit against the organization's) is one Lua script, so no
concurrent change can slip between the check and the write.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from ratelimitd.engine import ids, keys
from ratelimitd.engine.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ratelimitd.engine.limits import (
    WILDCARD,
    Dimension,
    Dimensions,
    LimitSpec,
    parse_limit_field,
    unique_fields,
    validate_limit_value,
    validate_model,
)
from ratelimitd.engine.scripts import Scripts
from ratelimitd.storage.redis import storage_errors

PROJECT_NAME_RULES = "1 to 64 characters: lowercase letters, digits and '-', starting with a letter or digit"
_PROJECT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
MAX_NAME_LENGTH = 128
MAX_DESCRIPTION_LENGTH = 1024


def _strs(raw: Any) -> dict[str, str]:
    """The client decodes responses to str; redis-py's types cannot say so."""
    return cast(dict[str, str], raw)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class OrganizationInfo:
    id: str
    name: str
    created_at_ms: int


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    id: str
    organization_id: str
    name: str
    description: str
    created_at_ms: int


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


def validate_name(what: str, name: str, limit: int = MAX_NAME_LENGTH) -> str:
    if not name.strip():
        raise InvalidArgument(f"{what} is empty")
    if len(name) > limit:
        raise InvalidArgument(f"{what} is {len(name)} characters long, at most {limit} are allowed")
    if any(ord(c) < 32 for c in name):
        raise InvalidArgument(f"{what} contains control characters")
    return name


def validate_project_name(name: str) -> str:
    if not _PROJECT_NAME_RE.match(name):
        raise InvalidArgument(f"project name {name[:80]!r} is not valid: {PROJECT_NAME_RULES}")
    return name


def require_id(kind: str, what: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is empty")
    if not ids.is_id(kind, value):
        raise InvalidArgument(f"{what} {value[:80]!r} is not a {kind}_ id")
    return value


class ControlPlane:
    def __init__(self, redis: Redis, scripts: Scripts, dimensions: Dimensions) -> None:
        self._redis = redis
        self._scripts = scripts
        self.dims = dimensions

    # -- organizations -------------------------------------------------------

    async def create_organization(self, name: str) -> OrganizationInfo:
        validate_name("organization name", name)
        org = OrganizationInfo(ids.new_id("org"), name, now_ms())
        k = keys.OrgKeys(org.id)
        with storage_errors():
            await self._redis.hset(k.record, mapping={"n": name, "c": org.created_at_ms})
            await self._redis.hset(keys.ORGANIZATIONS, org.id, name)
        return org

    async def require_organization(self, org_id: str) -> keys.OrgKeys:
        require_id("org", "organization_id", org_id)
        k = keys.OrgKeys(org_id)
        with storage_errors():
            exists = await self._redis.exists(k.record)
        if not exists:
            raise NotFound(f"organization {org_id} does not exist")
        return k

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

    async def set_organization_limits(
        self,
        org_id: str,
        set_: Sequence[tuple[str, str, str, int]],
        clear: Sequence[tuple[str, str, str]],
    ) -> list[LimitSpec]:
        specs = self._specs(set_)
        clears = self._clear_fields(clear)
        if overlap := {s.field for s in specs} & set(clears):
            raise InvalidArgument(f"limit {sorted(overlap)[0]} is both set and cleared")
        k = await self.require_organization(org_id)
        with storage_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                if specs:
                    pipe.hset(k.org_limits, mapping={s.field: s.value for s in specs})
                if clears:
                    pipe.hdel(k.org_limits, *clears)
                await pipe.execute()
        return await self.organization_limits(org_id)

    async def organization_limits(self, org_id: str) -> list[LimitSpec]:
        k = await self.require_organization(org_id)
        with storage_errors():
            raw = _strs(await self._redis.hgetall(k.org_limits))
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

    async def create_project(self, org_id: str, name: str, description: str = "") -> ProjectInfo:
        validate_project_name(name)
        if len(description) > MAX_DESCRIPTION_LENGTH:
            raise InvalidArgument(
                f"description is {len(description)} characters long, at most {MAX_DESCRIPTION_LENGTH} are allowed"
            )
        k = await self.require_organization(org_id)
        project = ProjectInfo(ids.new_id("proj"), org_id, name, description, now_ms())
        with storage_errors():
            if not await self._redis.hsetnx(k.project_names, name, project.id):
                raise AlreadyExists(f"a project named {name!r} already exists in organization {org_id}")
            await self._redis.hset(
                k.project(project.id), mapping={"n": name, "d": description, "c": project.created_at_ms}
            )
        return project

    async def require_project(self, org_id: str, project_id: str) -> keys.OrgKeys:
        require_id("proj", "project_id", project_id)
        k = await self.require_organization(org_id)
        with storage_errors():
            exists = await self._redis.exists(k.project(project_id))
        if not exists:
            raise NotFound(f"project {project_id} does not exist in organization {org_id}")
        return k

    async def set_project_limits(
        self,
        org_id: str,
        project_id: str,
        set_: Sequence[tuple[str, str, str, int]],
        clear: Sequence[tuple[str, str, str]],
    ) -> list[LimitSpec]:
        specs = self._specs(set_)
        clears = self._clear_fields(clear)
        if overlap := {s.field for s in specs} & set(clears):
            raise InvalidArgument(f"limit {sorted(overlap)[0]} is both set and cleared")
        k = await self.require_project(org_id, project_id)
        args: list[str | int] = [len(self.dims.all), *(d.name for d in self.dims.all), len(specs)]
        for s in specs:
            args += (s.model, s.dimension.name, s.value)
        args += clears
        with storage_errors():
            reply = await self._scripts.set_project_limits(
                keys=[k.org_limits, k.project_limits(project_id), k.project(project_id)],
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
            raw = _strs(await self._redis.hgetall(k.project_limits(project_id)))
        return self._decode_limits(raw)

    async def effective_limits(self, org_id: str, project_id: str, models: Sequence[str] = ()) -> list[EffectiveLimit]:
        """Custom vs inherited for every model either level names (plus ``models``),
        resolved exactly as decide.lua resolves them."""
        for m in models:
            validate_model(m, wildcard=True)
        k = await self.require_project(org_id, project_id)
        with storage_errors():
            org_raw = _strs(await self._redis.hgetall(k.org_limits))
            proj_raw = _strs(await self._redis.hgetall(k.project_limits(project_id)))
        org_specs = self._decode_limits(org_raw)
        proj_specs = self._decode_limits(proj_raw)
        org_models = {s.model for s in org_specs}
        names = sorted(org_models | {s.model for s in proj_specs} | set(models), key=lambda m: (m == WILDCARD, m))
        result = []
        for model in names:
            org_source = model if model in org_models else WILDCARD
            for dim in self.dims.all:
                org_value = org_raw.get(f"{org_source}|{dim.name}")
                custom = proj_raw.get(f"{model}|{dim.name}", proj_raw.get(f"{WILDCARD}|{dim.name}"))
                if org_value is None and custom is None:
                    continue
                result.append(
                    EffectiveLimit(
                        model,
                        dim,
                        int(custom) if custom is not None else None,
                        int(org_value) if org_value is not None else None,
                    )
                )
        return result

    # -- API keys ------------------------------------------------------------

    async def create_api_key(self, org_id: str, project_id: str, name: str) -> tuple[ApiKeyInfo, str]:
        validate_name("key name", name)
        k = await self.require_project(org_id, project_id)
        key_id, secret = ids.new_api_key(org_id)
        info = ApiKeyInfo(key_id, project_id, name, secret[: ids.VISIBLE_PREFIX_LENGTH], now_ms(), 0, False)
        with storage_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
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
                await pipe.execute()
        return info, secret

    async def list_api_keys(self, org_id: str, project_id: str) -> list[ApiKeyInfo]:
        k = await self.require_project(org_id, project_id)
        with storage_errors():
            key_ids = sorted(cast(set[str], await self._redis.smembers(k.project_api_keys(project_id))))
            async with self._redis.pipeline(transaction=False) as pipe:
                for key_id in key_ids:
                    pipe.hgetall(k.api_key(key_id))
                records = [_strs(r) for r in await pipe.execute()]
        infos = [self._key_info(key_id, rec) for key_id, rec in zip(key_ids, records, strict=True) if rec]
        return sorted(infos, key=lambda i: (i.created_at_ms, i.id))

    @staticmethod
    def _key_info(key_id: str, rec: dict[str, str]) -> ApiKeyInfo:
        return ApiKeyInfo(
            key_id, rec["p"], rec.get("n", ""), rec.get("x", ""), int(rec.get("c", 0)), int(rec.get("u", 0)),
            rec.get("r") == "1",
        )  # fmt: skip

    async def revoke_api_key(self, org_id: str, key_id: str) -> ApiKeyInfo:
        require_id("key", "key_id", key_id)
        k = await self.require_organization(org_id)
        with storage_errors():
            if not await self._redis.exists(k.api_key(key_id)):
                raise NotFound(f"API key {key_id} does not exist in organization {org_id}")
            await self._redis.hset(k.api_key(key_id), "r", "1")
            rec = _strs(await self._redis.hgetall(k.api_key(key_id)))
        return self._key_info(key_id, rec)
