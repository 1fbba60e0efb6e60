"""Management credentials (bearer tokens), stored only as sha256.

The first start creates an operator credential and hands it back once to be
shown; or the operator passes one in settings and only its hash is stored.
Verification results are cached for a moment, because a trusted caller may
decide by project id on the hot path and must not pay a second round trip;
a revoked credential therefore stops working within ``cache_ttl_s``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from ratelimitd.engine import ids, keys
from ratelimitd.engine.errors import Unauthenticated
from ratelimitd.storage.redis import storage_errors

OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class Principal:
    credential_id: str
    kind: str
    name: str


class Credentials:
    def __init__(self, redis: Redis, cache_ttl_s: float = 2.0) -> None:
        self._redis = redis
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def bootstrap(self, token: str | None) -> str | None:
        """Makes sure an operator credential exists; returns a new token to show once, or None."""
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
    def _record(name: str) -> str:
        return json.dumps(
            {"id": ids.new_id("cred"), "kind": OPERATOR, "name": name, "created": int(time.time() * 1000)}
        )

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        digest = ids.sha256_hex(token.strip())
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            with storage_errors():
                raw = await self._redis.hget(keys.CREDENTIALS, digest)
            principal = None
            if raw is not None:
                rec = json.loads(raw)
                principal = Principal(rec["id"], rec["kind"], rec.get("name", ""))
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self._ttl, principal)
        if principal is None:
            raise Unauthenticated("the credential is unknown or revoked")
        return principal
