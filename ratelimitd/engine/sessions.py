"""Console sessions: a browser's sign-in, kept server-side in storage.

A session id (``rls_`` + random) lives only in the browser's HttpOnly cookie. Storage
keeps, under the sha256 of that id (keys.console_session), what identifies the
credential that signed in: an operator credential's sha256, or a member credential's
organization, member and sha256 — never a credential or a session id. Every request
resolves the session to that credential afresh (credentials.py, not cached), so
revoking the credential or removing the member ends the session at its next request,
in every process. Storage lets the record expire after ``ttl_s``, and the record's own
expiry is checked against the clock, so the manual clock of tests can end a session.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from ratelimitd.core import keys
from ratelimitd.engine import ids
from ratelimitd.engine.authz import MEMBER, OPERATOR
from ratelimitd.engine.clock import Clock, server_time
from ratelimitd.storage.redis import storage_errors

SESSION_PREFIX = "rls_"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """What a session resolves to: the credential's kind and sha256 (and, for a member, where it lives)."""

    kind: str  # OPERATOR or MEMBER
    digest: str
    expires_ms: int
    organization_id: str = ""
    member_id: str = ""


def is_session_token(token: str) -> bool:
    return token.startswith(SESSION_PREFIX)


def csrf_token(session_id: str) -> str:
    """The token every state-changing console request must repeat in a header.

    Derived from the session id, which only the server and the HttpOnly cookie know,
    so a page of another site can neither read nor compute it."""
    return hashlib.sha256(("csrf|" + session_id).encode()).hexdigest()[:32]


class Sessions:
    def __init__(self, redis: Redis, ttl_s: int, clock: Clock = server_time) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._clock = clock

    @property
    def ttl_s(self) -> int:
        return self._ttl_s

    async def _now_ms(self) -> int:
        manual = await self._clock()
        return int(manual) // 1000 if manual else int(time.time() * 1000)

    async def create(self, credential: str) -> str:
        """A new session for ``credential``, which the caller has just authenticated."""
        member = ids.parse_member_token(credential)
        expires_ms = await self._now_ms() + self._ttl_s * 1000
        if member is not None:
            rec = {"k": MEMBER, "h": member.hash, "o": member.org_id, "m": member.member_id, "e": expires_ms}
        else:
            rec = {"k": OPERATOR, "h": ids.sha256_hex(credential), "e": expires_ms}
        session_id = SESSION_PREFIX + secrets.token_urlsafe(32)
        with storage_errors():
            await self._redis.set(keys.console_session(ids.sha256_hex(session_id)), json.dumps(rec), ex=self._ttl_s)
        return session_id

    async def find(self, session_id: str) -> SessionRecord | None:
        """The live session's record, or None (unknown, signed out or expired)."""
        with storage_errors():
            raw = await self._redis.get(keys.console_session(ids.sha256_hex(session_id)))
        if raw is None:
            return None
        rec = json.loads(raw)
        if int(rec["e"]) <= await self._now_ms():
            await self.delete(session_id)
            return None
        return SessionRecord(rec["k"], rec["h"], int(rec["e"]), rec.get("o", ""), rec.get("m", ""))

    async def delete(self, session_id: str) -> None:
        with storage_errors():
            await self._redis.delete(keys.console_session(ids.sha256_hex(session_id)))
