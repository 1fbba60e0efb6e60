"""Pagination shared by every list call: a page size and an opaque page token.

A token is the sort key of the last item returned, so the next page starts
right after it even if items were added or removed meanwhile; the order is
whatever stable order the caller sorts by.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import TypeVar

from ratelimitd.core.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = "v1:"

T = TypeVar("T")


def page_size(value: int) -> int:
    """0 means the default; negative or more than MAX_PAGE_SIZE is an error."""
    if value < 0:
        raise InvalidArgument(f"page_size is {value}; it must be 0 (meaning {DEFAULT_PAGE_SIZE}) or more")
    if value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size is {value}; at most {MAX_PAGE_SIZE} are allowed")
    return value or DEFAULT_PAGE_SIZE


def encode_token(key: str) -> str:
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + key).encode()).decode()


def decode_token(token: str) -> str:
    """The sort key inside a token this server issued; "" for no token."""
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    if not text.startswith(_TOKEN_PREFIX) or len(text) == len(_TOKEN_PREFIX):
        raise InvalidArgument("page_token is not one this server issued (pass next_page_token unchanged)")
    return text[len(_TOKEN_PREFIX) :]


def paginate(items: Sequence[tuple[str, T]], size: int, token: str) -> tuple[list[T], str]:
    """One page of ``items`` (sorted by their string key); returns it and the next token ("" at the end)."""
    after = decode_token(token)
    rest = [(k, v) for k, v in items if k > after] if after else list(items)
    page = rest[:size]
    next_token = encode_token(page[-1][0]) if len(rest) > size else ""
    return [v for _, v in page], next_token


def newest_first(items: Sequence[tuple[int, T]], size: int, token: str) -> tuple[list[T], str]:
    """One page of ``items`` ordered newest first by their time (ties keep their order).

    Times repeat (one millisecond holds many log entries), so the token is the
    last time returned and how many items of that time were: the next page
    starts after them even when older items were dropped meanwhile.
    """
    last_time, seen_at_last = _decode_position(token)
    rest: list[tuple[int, T]] = []
    skipped = 0
    for when, item in items:
        if token and when > last_time:
            continue
        if token and when == last_time and skipped < seen_at_last:
            skipped += 1
            continue
        rest.append((when, item))
        if len(rest) > size:
            break
    page = rest[:size]
    if len(rest) <= size:
        return [v for _, v in page], ""
    end = page[-1][0]
    at_end = sum(1 for when, _ in page if when == end) + (seen_at_last if token and end == last_time else 0)
    return [v for _, v in page], encode_token(f"{end}:{at_end}")


def _decode_position(token: str) -> tuple[int, int]:
    if not token:
        return 0, 0
    when, _, count = decode_token(token).partition(":")
    if not (when.isdigit() and count.isdigit()):
        raise InvalidArgument("page_token is not one this server issued (pass next_page_token unchanged)")
    return int(when), int(count)
