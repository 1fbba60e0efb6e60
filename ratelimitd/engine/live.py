"""What a project may still use now (GetLimitState): its buckets and the organization's,
drained to now by limit_state.lua with lib.lua's own arithmetic. Reads only, and off the
decision path: the console's live view asks it every few seconds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from redis.asyncio import Redis

from ratelimitd.core import keys
from ratelimitd.core.errors import InvalidArgument
from ratelimitd.core.retention import Retention
from ratelimitd.engine.clock import Clock
from ratelimitd.engine.control import ControlPlane
from ratelimitd.engine.limits import WILDCARD, Dimensions, validate_model
from ratelimitd.engine.scripts import Scripts, configured
from ratelimitd.storage.redis import storage_errors

MAX_MODELS = 100


class LimitState(NamedTuple):
    model: str
    metric: str
    window: str
    organization_limit: int | None
    organization_remaining: float | None
    project_limit: int | None
    project_remaining: float | None

    @property
    def remaining(self) -> float:
        """What the project may still use: the smaller remainder (0 where no scope has a limit)."""
        left = [r for r in (self.organization_remaining, self.project_remaining) if r is not None]
        return min(left) if left else 0.0


def _remaining(limit: str, level: str) -> tuple[int | None, float | None]:
    if limit == "":
        return None, None
    return int(limit), max(0.0, int(limit) - float(level or 0))


class LiveState:
    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        dimensions: Dimensions,
        retention: Retention,
        control: ControlPlane,
        clock: Clock,
    ) -> None:
        self._script = redis.register_script(configured(scripts.limit_state, dimensions, retention).source)
        self._dims = dimensions
        self._control = control
        self._clock = clock

    async def _models(self, org_id: str, project_id: str, models: Sequence[str]) -> list[str]:
        if len(models) > MAX_MODELS:
            raise InvalidArgument(f"{len(models)} models asked for; at most {MAX_MODELS} at a time")
        for m in models:
            validate_model(m, wildcard=False)
        named = list(dict.fromkeys(models))
        if named:
            await self._control.require_project(org_id, project_id)
            return named
        specs = [
            *await self._control.organization_limits(org_id),
            *await self._control.project_limits(org_id, project_id),
        ]
        return sorted({s.model for s in specs if s.model != WILDCARD})

    async def read(self, org_id: str, project_id: str, models: Sequence[str] = ()) -> tuple[int, list[LimitState]]:
        """(the time read at in ms, what is left per model and dimension)."""
        chosen = await self._models(org_id, project_id, models)
        k = keys.OrgKeys(org_id)
        with storage_errors():
            reply = await self._script(keys=[k.state], args=[k.prefix, await self._clock(), project_id, *chosen])
        values = [str(v) for v in reply]
        now_ms = int(values[0]) // 1000
        states, at = [], 1
        for model in chosen:
            for d in self._dims.all:
                org_limit, org_left = _remaining(values[at], values[at + 1])
                proj_limit, proj_left = _remaining(values[at + 2], values[at + 3])
                states.append(LimitState(model, d.metric, d.window, org_limit, org_left, proj_limit, proj_left))
                at += 4
        return now_ms, states
