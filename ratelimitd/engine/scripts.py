"""The Lua scripts, read once from package data and registered by name.

Both paths run EVALSHA and, on NOSCRIPT (a new or failed-over node), load the
script and retry, so callers never see the server's script cache: redis-py's
``Script`` for the control plane, storage/pipelined.py for the hot path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, NamedTuple, Protocol

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

# Scripts that evaluate buckets get lib.lua in front: one EVALSHA each, one
# copy of the shared arithmetic.
_WITH_LIB = ("decide", "report")


def read_script(name: str) -> str:
    lua = resources.files("ratelimitd.engine").joinpath("lua")
    text = lua.joinpath(f"{name}.lua").read_text()
    if name in _WITH_LIB:
        text = lua.joinpath("lib.lua").read_text() + "\n" + text
    return text


class ScriptRunner(Protocol):
    """Runs a script by sha, loading it on NOSCRIPT; raises StorageUnavailable when storage
    cannot be reached. storage/pipelined.py is the production one."""

    async def evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any: ...


class LuaScript(NamedTuple):
    """A script for the pipelined connection: EVALSHA by sha, loaded from source on NOSCRIPT."""

    name: str
    source: str
    sha: str


def load(name: str) -> LuaScript:
    source = read_script(name)
    return LuaScript(name, source, hashlib.sha1(source.encode()).hexdigest())


class Scripts:
    def __init__(self, redis: Redis) -> None:
        # the hot path's scripts run on the pipelined connection
        self.decide = load("decide")
        self.report = load("report")
        # control-plane scripts run through redis-py
        self.set_project_limits: AsyncScript = redis.register_script(read_script("set_project_limits"))
