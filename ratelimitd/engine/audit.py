"""The audit trail: who changed what, when, and the values before and after.

Each organization has one Redis stream (keys.py ``audit``); platform-level
changes (operator credentials) go to ``keys.PLATFORM_AUDIT``. An event is
appended in the same transaction or script as the change it describes, so
there is never a change without its event nor an event without its change. A
call that changes nothing records nothing.

Streams are capped with ``XADD ... MAXLEN ~ N`` (``audit_max_events``): Redis
trims whole internal nodes, so a stream keeps at least the newest N events
and at most a few dozen more; older ones are gone. Export the trail elsewhere
if it must be kept longer.

An event's id is its stream id, ``<ms>-<seq>`` from the Redis server's clock,
so reading a time range is reading an id range, and ids order events exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from ratelimitd.core.errors import InvalidArgument
from ratelimitd.engine import pages
from ratelimitd.engine.authz import Principal
from ratelimitd.storage.redis import storage_errors

_STREAM_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")
# Events are read newest first in batches; a project filter may skip many.
_BATCH = 500
MAX_TIME_MS = 2**53


def actor_json(actor: Principal) -> str:
    return json.dumps(
        {"cred": actor.credential_id, "kind": actor.kind, "name": actor.name, "member": actor.member_id,
         "role": str(actor.role or "")},
        separators=(",", ":"),
    )  # fmt: skip


def value_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: str
    time_ms: int
    operation: str
    actor: dict[str, str]
    project_id: str
    target: str
    before: str  # JSON; "null" when the target did not exist before
    after: str  # JSON; "null" when the target no longer exists


class Audit:
    def __init__(self, redis: Redis, max_events: int) -> None:
        self._redis = redis
        self.max_events = max_events

    def append(
        self,
        pipe: Pipeline,
        stream: str,
        actor: Principal,
        operation: str,
        target: str,
        *,
        project_id: str = "",
        before: Any = None,
        after: Any = None,
    ) -> None:
        """Queues the event in ``pipe`` (after MULTI), unless before equals after."""
        if before == after:
            return
        pipe.xadd(
            stream,
            {"op": operation, "actor": actor_json(actor), "project": project_id, "target": target,
             "before": value_json(before), "after": value_json(after)},
            maxlen=self.max_events,
            approximate=True,
        )  # fmt: skip

    async def read(
        self, stream: str, *, project_id: str, since_ms: int, until_ms: int, page_size: int, page_token: str
    ) -> tuple[list[AuditEvent], str]:
        """Events newest first, optionally only one project's, in [since_ms, until_ms] (0 = open)."""
        size = pages.page_size(page_size)
        # Named as the API names the bounds (ListAuditEventsRequest.start_time, end_time).
        for what, value in (("start_time", since_ms), ("end_time", until_ms)):
            if not 0 <= value <= MAX_TIME_MS:
                raise InvalidArgument(f"{what} is {value} ms; it must be between 0 and {MAX_TIME_MS} ms since 1970")
        if until_ms and since_ms > until_ms:
            raise InvalidArgument(f"start_time ({since_ms} ms) is after end_time ({until_ms} ms)")
        after = pages.decode_token(page_token)
        if after and not _STREAM_ID_RE.match(after):
            raise InvalidArgument("page_token is not one this server issued (pass next_page_token unchanged)")
        upper = f"({after}" if after else (str(until_ms) if until_ms else "+")
        lower = str(since_ms) if since_ms else "-"
        events: list[AuditEvent] = []
        more = False
        with storage_errors():
            while True:
                batch = cast(
                    list[tuple[str, dict[str, str]]],
                    await self._redis.xrevrange(stream, max=upper, min=lower, count=_BATCH),
                )
                for event_id, fields in batch:
                    if project_id and fields.get("project") != project_id:
                        continue
                    if len(events) == size:
                        more = True
                        break
                    events.append(_event(event_id, fields))
                if more or len(batch) < _BATCH:
                    break
                upper = f"({batch[-1][0]}"
        return events, pages.encode_token(events[-1].id) if more else ""


def _event(event_id: str, fields: dict[str, str]) -> AuditEvent:
    return AuditEvent(
        id=event_id,
        time_ms=int(event_id.split("-", 1)[0]),
        operation=fields.get("op", ""),
        actor=json.loads(fields.get("actor", "{}")),
        project_id=fields.get("project", ""),
        target=fields.get("target", ""),
        before=fields.get("before", "null"),
        after=fields.get("after", "null"),
    )
