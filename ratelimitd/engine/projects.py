"""Projects of an organization: create, read, list, rename, delete.

A project name is checked against the name index in an optimistic transaction
(``storage.redis.transaction``), so no concurrent change can slip between the check
and the write; the audit event goes in the same atomic step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from ratelimitd.core import keys
from ratelimitd.core.errors import AlreadyExists, InvalidArgument, NotFound
from ratelimitd.engine import ids, pages
from ratelimitd.engine.authz import INTERNAL, Principal
from ratelimitd.engine.organizations import Organizations, as_strs, now_ms
from ratelimitd.storage.redis import begin_writes, storage_errors, transaction

# Names are part of URLs, metric labels and YAML keys, hence the narrow set.
PROJECT_NAME_RULES = "1 to 64 characters: lowercase letters, digits and '-', starting with a letter or digit"
_PROJECT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
MAX_DESCRIPTION_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    id: str
    organization_id: str
    name: str
    description: str
    created_at_ms: int


def _project_record(p: ProjectInfo) -> dict[str, str]:
    return {"name": p.name, "description": p.description}


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


class Projects(Organizations):
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
        rec = as_strs(await client.hgetall(k.project(project_id)))
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
            by_name = as_strs(await self._redis.hgetall(k.project_names))
        names, next_token = pages.paginate(sorted((n, n) for n in by_name), size, page_token)
        with storage_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for n in names:
                    pipe.hgetall(k.project(by_name[n]))
                records = [as_strs(r) for r in await pipe.execute()]
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
