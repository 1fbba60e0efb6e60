"""Management credentials (bearer tokens), stored only as sha256.

Two kinds, told apart by their shape:

* operator credentials (any token; those created here start with ``rlt_``)
  live in ``keys.CREDENTIALS``, outside every organization. The first start
  creates one and hands it back once to be shown; or the operator passes one in
  settings and only its hash is stored.
* member credentials (``rlm_<member><org><secret>``, ids.py) live in their
  organization's slot (members.py writes them), so checking one is one
  transaction on one slot, like an API key.

Verification results are cached for ``cache_ttl_s`` (2 s), because a trusted
caller may decide by project id on the hot path and must not pay a second
round trip. Revoking a credential, removing a member or changing a role drops
the affected entries from this process's cache at once; any other ratelimitd
process keeps its cached answer for at most ``cache_ttl_s`` more, so a revoked
credential or a lowered role is honoured everywhere within 2 seconds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from ratelimitd.core import keys
from ratelimitd.core.errors import FailedPrecondition, NotFound, Unauthenticated
from ratelimitd.core.retention import DEFAULT_MAX_EVENTS
from ratelimitd.engine import ids
from ratelimitd.engine.audit import Audit
from ratelimitd.engine.authz import INTERNAL, MEMBER, OPERATOR, Principal, Role
from ratelimitd.engine.organizations import validate_name
from ratelimitd.engine.sessions import Sessions, is_session_token
from ratelimitd.storage.redis import begin_writes, storage_errors, transaction

_CACHE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """A credential's metadata; the token itself is never stored."""

    id: str
    kind: str
    name: str
    created_at_ms: int
    organization_id: str = ""
    member_id: str = ""


def _operator_info(raw: str) -> CredentialInfo:
    rec = json.loads(raw)
    return CredentialInfo(rec["id"], OPERATOR, rec.get("name", ""), int(rec.get("created", 0)))


