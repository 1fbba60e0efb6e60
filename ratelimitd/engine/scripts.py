"""The Lua scripts, read once from package data and registered by name.

redis-py's ``Script`` runs EVALSHA and, on NOSCRIPT (a new or failed-over
node), loads the script and retries, so callers never see the cache state.
"""

from __future__ import annotations

from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

SCRIPT_NAMES = ("decide", "set_project_limits")


def read_script(name: str) -> str:
    return resources.files("ratelimitd.engine").joinpath("lua", f"{name}.lua").read_text()


class Scripts:
    def __init__(self, redis: Redis) -> None:
        self.decide: AsyncScript = redis.register_script(read_script("decide"))
        self.set_project_limits: AsyncScript = redis.register_script(read_script("set_project_limits"))
