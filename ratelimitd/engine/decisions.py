"""The decision: one call of decide.lua, and its reply as typed values."""

from __future__ import annotations

import enum
import os
from typing import NamedTuple

from redis.asyncio import Redis

from ratelimitd.engine import keys
from ratelimitd.engine.limits import Dimension, Dimensions
from ratelimitd.engine.scripts import Scripts
from ratelimitd.storage.redis import storage_errors


class Outcome(enum.IntEnum):
    """Mirrors the first element of decide.lua's reply."""

    ALLOWED = 0
    PROJECT_LIMIT = 1
    ORGANIZATION_LIMIT = 2
    TOO_LARGE = 3
    INVALID_API_KEY = 4
    MODEL_NOT_AVAILABLE = 5
    PROJECT_NOT_FOUND = 6


class Scope(enum.IntEnum):
    ORGANIZATION = 1
    PROJECT = 2


class BucketState(NamedTuple):
    scope: Scope
    dimension: Dimension
    limit: int
    remaining: int
    reset_after_ms: int


class Decision(NamedTuple):
    outcome: Outcome
    organization_id: str
    project_id: str
    request_id: str
    retry_after_ms: int
    binding: BucketState | None
    buckets: tuple[BucketState, ...]
    replayed: bool

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOWED


class Caller(NamedTuple):
    """Who a decision is for: an API key (id and hash) or a trusted project reference."""

    organization_id: str
    key_id: str  # "" for a project reference
    key_hash: str
    project_id: str  # "" for an API key


def new_request_id() -> str:
    return "req_" + os.urandom(12).hex()


class Decider:
    """Makes decisions: one EVALSHA per call, whatever the number of buckets."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        dimensions: Dimensions,
        *,
        record_ttl_ms: int,
        manual_clock: bool = False,
    ) -> None:
        self._redis = redis
        self._script = scripts.decide
        self._dims = dimensions.all
        self._record_ttl = str(record_ttl_ms)
        self._clock_keys = [keys.MANUAL_CLOCK] if manual_clock else []
        # What does not change per call is laid out once.
        self._dim_args = [(d.name, str(d.window_ms), d.metric == "tokens") for d in self._dims]
        self._ndims = str(len(self._dims))

    async def check(self, caller: Caller, model: str, requests: int, tokens: int, request_id: str = "") -> Decision:
        remember = "1" if request_id else "0"
        request_id = request_id or new_request_id()
        org = keys.OrgKeys(caller.organization_id)
        if caller.key_id:
            kind, subject = "k", org.api_key(caller.key_id)
        else:
            kind, subject = "p", org.project(caller.project_id)
        args: list[str | int] = [
            kind, caller.key_hash, caller.project_id, model, request_id, remember, self._record_ttl, self._ndims,
        ]  # fmt: skip
        for name, window_ms, is_tokens in self._dim_args:
            args += (name, window_ms, tokens if is_tokens else requests)
        with storage_errors():
            reply = await self._script(
                keys=[org.org_limits, subject, org.request(request_id), *self._clock_keys],
                args=args,
                client=self._redis,
            )
        return self._parse(reply, caller.organization_id, request_id)

    def _parse(self, reply: list[int | str], org_id: str, request_id: str) -> Decision:
        buckets = tuple(
            BucketState(
                Scope(int(reply[i])),
                self._dims[int(reply[i + 1]) - 1],
                int(reply[i + 2]),
                int(reply[i + 3]),
                int(reply[i + 4]),
            )
            for i in range(5, len(reply), 5)
        )
        binding_index = int(reply[3])
        return Decision(
            outcome=Outcome(int(reply[0])),
            organization_id=org_id,
            project_id=str(reply[1]),
            request_id=request_id,
            retry_after_ms=int(reply[2]),
            binding=buckets[binding_index - 1] if binding_index else None,
            buckets=buckets,
            replayed=bool(int(reply[4])),
        )
