"""Reading a paged list (organizations, projects, audit events) as one list."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

# The server's largest page: fewer round trips for long lists.
MAX_PAGE = 1000


class Paged(Protocol):
    @property
    def next_page_token(self) -> str: ...


Page = TypeVar("Page", bound=Paged)
Item = TypeVar("Item")


async def collect(
    fetch: Callable[[str, int], Awaitable[Page]],
    items: Callable[[Page], Sequence[Item]],
    *,
    token: str = "",
    limit: int | None = None,
    page_size: int = MAX_PAGE,
    one_page: bool = False,
) -> tuple[list[Item], str]:
    """Calls ``fetch(page_token, page_size)`` until the list ends, ``limit`` items are read, or
    after one page if ``one_page``; returns the items and the token of the page after them."""
    got: list[Item] = []
    while True:
        size = page_size if limit is None else min(page_size, limit - len(got))
        page = await fetch(token, size)
        got.extend(items(page))
        token = page.next_page_token
        if one_page or not token or (limit is not None and len(got) >= limit):
            return got, token
