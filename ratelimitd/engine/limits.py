"""What a limit is: a model, a metric, a window and a value.

The dimensions (metric x window pairs) come from settings, so adding a window
such as ``hour=3600`` is configuration. A metric names what a request costs:
``requests`` costs the request count, ``tokens`` the token estimate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ratelimitd.core.errors import InvalidArgument

METRICS = ("requests", "tokens")
WILDCARD = "*"
# Lua's cjson keeps 14 significant digits; stay well inside exact integers.
MAX_LIMIT = 10**12
MAX_MODEL_LENGTH = 128
# Limits one Set*Limits call may set and clear together: the whole batch is checked and written
# in one atomic step (for a project, one script whose arguments Lua unpacks onto its stack).
MAX_LIMITS_PER_CALL = 1000
# Limits one organization, or one project, may hold in all: every change reads and audits them whole.
MAX_LIMITS_PER_SCOPE = 10_000
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


@dataclass(frozen=True, slots=True)
class Dimension:
    metric: str
    window: str
    window_ms: int

    @property
    def name(self) -> str:
        return f"{self.metric}|{self.window}"


class Dimensions:
    """The configured metric x window pairs, in a fixed order."""

    def __init__(self, windows: Mapping[str, int]) -> None:
        if not windows:
            raise ValueError("at least one window is required")
        self.windows = dict(windows)
        self.all: tuple[Dimension, ...] = tuple(
            Dimension(metric, window, seconds * 1000) for metric in METRICS for window, seconds in windows.items()
        )
        self._by_key = {(d.metric, d.window): d for d in self.all}

    def get(self, metric: str, window: str) -> Dimension:
        if metric not in METRICS:
            raise InvalidArgument(f"metric {metric!r} is not one of {', '.join(METRICS)}")
        dim = self._by_key.get((metric, window))
        if dim is None:
            raise InvalidArgument(f"window {window!r} is not one of {', '.join(self.windows)}")
        return dim


def validate_model(model: str, *, wildcard: bool) -> str:
    if not model:
        raise InvalidArgument("model is empty")
    if len(model) > MAX_MODEL_LENGTH:
        raise InvalidArgument(f"model is {len(model)} characters long, at most {MAX_MODEL_LENGTH} are allowed")
    if model == WILDCARD:
        if wildcard:
            return model
        raise InvalidArgument("model '*' names the default limit, not a model")
    if not _MODEL_RE.match(model):
        raise InvalidArgument(
            f"model {model!r} has characters other than letters, digits and . _ : / @ + - (or does not start with one)"
        )
    return model


def validate_limit_value(value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"limit {value} is negative")
    if value > MAX_LIMIT:
        raise InvalidArgument(f"limit {value} is above the maximum {MAX_LIMIT}")
    return value


@dataclass(frozen=True, slots=True)
class LimitSpec:
    model: str
    dimension: Dimension
    value: int

    @property
    def field(self) -> str:
        return f"{self.model}|{self.dimension.name}"


def parse_limit_field(field: str, dims: Dimensions) -> tuple[str, Dimension] | None:
    model, _, rest = field.partition("|")
    metric, _, window = rest.partition("|")
    try:
        return model, dims.get(metric, window)
    except InvalidArgument:
        return None  # a window no longer configured: ignored by decisions too


def unique_fields(specs: Iterable[tuple[str, Dimension]]) -> list[str]:
    """Fields of (model, dimension) pairs; a pair named twice is an error."""
    fields: list[str] = []
    seen: set[str] = set()
    for model, dim in specs:
        field = f"{model}|{dim.name}"
        if field in seen:
            raise InvalidArgument(f"limit {model} {dim.metric}/{dim.window} is named twice")
        seen.add(field)
        fields.append(field)
    return fields


def check_batch_size(to_set: int, to_clear: int) -> None:
    """One Set*Limits call changes at most MAX_LIMITS_PER_CALL limits, set and cleared together."""
    if to_set + to_clear > MAX_LIMITS_PER_CALL:
        raise InvalidArgument(
            f"{to_set} limits to set and {to_clear} to clear; at most {MAX_LIMITS_PER_CALL} are allowed in one call"
        )


def check_scope_size(before: int, after: int, scope: str) -> None:
    """A scope holds at most MAX_LIMITS_PER_SCOPE limits; one already past it may only shrink."""
    if after > MAX_LIMITS_PER_SCOPE and after > before:
        raise InvalidArgument(
            f"{scope} would hold {after} limits; at most {MAX_LIMITS_PER_SCOPE} are allowed (clear some first)"
        )
