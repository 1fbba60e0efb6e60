"""The decision: one call of decide.lua per request (its reply read by engine/replies.py into
engine/outcomes.py's typed values)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

from ratelimitd.core import keys
from ratelimitd.core.errors import InvalidArgument
from ratelimitd.core.retention import Retention
from ratelimitd.core.scripts import ScriptRunner
from ratelimitd.engine.clock import Clock, server_time
from ratelimitd.engine.limits import Dimensions
from ratelimitd.engine.outcomes import Decision
from ratelimitd.engine.replies import decode_decision
from ratelimitd.engine.scripts import Scripts, configured

# Items one decision may weigh: each adds its buckets to one script's stack and reply.
MAX_ITEMS_PER_DECISION = 64


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
    """Makes decisions: one script call (FCALL) per decision, whatever the number of buckets, on the
    auto-pipelining connection (concurrent decisions share round trips)."""

    def __init__(
        self,
        connection: ScriptRunner,
        scripts: Scripts,
        dimensions: Dimensions,
        retention: Retention,
        *,
        clock: Clock = server_time,
        shadow_all: bool = False,
    ) -> None:
        self._connection = connection
        self._clock = clock
        # settings are baked into the script's text, so a call passes only what it asks
        self._script = configured(scripts.decide, dimensions, retention, shadow_all=shadow_all)
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
        reply = await self._connection.run_script(self._script, [org.state, subject, org.request(request_id)], args)
        return decode_decision(reply, self._dims, caller.organization_id, request_id, len(items))
