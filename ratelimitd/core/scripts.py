"""Script handles: what the engine hands storage to run, and what storage promises back.

The engine reads and configures the Lua source (engine/scripts.py); storage runs it by
sha (storage/pipelined.py and its cluster and sentinel siblings). Both sides name these
two types, so they live below both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol


class LuaScript(NamedTuple):
    """A script for the pipelined connection: EVALSHA by sha, loaded from source on NOSCRIPT."""

    name: str
    source: str
    sha: str


class ScriptRunner(Protocol):
    """Runs a script by sha, loading it on NOSCRIPT; raises StorageUnavailable when storage
    cannot be reached. storage/pipelined.py is the production one."""

    async def evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any: ...
