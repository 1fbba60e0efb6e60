"""Usage queries and request logs: what decide.lua and report.lua counted, read back.

Usage hashes per time bucket (field ``<usage id>|<counter>``, the ids resolved through
the ``ui`` hash), finished minutes rolled up into hours and days (rollup.lua), and each
project's capped request log. engine/usage.py's ``Usage`` adds reporting, prices and spend.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from redis.asyncio import Redis

from ratelimitd.core import keys
from ratelimitd.core.errors import InvalidArgument
from ratelimitd.engine import pages
from ratelimitd.engine.clock import Clock
from ratelimitd.engine.control import ControlPlane
from ratelimitd.engine.outcomes import Outcome
from ratelimitd.storage.redis import storage_errors

MAX_BUCKETS_PER_QUERY = 10_000
GRANULARITIES = {"minute": ("m", 60), "hour": ("h", 3600), "day": ("d", 86400)}
GROUPS = ("project", "model", "key")


@dataclass
class UsageTotals:
    requests: int = 0
    refusals: dict[Outcome, int] = field(default_factory=dict)
    reported: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    spend_usd: float = 0.0

    def add(self, counter: str, value: str) -> None:
        if counter == "req":
            self.requests += int(value)
        elif counter.startswith("ref:"):
            outcome = Outcome(int(counter[4:]))
            self.refusals[outcome] = self.refusals.get(outcome, 0) + int(value)
        elif counter == "rep":
            self.reported += int(value)
        elif counter == "in":
            self.input_tokens += int(value)
        elif counter == "out":
            self.output_tokens += int(value)
        elif counter == "cached":
            self.cached_tokens += int(value)
        elif counter == "spend":
            self.spend_usd += float(value) / 1e6

    def merge(self, other: UsageTotals) -> None:
        self.requests += other.requests
        for k, v in other.refusals.items():
            self.refusals[k] = self.refusals.get(k, 0) + v
        self.reported += other.reported
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_tokens += other.cached_tokens
        self.spend_usd += other.spend_usd


class UsageRow(NamedTuple):
    bucket_start_ms: int
    project_id: str
    model: str
    key_id: str
    totals: UsageTotals


class LogEntry(NamedTuple):
    request_id: str
    time_ms: int
    model: str
    key_id: str
    allowed: bool
    reason: Outcome | None
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    requested_tokens: int
    status_code: int
    latency_ms: int


class UsageQueries:
    def __init__(self, redis: Redis, control: ControlPlane, minute_retention_s: int, clock: Clock) -> None:
        self._redis = redis
        self._control = control
        self._minute_retention_s = minute_retention_s
        self._clock = clock

    # -- queries -------------------------------------------------------------

    async def query(
        self,
        org_id: str,
        start_ms: int,
        end_ms: int,
        granularity: str,
        group_by: Iterable[str] = (),
        project_id: str = "",
    ) -> tuple[list[UsageRow], UsageTotals]:
        if granularity not in GRANULARITIES:
            raise InvalidArgument(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
        groups = set(group_by)
        if unknown := groups - set(GROUPS):
            raise InvalidArgument(f"group_by {sorted(unknown)[0]!r} is not one of {', '.join(GROUPS)}")
        if start_ms < 0 or end_ms <= start_ms:
            raise InvalidArgument(f"the range [{start_ms}, {end_ms}) is empty or negative")
        res, width = GRANULARITIES[granularity]
        first = start_ms // 1000 // width * width
        starts = range(first, math.ceil(end_ms / 1000), width)
        if len(starts) > MAX_BUCKETS_PER_QUERY:
            raise InvalidArgument(
                f"the range spans {len(starts)} {granularity} buckets, at most {MAX_BUCKETS_PER_QUERY} are allowed"
            )
        k = await self._control.require_organization(org_id)
        with storage_errors():
            buckets = await self._read_buckets(k, res, width, starts)
            names = await self._usage_names(k, buckets)
        rows: dict[tuple[int, str, str, str], UsageTotals] = defaultdict(UsageTotals)
        total = UsageTotals()
        for s, raw in buckets:
            for name, packed in raw.items():
                fields = _counters(name, packed, names)
                if fields is None:
                    continue
                (project, model, key_id), counters = fields
                if project_id and project != project_id:
                    continue
                row_key = (
                    s * 1000,
                    project if "project" in groups else "",
                    model if "model" in groups else "",
                    key_id if "key" in groups else "",
                )
                for counter, value in counters:
                    rows[row_key].add(counter, value)
                    total.add(counter, value)
        return [UsageRow(*row_key, totals) for row_key, totals in sorted(rows.items())], total

    async def _read_buckets(
        self, k: keys.OrgKeys, res: str, width: int, starts: range
    ) -> list[tuple[int, dict[str, str]]]:
        """The counters of each bucket start, with the minutes not rolled up yet added to hours and days.

        One transaction reads the rollup marker, the buckets and the minutes from the marker on, so
        a rollup (rollup.lua) is seen whole or not at all; if the marker moved since it was first
        read, the minutes read may be the wrong ones, and the read is made again."""
        if res == "m":
            async with self._redis.pipeline(transaction=False) as pipe:
                for s in starts:
                    pipe.hgetall(k.usage("m", s))
                return list(zip(starts, cast(list[dict[str, str]], await pipe.execute()), strict=True))
        while True:
            marker = cast(str | None, await self._redis.get(k.usage_rollup_marker))
            minutes = await self._unrolled_minutes(marker, starts[0], starts[-1] + width)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(k.usage_rollup_marker)
                for s in starts:
                    pipe.hgetall(k.usage(res, s))
                for m in minutes:
                    pipe.hgetall(k.usage("m", m))
                replies = await pipe.execute()
            if replies[0] != marker:
                continue
            raws = cast(list[dict[str, str]], replies[1:])
            buckets = list(zip(starts, raws[: len(starts)], strict=True))
            partial_minute, rolled_ids = _marker(marker)
            for m, raw in zip(minutes, raws[len(starts) :], strict=True):
                if m == partial_minute and rolled_ids:
                    # the rollup is inside this minute: its ids up to rolled_ids are in the hours
                    raw = {f: v for f, v in raw.items() if _unrolled(f, rolled_ids)}
                if raw:
                    buckets.append((m - m % width, raw))
            return buckets

    async def _unrolled_minutes(self, marker: str | None, start_s: int, end_s: int) -> range:
        """Minute starts in [start_s, end_s) the rollup has not reached: from the marker (or the
        oldest minute kept, when there is none yet) to the current minute."""
        given = await self._clock()
        now_s = int(given) // 1_000_000 if given else int((await self._redis.time())[0])
        current = now_s - now_s % 60
        first = _marker(marker)[0] or current - (self._minute_retention_s + 59) // 60 * 60 - 60
        first = max(first, start_s - start_s % 60)
        return range(first, min(current, end_s - 1) + 1, 60)

    async def _usage_names(
        self, k: keys.OrgKeys, buckets: list[tuple[int, dict[str, str]]]
    ) -> dict[str, tuple[str, str, str]]:
        """The (project, model, key) of every usage id in the buckets."""
        ids = sorted({name.split("|", 1)[0] for _, raw in buckets for name in raw if _COMPACT_FIELD.match(name)})
        if not ids:
            return {}
        triples = cast(list[str | None], await self._redis.hmget(k.usage_ids, [f"#{i}" for i in ids]))
        return {
            i: cast(tuple[str, str, str], tuple(t.split("|", 2)))
            for i, t in zip(ids, triples, strict=True)
            if t is not None
        }

    async def logs(
        self,
        org_id: str,
        project_id: str,
        *,
        model: str = "",
        key_id: str = "",
        allowed: bool | None = None,
        start_ms: int = 0,
        end_ms: int = 0,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[LogEntry], str]:
        """One page of the project's request log, newest first, and the next page's token ("" at the end)."""
        size = pages.page_size(page_size)
        pages.newest_first([], size, page_token)  # a malformed token is refused before anything is read
        k = await self._control.require_project(org_id, project_id, or_deleted=True)
        with storage_errors():
            raw = cast(list[str], await self._redis.lrange(k.request_log(project_id), 0, -1))
        end_ms = end_ms or int(time.time() * 1000) + 1
        out = []
        for line in raw:  # newest first already
            e = _log_entry(json.loads(line))
            if model and e.model != model:
                continue
            if key_id and e.key_id != key_id:
                continue
            if allowed is not None and e.allowed != allowed:
                continue
            if not start_ms <= e.time_ms < end_ms:
                continue
            out.append((e.time_ms, e))
        return pages.newest_first(out, size, page_token)


# Usage fields as lib.lua writes them: "<id>|r", "<id>|x<outcome>", "<id>|u" in minutes,
# "<id>" in hours and days (the values are described there).

_COMPACT_FIELD = re.compile(r"^(\d+)(?:\|([rxu])(\d*))?$")
_REPORTED = ("rep", "in", "out", "cached", "spend")


def _counters(
    name: str, value: str, names: dict[str, tuple[str, str, str]]
) -> tuple[tuple[str, str, str], list[tuple[str, str]]] | None:
    """(project, model, key) and the counters (name, value) one usage field holds; None for an
    unknown id. Fields "<project>|<model>|<key>|<counter>" are what versions before the rollup wrote."""
    compact = _COMPACT_FIELD.match(name)
    if compact is None:
        project, model, key_id, counter = name.split("|", 3)
        return (project, model, key_id), [(counter, value)]
    who = names.get(compact[1])
    if who is None:
        return None
    kind, outcome = compact[2], compact[3]
    if kind == "r":
        return who, [("req", value)]
    if kind == "x":
        return who, [(f"ref:{outcome}", value)]
    parts = value.split(",")
    if kind == "u":
        return who, list(zip(_REPORTED, parts, strict=False))
    counters = list(zip(("req", *_REPORTED), parts[:6], strict=False))
    for refusal in parts[6:]:
        counter, _, count = refusal.partition("=")
        counters.append((f"ref:{counter[1:]}", count))
    return who, counters


def _marker(marker: str | None) -> tuple[int, int]:
    """The rollup marker (rollup.lua): the first minute not wholly rolled up, and the last usage
    id of it that is; (0, 0) for none."""
    if not marker:
        return 0, 0
    minute, _, rolled_ids = marker.partition(":")
    return int(minute), int(rolled_ids or 0)


def _unrolled(field: str, rolled_ids: int) -> bool:
    compact = _COMPACT_FIELD.match(field)
    return compact is None or int(compact[1]) > rolled_ids


def _log_entry(d: dict[str, Any]) -> LogEntry:
    return LogEntry(
        request_id=d.get("id", ""),
        time_ms=int(d.get("t", 0)),
        model=d.get("m", ""),
        key_id=d.get("k", "-"),
        allowed=bool(d.get("ok")),
        reason=None if d.get("ok") else Outcome(int(d.get("r", 0))),
        input_tokens=int(d.get("in", 0)),
        output_tokens=int(d.get("out", 0)),
        cached_tokens=int(d.get("cached", 0)),
        requested_tokens=int(d.get("tok", 0)),
        status_code=int(d.get("s", 0)),
        latency_ms=int(d.get("lat", 0)),
    )
