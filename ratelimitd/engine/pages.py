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
