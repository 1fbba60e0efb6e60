"""The management API's well-known types at the boundary: times, money, field masks, pages.

The engine keeps its own units (Unix milliseconds, USD floats over micro-dollar
counters); the replies carry google.protobuf.Timestamp/Duration and integer
micro-dollars (docs/api.md "Units"). Converting here keeps the engine free of
protobuf.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from ratelimitd.core.errors import InvalidArgument
from ratelimitd.engine import pages

T = TypeVar("T")
MICROS_PER_USD = 1_000_000


def timestamp(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def timestamp_or_none(ms: int) -> Timestamp | None:
    """A Timestamp, or None (the field stays absent) for 0, the engine's "never"."""
    return timestamp(ms) if ms else None


def milliseconds(field: str, stamp: Timestamp, has: bool) -> int:
    """A request's Timestamp as Unix milliseconds; 0 when absent (an open bound)."""
    if not has:
        return 0
    if not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidArgument(f"{field}.nanos is {stamp.nanos}; it must be between 0 and 999999999")
    if stamp.seconds < 0:
        raise InvalidArgument(f"{field} is {stamp.seconds} s, before 1970-01-01T00:00:00Z")
    return stamp.ToMilliseconds()


def duration(ms: int) -> Duration:
    span = Duration()
    span.FromMilliseconds(ms)
    return span


def micros(usd: float) -> int:
    """USD (the engine's float over micro-dollar counters) as whole micro-dollars."""
    return round(usd * MICROS_PER_USD)


def update_paths(mask: FieldMask, has_mask: bool, updatable: Sequence[str], populated: Collection[str]) -> set[str]:
    """The fields an AIP-134 update changes.

    ``updatable``: the paths a caller may name; "*" names all of them. Without a
    mask, the ``populated`` ones (AIP-134: an absent mask means every field set).
    Any other path is INVALID_ARGUMENT naming it; so is an update of nothing.
    """
    if not has_mask:
        paths = {p for p in updatable if p in populated}
    elif list(mask.paths) == ["*"]:
        paths = set(updatable)
    else:
        for path in mask.paths:
            if path not in updatable:
                allowed = ", ".join(repr(p) for p in (*updatable, "*"))
                raise InvalidArgument(f"update_mask path {path[:80]!r} cannot be updated; use {allowed}")
        paths = set(mask.paths)
    if not paths:
        named = " or ".join(updatable)
        raise InvalidArgument(f"nothing to update: set {named}, or name it in update_mask")
    return paths


def page(items: Sequence[T], sort_key: Callable[[T], str], size: int, token: str) -> tuple[list[T], str]:
    """One page of a list the engine returns whole, in ``sort_key`` order (unique, ascending)."""
    page_size = pages.page_size(size)
    return pages.paginate([(sort_key(item), item) for item in items], page_size, token)


def by_creation(created_at_ms: int, unique: str) -> str:
    """A sort key that orders as (created_at_ms, unique) does."""
    return f"{created_at_ms:016d}\x00{unique}"
