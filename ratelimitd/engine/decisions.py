"""The decision: one call of decide.lua, and its reply as typed values."""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from typing import NamedTuple

from ratelimitd.core import keys
from ratelimitd.core.errors import InvalidArgument
from ratelimitd.core.retention import Retention
from ratelimitd.core.scripts import ScriptRunner
from ratelimitd.engine.clock import Clock, server_time
from ratelimitd.engine.limits import Dimension, Dimensions
from ratelimitd.engine.scripts import Scripts, configured

# Items one decision may weigh: each adds its buckets to one script's stack and reply.
MAX_ITEMS_PER_DECISION = 64


class Outcome(enum.IntEnum):
    """Mirrors the first element of decide.lua's reply."""

    ALLOWED = 0
    PROJECT_LIMIT = 1
    ORGANIZATION_LIMIT = 2
    TOO_LARGE = 3
    INVALID_API_KEY = 4
    MODEL_NOT_AVAILABLE = 5
    PROJECT_NOT_FOUND = 6
    MODEL_BLOCKED = 7
    SPEND_LIMIT = 8
    REQUEST_ID_REUSED = 9


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
    # The buckets of each item, in item order (a bucket two items share is in both).
    item_buckets: tuple[tuple[BucketState, ...], ...] = ()
    # MODEL_NOT_AVAILABLE and MODEL_BLOCKED: the 1-based index of the item whose model it is;
    # SPEND_LIMIT: the Scope whose monthly spend limit was reached.
    detail: int = 0

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOWED


class Item(NamedTuple):
    """One thing a request asks for: a model, and what it costs."""

    model: str
    requests: int
    tokens: int


class Caller(NamedTuple):
    """Who a decision is for: an API key (id and hash) or a trusted project reference."""

    organization_id: str
    key_id: str  # "" for a project reference
    key_hash: str
    project_id: str  # "" for an API key


def new_request_id() -> str:
    return "req_" + os.urandom(12).hex()


class Decider:
    """Makes decisions: one EVALSHA per call, whatever the number of buckets, on the
    auto-pipelining connection (concurrent decisions share round trips)."""

    def __init__(
        self,
        connection: ScriptRunner,
        scripts: Scripts,
        dimensions: Dimensions,
        retention: Retention,
        *,
        clock: Clock = server_time,
    ) -> None:
        self._connection = connection
        self._clock = clock
        # settings are baked into the script's text, so a call passes only what it asks
        self._script = configured(scripts.decide, dimensions, retention)
        self._dims = dimensions.all

    async def check(self, caller: Caller, model: str, requests: int, tokens: int, request_id: str = "") -> Decision:
        return await self.check_items(caller, (Item(model, requests, tokens),), request_id)

    async def check_items(
        self, caller: Caller, items: Sequence[Item], request_id: str = "", *, replay: bool = True
    ) -> Decision:
        """Decides all items together: every bucket of every item has room, or nothing is charged.

        A caller-chosen ``request_id`` is remembered: a repeat by the same caller asking for the
        same items gets the first answer again (``replay``), and an admitted request's reservation
        waits under it for Usage.report. ``replay=False`` keeps the reservation but decides every
        call anew, for callers whose request ids an end user may choose and so must not buy a free
        pass by repeating one. Either way the id belongs to its first caller: anyone else using it
        is refused (REQUEST_ID_REUSED).
        """
        if not items:
            raise InvalidArgument("a decision needs at least one item")
        if len(items) > MAX_ITEMS_PER_DECISION:
            raise InvalidArgument(f"{len(items)} items; at most {MAX_ITEMS_PER_DECISION} are allowed in one decision")
        remember = ("1" if replay else "2") if request_id else "0"
        request_id = request_id or new_request_id()
        org = keys.OrgKeys(caller.organization_id)
        if caller.key_id:
            kind, subject = "k", org.api_key(caller.key_id)
        else:
            kind, subject = "p", org.project(caller.project_id)
        who = caller.key_id if caller.key_id else caller.project_id
        args: list[str | int] = [kind, caller.key_hash, who, request_id, remember, len(items)]
        for item in items:
            args += (item.model, item.requests, item.tokens)
        args.append(await self._clock())
        reply = await self._connection.evalsha(self._script, [org.state, subject, org.request(request_id)], args)
        return self._parse(reply, caller.organization_id, request_id, len(items))

    def _parse(self, reply: list[int | str], org_id: str, request_id: str, nitems: int) -> Decision:
        nbuckets = int(reply[6])  # see the reply layout in decide.lua
        end = 7 + 5 * nbuckets
        buckets = tuple(
            BucketState(
                Scope(int(reply[i])), self._dims[int(reply[i + 1]) - 1], int(reply[i + 2]), int(reply[i + 3]),
                int(reply[i + 4]),
            )
            for i in range(7, end, 5)
        )  # fmt: skip
        item_buckets = []
        pos = end
        for _ in range(nitems if pos < len(reply) else 0):
            count = int(reply[pos])
            item_buckets.append(tuple(buckets[int(i) - 1] for i in reply[pos + 1 : pos + 1 + count]))
            pos += 1 + count
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
            item_buckets=tuple(item_buckets),
            detail=int(reply[5]),
        )