class Credentials:
    def __init__(
        self, redis: Redis, audit: Audit | None = None, cache_ttl_s: float = 2.0, sessions: Sessions | None = None
    ) -> None:
        self._redis = redis
        self.sessions = sessions
        self._audit = audit or Audit(redis, DEFAULT_MAX_EVENTS)
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def bootstrap(self, token: str | None) -> str | None:
        """Makes sure an operator credential exists; returns a new token to show once, or None."""
        if token and ids.parse_member_token(token):
            raise ValueError("operator_token must not have the shape of a member credential (rlm_...)")
        with storage_errors():
            if token:
                await self._redis.hsetnx(keys.CREDENTIALS, ids.sha256_hex(token), self._record("from settings"))
                return None
            token = ids.new_token()
            # Only when there is none yet: two servers starting together create one.
            created = await self._redis.eval(
                "if redis.call('HLEN', KEYS[1]) == 0 then return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end"
                " return 0",
                1,
                keys.CREDENTIALS,
                ids.sha256_hex(token),
                self._record("bootstrap"),
            )
        return token if created else None

    @staticmethod
    def _record(name: str, cred_id: str = "", created_ms: int = 0) -> str:
        return json.dumps(
            {"id": cred_id or ids.new_id("cred"), "kind": OPERATOR, "name": name,
             "created": created_ms or int(time.time() * 1000)}
        )  # fmt: skip

    # -- authentication --------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        if is_session_token(token):
            return await self._session(token)
        digest = ids.sha256_hex(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            member = ids.parse_member_token(token)
            with storage_errors():
                principal = await (self._member(member) if member else self._operator(digest))
            if len(self._cache) > _CACHE_LIMIT:
                self._cache.clear()
            self._cache[digest] = (now + self._ttl, principal)
        if principal is None:
            raise Unauthenticated("the credential is unknown or revoked")
        return principal

    async def _session(self, session_id: str) -> Principal:
        """A console session, resolved to its credential on every call (never cached), so a
        revoked credential or a removed member ends it at once (sessions.py)."""
        record = await self.sessions.find(session_id) if self.sessions is not None else None
        if record is None:
            raise Unauthenticated("the console session is unknown, expired or signed out; sign in again")
        with storage_errors():
            if record.kind == OPERATOR:
                principal = await self._operator(record.digest)
            else:
                member = ids.ParsedMemberToken(record.member_id, record.organization_id, record.digest)
                principal = await self._member(member)
        if principal is None:
            assert self.sessions is not None
            await self.sessions.delete(session_id)
            raise Unauthenticated("the credential this console session signed in with was revoked; sign in again")
        return principal

    async def _operator(self, digest: str) -> Principal | None:
        raw = await self._redis.hget(keys.CREDENTIALS, digest)
        if raw is None:
            return None
        info = _operator_info(str(raw))
        return Principal(info.id, OPERATOR, info.name)

    async def _member(self, token: ids.ParsedMemberToken) -> Principal | None:
        k = keys.OrgKeys(token.org_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(k.member_credentials, "h:" + token.hash)
            pipe.hget(k.members, token.member_id)
            cred, member = await pipe.execute()
        if cred is None or member is None:
            return None
        cred_id, _, member_id = str(cred).partition(" ")
        if member_id != token.member_id:
            return None
        rec = json.loads(member)
        return Principal(cred_id, MEMBER, rec["n"], token.org_id, member_id, Role(rec["r"]))

    def forget(self, digest: str) -> None:
        """Drops one credential from this process's cache (it was just revoked)."""
        self._cache.pop(digest, None)

    def forget_member(self, org_id: str, member_id: str) -> None:
        """Drops every cached credential of a member (removed, or its role changed)."""
        for digest, (_, p) in list(self._cache.items()):
            if p is not None and p.organization_id == org_id and p.member_id == member_id:
                del self._cache[digest]

    # -- operator credentials ----------------------------------------------------

    async def create_operator(self, name: str, *, actor: Principal = INTERNAL) -> tuple[CredentialInfo, str]:
        validate_name("credential name", name)
        token = ids.new_token()
        info = CredentialInfo(ids.new_id("cred"), OPERATOR, name, int(time.time() * 1000))
        with storage_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.CREDENTIALS, ids.sha256_hex(token), self._record(name, info.id, info.created_at_ms))
                after = {"kind": OPERATOR, "name": name}
                self._audit.append(pipe, keys.PLATFORM_AUDIT, actor, "CreateCredential", info.id, after=after)
                await pipe.execute()
        return info, token

    async def list_operators(self) -> list[CredentialInfo]:
        with storage_errors():
            raw = cast(dict[str, str], await self._redis.hgetall(keys.CREDENTIALS))
        return sorted((_operator_info(v) for v in raw.values()), key=lambda c: (c.created_at_ms, c.id))

    async def revoke_operator(self, cred_id: str, *, actor: Principal = INTERNAL) -> CredentialInfo:
        """Refuses to revoke the last one: nobody could manage the platform any more."""
        ids.require_id("cred", "credential_id", cred_id)

        async def change(pipe: Pipeline) -> tuple[str, CredentialInfo]:
            raw = cast(dict[str, str], await pipe.hgetall(keys.CREDENTIALS))
            found = [(digest, _operator_info(v)) for digest, v in raw.items() if json.loads(v)["id"] == cred_id]
            if not found:
                raise NotFound(f"operator credential {cred_id} does not exist")
            if len(raw) == 1:
                raise FailedPrecondition(
                    f"credential {cred_id} is the last operator credential; create another before revoking it"
                )
            digest, info = found[0]
            begin_writes(pipe)
            pipe.hdel(keys.CREDENTIALS, digest)
            before = {"kind": OPERATOR, "name": info.name}
            self._audit.append(pipe, keys.PLATFORM_AUDIT, actor, "RevokeCredential", cred_id, before=before)
            return digest, info

        digest, info = await transaction(self._redis, [keys.CREDENTIALS, keys.PLATFORM_AUDIT], change)
        self.forget(digest)
        return info
