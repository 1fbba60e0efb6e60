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

from ratelimitd.engine.limits import Dimensions
from ratelimitd.engine.retention import Retention

# Scripts that evaluate buckets get lib.lua in front: one EVALSHA each, one
# copy of the shared arithmetic.
_WITH_LIB = ("decide", "report", "rollup", "limit_state")


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


# How much later than strictly needed the state hash expires when a writer
# extends it: the extension (one PEXPIREAT) then happens about once per this
# interval under steady traffic rather than on every decision.
EXPIRY_SLACK_MS = 60_000
# Lua 5.1's LUA_MAXCAPTURES: bounds the dimensions RL_CONFIG_PATTERN can capture.
_LUA_MAX_CAPTURES = 32


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def layout(dimensions: Dimensions) -> str:
    """Names the bucket layout of the state hash: it changes when the dimensions do."""
    text = ",".join(f"{d.name}={d.window_ms}" for d in dimensions.all)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _fields_pattern(separator: str, count: int) -> str:
    return "^" + separator.join([f"([^{separator}]*)"] * count) + "$"


def _config_pattern(ndims: int) -> str:
    """The cached configuration (lib.lua, rl_config_encode): version; verdict; org limits;
    project limits; spend limits; price, every limit a capture of its own."""
    limits = ",".join(["([^,;]*)"] * ndims)
    return "^([^;]*);([^;]*);" + limits + ";" + limits + ";([^;]*);([^;]*);([^;]*)$"


def settings_prelude(dimensions: Dimensions, retention: Retention) -> str:
    """The RL_* constants decide.lua and report.lua read, as Lua source.

    Baked into the script text instead of passed as ARGV on every call: the
    script parses nothing per call, and processes with equal settings share one
    script (one SHA)."""
    dims = dimensions.all
    if 5 + 2 * len(dims) > _LUA_MAX_CAPTURES:
        raise ValueError(f"{len(dims)} dimensions; at most {(_LUA_MAX_CAPTURES - 5) // 2} are supported")
    resolutions = (("m", 60, retention.minute_s), ("h", 3600, retention.hour_s), ("d", 86400, retention.day_s))
    lines = [
        f"local RL_NDIMS = {len(dims)}",
        f"local RL_DIMS = {{{', '.join(_lua_string(d.name) for d in dims)}}}",
        f"local RL_WINDOWS_US = {{{', '.join(str(d.window_ms * 1000) for d in dims)}}}",
        f"local RL_METRIC_TOKENS = {{{', '.join('true' if d.metric == 'tokens' else 'false' for d in dims)}}}",
        f"local RL_LAYOUT = {_lua_string(layout(dimensions))}",
        f"local RL_RECORD_TTL_MS = {retention.request_ttl_s * 1000}",
        "local RL_RESOLUTIONS = {"
        + ", ".join(f"{{{_lua_string(name)}, {width}, {ttl}}}" for name, width, ttl in resolutions)
        + "}",
        f"local RL_LOG_CAP = {retention.log_entries}",
        f"local RL_LOG_TTL_S = {retention.log_ttl_s}",
        f"local RL_EXPIRY_SLACK_MS = {EXPIRY_SLACK_MS}",
        # One string.match with a capture per value reads a state or a cached configuration:
        # several times cheaper in Valkey's Lua than a gmatch loop (lib.lua).
        f"local RL_STATE_PATTERN = {_lua_string(_fields_pattern(',', 1 + len(dims)))}",
        f"local RL_CONFIG_PATTERN = {_lua_string(_config_pattern(len(dims)))}",
        f"local RL_STATE_FORMAT = {_lua_string(','.join(['%d'] + ['%.17g'] * len(dims)))}",
    ]
    return "\n".join(lines) + "\n"


def configured(script: LuaScript, dimensions: Dimensions, retention: Retention) -> LuaScript:
    """The script with these settings baked in (see settings_prelude)."""
    source = settings_prelude(dimensions, retention) + script.source
    return LuaScript(script.name, source, hashlib.sha1(source.encode()).hexdigest())


class Scripts:
    def __init__(self, redis: Redis) -> None:
        # the hot path's scripts run on the pipelined connection
        self.decide = load("decide")
        self.report = load("report")
        self.rollup = load("rollup")
        self.limit_state = load("limit_state")  # the console's live view, through redis-py
        # control-plane scripts run through redis-py
        self.set_project_limits: AsyncScript = redis.register_script(read_script("set_project_limits"))
