"""The control plane: organizations, projects, limits and API keys.

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
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from ratelimitd.engine import ids, keys, pages
from ratelimitd.engine.audit import Audit, AuditEvent, actor_json
from ratelimitd.engine.authz import INTERNAL, Principal
from ratelimitd.engine.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ratelimitd.engine.limits import (
    MAX_LIMITS_PER_SCOPE,
    WILDCARD,
    Dimension,
    Dimensions,
    LimitSpec,
    check_batch_size,
    check_scope_size,
    parse_limit_field,
    unique_fields,
    validate_limit_value,
    validate_model,
)
from ratelimitd.engine.scripts import Scripts
from ratelimitd.storage.redis import begin_writes, key_exists, storage_errors, transaction

# Names are part of URLs, metric labels and YAML keys, hence the narrow set.
PROJECT_NAME_RULES = "1 to 64 characters: lowercase letters, digits and '-', starting with a letter or digit"
_PROJECT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
# A create is between its two writes for one storage call; a record this old and still
# missing from the index was left there by a create that failed (sweep_unindexed_organizations).
UNINDEXED_GRACE_MS = 15 * 60 * 1000
MAX_NAME_LENGTH = 128
MAX_DESCRIPTION_LENGTH = 1024


def _strs(raw: Any) -> dict[str, str]:
    """The client decodes responses to str; redis-py's types cannot say so."""
    return cast(dict[str, str], raw)


def _text(raw: str | bytes) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _org_of_record(key: str) -> str | None:
    """The organization id of an ``rl:{org_…}:org`` key, None for anything else SCAN matched."""
    org_id = key.removeprefix("rl:{").removesuffix("}:org")
    return org_id if ids.is_id("org", org_id) and key == keys.OrgKeys(org_id).record else None


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


def _project_record(p: ProjectInfo) -> dict[str, str]:
    return {"name": p.name, "description": p.description}


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


async def _state_fields(redis: Redis, state: str, pattern: str) -> list[str]:
    """The decision state hash's field names matching ``pattern``. Read undecoded: its values
    are binary (lib.lua), which a decoding client cannot read as text."""
    fields: list[str] = []
    cursor: int | bytes = 0
    while True:
        # (hscan_iter decodes values; NOVALUES needs Valkey 8 / Redis 7.4)
        cursor, page = await redis.execute_command(  # type: ignore[no-untyped-call]
            "HSCAN", state, cursor, "MATCH", pattern, "COUNT", 1000, NEVER_DECODE=True
        )
        fields += [f.decode() for f in page]
        if int(cursor) == 0:
            return fields


def validate_name(what: str, name: str, limit: int = MAX_NAME_LENGTH) -> str:
    if not name.strip():
        raise InvalidArgument(f"{what} is empty")
    if len(name) > limit:
        raise InvalidArgument(f"{what} is {len(name)} characters long, at most {limit} are allowed")
    if any(ord(c) < 32 for c in name):
        raise InvalidArgument(f"{what} contains control characters")
    return name


def validate_description(description: str) -> str:
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgument(
            f"description is {len(description)} characters long, at most {MAX_DESCRIPTION_LENGTH} are allowed"
        )
    if any(ord(c) < 32 and c not in "\n\t" for c in description):
        raise InvalidArgument("description contains control characters")
    return description


def validate_project_name(name: str) -> str:
    if not _PROJECT_NAME_RE.match(name):
        raise InvalidArgument(f"project name {name[:80]!r} is not valid: {PROJECT_NAME_RULES}")
    return name


