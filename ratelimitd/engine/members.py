"""Organization members, their roles and their credentials.

A member has a name (unique in its organization, e.g. an e-mail address), one
role (authz.Role) and any number of credentials; adding a member issues its
first credential, whose token is returned once. Everything lives in the
organization's slot (keys.py: ``m``, ``mn``, ``c``), so each change, its
credential records and its audit event are one transaction.

An organization never loses its last Owner through this API: removing or
demoting the last one is refused (make another member Owner first). The
platform operator can always add an Owner.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from ratelimitd.core import keys
from ratelimitd.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ratelimitd.engine import ids
from ratelimitd.engine.audit import Audit
from ratelimitd.engine.authz import INTERNAL, MEMBER, Principal, Role
from ratelimitd.engine.control import ControlPlane
from ratelimitd.engine.credentials import CredentialInfo, Credentials
from ratelimitd.engine.organizations import validate_name
from ratelimitd.storage.redis import begin_writes, storage_errors, transaction

MAX_MEMBER_NAME_LENGTH = 128


@dataclass(frozen=True, slots=True)
class MemberInfo:
    id: str
    organization_id: str
    name: str
    role: Role
    created_at_ms: int


def validate_member_name(name: str) -> str:
    validate_name("member name", name, MAX_MEMBER_NAME_LENGTH)
    if name != name.strip():
        raise InvalidArgument("member name starts or ends with whitespace")
    return name


def _now_ms() -> int:
    return int(time.time() * 1000)


def _member(org_id: str, member_id: str, raw: str) -> MemberInfo:
    rec = json.loads(raw)
    return MemberInfo(member_id, org_id, rec["n"], Role(rec["r"]), int(rec.get("c", 0)))


def _member_json(m: MemberInfo) -> str:
    return json.dumps({"n": m.name, "r": str(m.role), "c": m.created_at_ms})


def _credential(org_id: str, cred_id: str, raw: str) -> CredentialInfo:
    rec = json.loads(raw)
    return CredentialInfo(cred_id, MEMBER, rec.get("n", ""), int(rec.get("c", 0)), org_id, rec["m"])


class Members:
    def __init__(self, redis: Redis, control: ControlPlane, credentials: Credentials, audit: Audit) -> None:
        self._redis = redis
        self._control = control
        self._credentials = credentials
        self._audit = audit

    def _issue(
        self, pipe: Pipeline, k: keys.OrgKeys, org_id: str, member_id: str, name: str
    ) -> tuple[CredentialInfo, str]:
        """Queues a new credential of ``member_id`` in ``pipe``; returns it and its token."""
        token = ids.new_member_token(org_id, member_id)
        info = CredentialInfo(ids.new_id("cred"), MEMBER, name, _now_ms(), org_id, member_id)
        digest = ids.sha256_hex(token)
        pipe.hset(
            k.member_credentials,
            mapping={
                "k:" + info.id: json.dumps({"m": member_id, "n": name, "c": info.created_at_ms, "h": digest}),
                "h:" + digest: f"{info.id} {member_id}",
            },
        )
        return info, token

    async def add(
        self, org_id: str, name: str, role: Role, *, actor: Principal = INTERNAL
    ) -> tuple[MemberInfo, CredentialInfo, str]:
        validate_member_name(name)
        k = await self._control.require_organization(org_id)
        member = MemberInfo(ids.new_id("mem"), org_id, name, role, _now_ms())

        async def change(pipe: Pipeline) -> tuple[CredentialInfo, str]:
            if await pipe.hexists(k.member_names, name):
                raise AlreadyExists(f"a member named {name!r} already exists in organization {org_id}")
            begin_writes(pipe)
            pipe.hset(k.members, member.id, _member_json(member))
            pipe.hset(k.member_names, name, member.id)
            cred, token = self._issue(pipe, k, org_id, member.id, "initial")
            self._audit.append(
                pipe, k.audit, actor, "AddMember", member.id,
                after={"name": name, "role": str(role), "credential": cred.id},
            )  # fmt: skip
            return cred, token

        cred, token = await transaction(self._redis, [k.member_names], change)
        return member, cred, token

    async def list_members(self, org_id: str) -> list[MemberInfo]:
        k = await self._control.require_organization(org_id)
        with storage_errors():
            raw = cast(dict[str, str], await self._redis.hgetall(k.members))
        return sorted((_member(org_id, m, v) for m, v in raw.items()), key=lambda m: (m.name, m.id))

    async def _read(
        self, pipe: Pipeline, k: keys.OrgKeys, org_id: str, member_id: str
    ) -> tuple[MemberInfo, dict[str, str]]:
        """The member, and every member record (for the last-Owner rule)."""
        raw = cast(dict[str, str], await pipe.hgetall(k.members))
        if member_id not in raw:
            raise NotFound(f"member {member_id} does not exist in organization {org_id}")
        return _member(org_id, member_id, raw[member_id]), raw

    @staticmethod
    def _keep_an_owner(org_id: str, member: MemberInfo, everyone: dict[str, str]) -> None:
        owners = [m for m, v in everyone.items() if json.loads(v)["r"] == Role.OWNER]
        if owners == [member.id]:
            raise FailedPrecondition(
                f"member {member.id} ({member.name}) is the last owner of organization {org_id}; "
                "make another member owner first"
            )

    async def update_role(self, org_id: str, member_id: str, role: Role, *, actor: Principal = INTERNAL) -> MemberInfo:
        ids.require_id("mem", "member_id", member_id)
        k = await self._control.require_organization(org_id)

        async def change(pipe: Pipeline) -> MemberInfo:
            old, everyone = await self._read(pipe, k, org_id, member_id)
            if old.role is Role.OWNER and role is not Role.OWNER:
                self._keep_an_owner(org_id, old, everyone)
            new = MemberInfo(old.id, org_id, old.name, role, old.created_at_ms)
            begin_writes(pipe)
            pipe.hset(k.members, member_id, _member_json(new))
            self._audit.append(
                pipe, k.audit, actor, "UpdateMember", member_id,
                before={"name": old.name, "role": str(old.role)}, after={"name": new.name, "role": str(new.role)},
            )  # fmt: skip
            return new

        member = await transaction(self._redis, [k.members], change)
        self._credentials.forget_member(org_id, member_id)
        return member

    async def remove(self, org_id: str, member_id: str, *, actor: Principal = INTERNAL) -> MemberInfo:
        """Removes the member and revokes every credential it has."""
        ids.require_id("mem", "member_id", member_id)
        k = await self._control.require_organization(org_id)

        async def change(pipe: Pipeline) -> MemberInfo:
            old, everyone = await self._read(pipe, k, org_id, member_id)
            if old.role is Role.OWNER:
                self._keep_an_owner(org_id, old, everyone)
            creds = cast(dict[str, str], await pipe.hgetall(k.member_credentials))
            fields = [f for f, v in creds.items() if f.startswith("k:") and json.loads(v)["m"] == member_id]
            fields += ["h:" + json.loads(creds[f])["h"] for f in list(fields)]
            begin_writes(pipe)
            pipe.hdel(k.members, member_id)
            pipe.hdel(k.member_names, old.name)
            if fields:
                pipe.hdel(k.member_credentials, *fields)
            self._audit.append(
                pipe, k.audit, actor, "RemoveMember", member_id, before={"name": old.name, "role": str(old.role)}
            )
            return old

        member = await transaction(self._redis, [k.members, k.member_names, k.member_credentials], change)
        self._credentials.forget_member(org_id, member_id)
        return member

    # -- member credentials ------------------------------------------------------

    async def create_credential(
        self, org_id: str, member_id: str, name: str, *, actor: Principal = INTERNAL
    ) -> tuple[CredentialInfo, str]:
        """Another credential for a member (to rotate: create, switch, revoke the old one)."""
        validate_name("credential name", name)
        ids.require_id("mem", "member_id", member_id)
        k = await self._control.require_organization(org_id)

        async def change(pipe: Pipeline) -> tuple[CredentialInfo, str]:
            await self._read(pipe, k, org_id, member_id)
            begin_writes(pipe)
            cred, token = self._issue(pipe, k, org_id, member_id, name)
            self._audit.append(
                pipe, k.audit, actor, "CreateCredential", cred.id, after={"member": member_id, "name": name}
            )
            return cred, token

        return await transaction(self._redis, [k.members], change)

    async def list_credentials(self, org_id: str) -> list[CredentialInfo]:
        k = await self._control.require_organization(org_id)
        with storage_errors():
            raw = cast(dict[str, str], await self._redis.hgetall(k.member_credentials))
        creds = (_credential(org_id, f[2:], v) for f, v in raw.items() if f.startswith("k:"))
        return sorted(creds, key=lambda c: (c.created_at_ms, c.id))

    async def revoke_credential(self, org_id: str, cred_id: str, *, actor: Principal = INTERNAL) -> CredentialInfo:
        ids.require_id("cred", "credential_id", cred_id)
        k = await self._control.require_organization(org_id)

        async def change(pipe: Pipeline) -> tuple[CredentialInfo, str]:
            raw = await pipe.hget(k.member_credentials, "k:" + cred_id)
            if raw is None:
                raise NotFound(f"credential {cred_id} does not exist in organization {org_id}")
            info, digest = _credential(org_id, cred_id, str(raw)), json.loads(raw)["h"]
            begin_writes(pipe)
            pipe.hdel(k.member_credentials, "k:" + cred_id, "h:" + digest)
            self._audit.append(
                pipe, k.audit, actor, "RevokeCredential", cred_id, before={"member": info.member_id, "name": info.name}
            )
            return info, str(digest)

        info, digest = await transaction(self._redis, [k.member_credentials], change)
        self._credentials.forget(digest)
        return info
