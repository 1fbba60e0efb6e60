"""Organizations: create, read, list, and sweep what failed creates left; the base of the
control plane (engine/projects.py and engine/control.py build on it).

Not on the decision hot path. Every change appends its audit event in the same
atomic step. Callers authorize first (authz.py); methods here take the acting
principal only to record it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from ratelimitd.core import keys
from ratelimitd.core.errors import InvalidArgument, NotFound
from ratelimitd.engine import ids, pages
from ratelimitd.engine.audit import Audit
from ratelimitd.engine.authz import INTERNAL, Principal
from ratelimitd.engine.limits import Dimensions
from ratelimitd.engine.scripts import Scripts
from ratelimitd.storage.redis import storage_errors

# A create is between its two writes for one storage call; a record this old and still
# missing from the index was left there by a create that failed (sweep_unindexed_organizations).
UNINDEXED_GRACE_MS = 15 * 60 * 1000
MAX_NAME_LENGTH = 128


def as_strs(raw: Any) -> dict[str, str]:
    """The client decodes responses to str; redis-py's types cannot say so."""
    return cast(dict[str, str], raw)


def _text(raw: str | bytes) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _org_of_record(key: str) -> str | None:
    """The organization id of an ``rl:{org_…}:org`` key, None for anything else SCAN matched."""
    org_id = keys.organization_of_record(key)
    return org_id if ids.is_id("org", org_id) else None


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class OrganizationInfo:
    id: str
    name: str
    created_at_ms: int


def validate_name(what: str, name: str, limit: int = MAX_NAME_LENGTH) -> str:
    if not name.strip():
        raise InvalidArgument(f"{what} is empty")
    if len(name) > limit:
        raise InvalidArgument(f"{what} is {len(name)} characters long, at most {limit} are allowed")
    if any(ord(c) < 32 for c in name):
        raise InvalidArgument(f"{what} contains control characters")
    return name


class Organizations:
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
            rec = as_strs(await self._redis.hgetall(k.record))
        return OrganizationInfo(org_id, rec.get("n", ""), int(rec.get("c", 0)))

    async def list_organizations(
        self, page_size: int, page_token: str, only: str | None = None
    ) -> tuple[list[OrganizationInfo], str]:
        """By name, then id; ``only`` limits the list to one organization (a member's own)."""
        size = pages.page_size(page_size)
        with storage_errors():
            names = as_strs(await self._redis.hgetall(keys.ORGANIZATIONS))
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
            indexed = set(as_strs(await self._redis.hgetall(keys.ORGANIZATIONS)))
            async for raw_key in self._redis.scan_iter(match=keys.ORGANIZATION_RECORDS, count=1000):
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