class ControlPlane:
    def __init__(self, redis: Redis, scripts: Scripts, dimensions: Dimensions, audit: Audit) -> None:
        self._redis = redis
        self._scripts = scripts
        self.dims = dimensions
        self.audit = audit

    # -- organizations -------------------------------------------------------

    async def create_organization(self, name: str, *, actor: Principal = INTERNAL) -> OrganizationInfo:
        validate_name("organization name", name)
        org = OrganizationInfo(ids.new_id("org"), name, now_ms())
        k = keys.OrgKeys(org.id)
        with storage_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(k.record, mapping={"n": name, "c": org.created_at_ms})
                self.audit.append(pipe, k.audit, actor, "CreateOrganization", org.id, after={"name": name})
                await pipe.execute()
            # The index lives outside the organization's slot, so it is written
            # second: an organization missing from it is invisible, never half-made.
            await self._redis.hset(keys.ORGANIZATIONS, org.id, name)
        return org

    async def get_organization(self, org_id: str) -> OrganizationInfo:
        k = await self.require_organization(org_id)
        with storage_errors():
            rec = _strs(await self._redis.hgetall(k.record))
        return OrganizationInfo(org_id, rec.get("n", ""), int(rec.get("c", 0)))

    async def list_organizations(
        self, page_size: int, page_token: str, only: str | None = None
    ) -> tuple[list[OrganizationInfo], str]:
        """By name, then id; ``only`` limits the list to one organization (a member's own)."""
        size = pages.page_size(page_size)
        with storage_errors():
            names = _strs(await self._redis.hgetall(keys.ORGANIZATIONS))
            org_ids = [o for o in names if only is None or o == only]
            async with self._redis.pipeline(transaction=False) as pipe:
                for org_id in org_ids:
                    pipe.hget(keys.OrgKeys(org_id).record, "c")
                created = await pipe.execute()
        # An index entry whose record is gone (a sweep raced a late index write) lists nothing.
        items = sorted(
            (f"{names[o]}\x00{o}", OrganizationInfo(o, names[o], int(c)))
            for o, c in zip(org_ids, created, strict=True)
            if c is not None
        )
        return pages.paginate(items, size, page_token)

    async def sweep_unindexed_organizations(self, grace_ms: int = UNINDEXED_GRACE_MS) -> list[str]:
        """Deletes what a failed create left: an organization record (and its audit event)
        older than ``grace_ms`` that never made it into the index. Nobody was given its id,
        so nothing refers to it. Returns the ids removed. A full SCAN: run at start, not often."""
        removed: list[str] = []
        with storage_errors():
            indexed = set(_strs(await self._redis.hgetall(keys.ORGANIZATIONS)))
            async for raw_key in self._redis.scan_iter(match=keys.org_prefix("org_*") + "org", count=1000):
                org_id = _org_of_record(_text(raw_key))
                if org_id is None or org_id in indexed or not await self._unindexed_long_enough(org_id, grace_ms):
                    continue
                await self._delete_organization_keys(org_id)
                removed.append(org_id)
        return removed

    async def _unindexed_long_enough(self, org_id: str, grace_ms: int) -> bool:
        created = await self._redis.hget(keys.OrgKeys(org_id).record, "c")
        if created is None or now_ms() - int(created) < grace_ms:
            return False
        # read again: the create may have finished since the index was read
        return not await self._redis.hexists(keys.ORGANIZATIONS, org_id)

    async def _delete_organization_keys(self, org_id: str) -> None:
        # one key at a time: on a cluster every key is in the organization's slot anyway,
        # and a half-done sweep is finished by the next one
        async for raw_key in self._redis.scan_iter(match=keys.org_prefix(org_id) + "*", count=1000):
            await self._redis.delete(_text(raw_key))

    async def require_organization(self, org_id: str) -> keys.OrgKeys:
        ids.require_id("org", "organization_id", org_id)
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
            before = {f: int(v) for f, v in _strs(await pipe.hgetall(k.org_limits)).items()}
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

    async def create_project(
        self, org_id: str, name: str, description: str = "", *, actor: Principal = INTERNAL
    ) -> ProjectInfo:
        validate_project_name(name)
        validate_description(description)
        k = await self.require_organization(org_id)
        project = ProjectInfo(ids.new_id("proj"), org_id, name, description, now_ms())

        async def change(pipe: Pipeline) -> None:
            if await pipe.hexists(k.project_names, name):
                raise AlreadyExists(f"a project named {name!r} already exists in organization {org_id}")
            begin_writes(pipe)
            pipe.hset(k.project_names, name, project.id)
            pipe.hset(k.project(project.id), mapping={"n": name, "d": description, "c": project.created_at_ms})
            self.audit.append(
                pipe, k.audit, actor, "CreateProject", project.id, project_id=project.id, after=_project_record(project)
            )

        await transaction(self._redis, [k.project_names], change)
        return project

    async def _read_project(
        self, client: Redis | Pipeline, k: keys.OrgKeys, org_id: str, project_id: str
    ) -> ProjectInfo:
        rec = _strs(await client.hgetall(k.project(project_id)))
        if not rec:
            raise NotFound(f"project {project_id} does not exist in organization {org_id}")
        return ProjectInfo(project_id, org_id, rec.get("n", ""), rec.get("d", ""), int(rec.get("c", 0)))

    async def get_project(self, org_id: str, project_id: str = "", name: str = "") -> ProjectInfo:
        """By id, or by name (exactly one of them)."""
        if bool(project_id) == bool(name):
            raise InvalidArgument("set exactly one of project_id and name")
        if name:
            validate_project_name(name)
            k = await self.require_organization(org_id)
            with storage_errors():
                found = await self._redis.hget(k.project_names, name)
            if found is None:
                raise NotFound(f"no project named {name!r} exists in organization {org_id}")
            project_id = str(found)
        ids.require_id("proj", "project_id", project_id)
        k = await self.require_organization(org_id)
        with storage_errors():
            return await self._read_project(self._redis, k, org_id, project_id)

    async def list_projects(self, org_id: str, page_size: int, page_token: str) -> tuple[list[ProjectInfo], str]:
        """Ordered by name. A project renamed while pages are read may move across a page boundary."""
        size = pages.page_size(page_size)
        k = await self.require_organization(org_id)
        with storage_errors():
            by_name = _strs(await self._redis.hgetall(k.project_names))
        names, next_token = pages.paginate(sorted((n, n) for n in by_name), size, page_token)
        with storage_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for n in names:
                    pipe.hgetall(k.project(by_name[n]))
                records = [_strs(r) for r in await pipe.execute()]
        projects = [
            ProjectInfo(by_name[n], org_id, rec.get("n", n), rec.get("d", ""), int(rec.get("c", 0)))
            for n, rec in zip(names, records, strict=True)
            if rec
        ]
        return projects, next_token

    async def update_project(
        self, org_id: str, project_id: str, name: str | None, description: str | None, *, actor: Principal = INTERNAL
    ) -> ProjectInfo:
        """Renames and/or re-describes; the name index changes in the same transaction."""
        if name is None and description is None:
            raise InvalidArgument("nothing to update: set name or description")
        if name is not None:
            validate_project_name(name)
        if description is not None:
            validate_description(description)
        ids.require_id("proj", "project_id", project_id)
        k = await self.require_organization(org_id)

        async def change(pipe: Pipeline) -> ProjectInfo:
            old = await self._read_project(pipe, k, org_id, project_id)
            new = ProjectInfo(
                project_id, org_id, old.name if name is None else name,
                old.description if description is None else description, old.created_at_ms,
            )  # fmt: skip
            renamed = new.name != old.name
            if renamed and await pipe.hexists(k.project_names, new.name):
                raise AlreadyExists(f"a project named {new.name!r} already exists in organization {org_id}")
            begin_writes(pipe)
            if renamed:
                pipe.hdel(k.project_names, old.name)
                pipe.hset(k.project_names, new.name, project_id)
            pipe.hset(k.project(project_id), mapping={"n": new.name, "d": new.description})
            self.audit.append(
                pipe, k.audit, actor, "UpdateProject", project_id, project_id=project_id,
                before=_project_record(old), after=_project_record(new),
            )  # fmt: skip
            return new

        return await transaction(self._redis, [k.project(project_id), k.project_names], change)

    async def delete_project(self, org_id: str, project_id: str, *, actor: Principal = INTERNAL) -> ProjectInfo:
        """Removes the project record and frees its name; nothing else is touched.

        Decisions need the record, so its keys stop working at the very next
        decision. The record moves to ``pd:<id>`` so usage views can still name
        the project; its limits, keys and usage data stay where they are, inert.
        """
        ids.require_id("proj", "project_id", project_id)
        k = await self.require_organization(org_id)

        async def change(pipe: Pipeline) -> ProjectInfo:
            old = await self._read_project(pipe, k, org_id, project_id)
            owns_name = await pipe.hget(k.project_names, old.name) == project_id
            begin_writes(pipe)
            # raw: redis-py's cluster pipeline refuses rename() even within one slot
            pipe.execute_command("RENAME", k.project(project_id), k.deleted_project(project_id))
            pipe.hset(k.deleted_project(project_id), "x", now_ms())
            keys.invalidate_decision_config(pipe, k)
            if owns_name:
                pipe.hdel(k.project_names, old.name)
            self.audit.append(
                pipe, k.audit, actor, "DeleteProject", project_id, project_id=project_id, before=_project_record(old)
            )
            return old

        old = await transaction(self._redis, [k.project(project_id), k.project_names], change)
        await self._forget_decision_state(k, project_id)
        return old

    async def _forget_decision_state(self, k: keys.OrgKeys, project_id: str) -> None:
        """Drops a deleted project's buckets and cached configuration from the decision state hash,
        which would otherwise keep them as long as the organization has traffic. No decision writes
        them again: the project's next decision finds it gone (the change bumped the version)."""
        with storage_errors():
            stale = await _state_fields(self._redis, k.state, f"*:{project_id}:*")
            for start in range(0, len(stale), 1000):
                await self._redis.hdel(k.state, *stale[start : start + 1000])

    async def require_project(self, org_id: str, project_id: str, *, or_deleted: bool = False) -> keys.OrgKeys:
        """``or_deleted``: a deleted project will do too (its history stays readable)."""
        ids.require_id("proj", "project_id", project_id)
        k = await self.require_organization(org_id)
        names = [k.project(project_id), *([k.deleted_project(project_id)] if or_deleted else [])]
        with storage_errors():
            exists = await self._redis.exists(*names)
        if not exists:
            raise NotFound(f"project {project_id} does not exist in organization {org_id}")
        return k

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
            raw = _strs(await self._redis.hgetall(k.project_limits(project_id)))
        return self._decode_limits(raw)

    async def effective_limits(self, org_id: str, project_id: str, models: Sequence[str] = ()) -> list[EffectiveLimit]:
        """Custom vs inherited for every model either level names (plus ``models``),
        resolved by the Lua decisions use (effective_limits.lua)."""
        for m in models:
            validate_model(m, wildcard=True)
        k = await self.require_project(org_id, project_id)
        dims = self.dims.all
        with storage_errors():
            org_raw = _strs(await self._redis.hgetall(k.org_limits))
            proj_raw = _strs(await self._redis.hgetall(k.project_limits(project_id)))
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
                records = [_strs(r) for r in await pipe.execute()]
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
            rec = _strs(await pipe.hgetall(k.api_key(key_id)))
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
