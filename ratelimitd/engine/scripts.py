"""The Lua scripts, read once from package data and registered by name.

redis-py's ``Script`` runs EVALSHA and, on NOSCRIPT (a new or failed-over
node), loads the script and retries, so callers never see the cache state.
"""

from __future__ import annotations

from importlib import resources

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


class Scripts:
    def __init__(self, redis: Redis) -> None:
        self.decide: AsyncScript = redis.register_script(read_script("decide"))
        self.report: AsyncScript = redis.register_script(read_script("report"))
        self.set_project_limits: AsyncScript = redis.register_script(read_script("set_project_limits"))
