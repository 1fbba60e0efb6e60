"""The Lua scripts, read once from package data and registered by name.

The hot path's scripts (decide, report) run as FUNCTIONs on the pipelined
connection (storage/pipelined.py), which loads the library when a server lacks
it (a new, flushed or failed-over node) and falls back to EVALSHA on servers
without functions; the control plane's run through redis-py's ``Script``
(EVALSHA, loaded on NOSCRIPT). Either way callers never see the server's cache.
"""

from __future__ import annotations

import hashlib
import struct
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from ratelimitd.core.retention import Retention
from ratelimitd.core.scripts import LuaScript
from ratelimitd.engine.limits import Dimensions

# Scripts that evaluate buckets or resolve limits get lib.lua in front: one
# script (or function library) each, one copy of the shared arithmetic and of limit resolution.
_WITH_LIB = ("decide", "report", "rollup", "set_project_limits", "effective_limits", "limit_state")


def _read(name: str) -> str:
    return resources.files("ratelimitd.engine").joinpath("lua", f"{name}.lua").read_text()


def read_script(name: str) -> str:
    """The script's text as one script (lib.lua in front where it needs it)."""
    return load(name).source


def load(name: str) -> LuaScript:
    return LuaScript(name, _read("lib") if name in _WITH_LIB else "", _read(name))


# How much later than strictly needed the state hash expires when a writer
# extends it: the extension (one PEXPIREAT) then happens about once per this
# interval under steady traffic rather than on every decision.
EXPIRY_SLACK_MS = 60_000
# The resolved configuration (lib.lua, rl_config_resolve): ten numbers (version,
# verdict, two spend limits, reservation price, shadow mask, three prices, whether
# cached tokens count), then the organization's limits, then the project's.
_CONFIG_HEAD = 10
_DOUBLE_BYTES = 8


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lua_bytes(value: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in value) + '"'


# The encoding of the state hash's values (lib.lua): changing it changes the layout,
# so states written in another one are void, as after a change of the windows.
_STATE_ENCODING = "struct-d1"


def layout(dimensions: Dimensions) -> str:
    """Names the bucket layout of the state hash: it changes when the dimensions do."""
    text = ",".join(f"{d.name}={d.window_ms}" for d in dimensions.all) + ";" + _STATE_ENCODING
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def settings_prelude(dimensions: Dimensions, retention: Retention, *, shadow_all: bool = False) -> str:
    """The RL_* constants decide.lua and report.lua read, as Lua source.

    Baked into the script text instead of passed as ARGV on every call: the
    script parses nothing per call, and processes with equal settings share one
    library (one script for EVALSHA)."""
    dims = dimensions.all
    state_format = "<" + "d" * (1 + len(dims))
    config_size = _CONFIG_HEAD + 2 * len(dims)
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
        # The state and configuration encodings (lib.lua): doubles, one struct call each.
        f"local RL_STATE_FORMAT = {_lua_string(state_format)}",
        f"local RL_STATE_BYTES = {_DOUBLE_BYTES * (1 + len(dims))}",
        f"local RL_EMPTY_STATE = {_lua_bytes(struct.pack(state_format, *[0.0] * (1 + len(dims))))}",
        f"local RL_CONFIG_SIZE = {config_size}",
        f"local RL_CONFIG_FORMAT = {_lua_string('<' + 'd' * config_size)}",
        f"local RL_CONFIG_BYTES = {_DOUBLE_BYTES * config_size}",
        f"local RL_ORG, RL_PROJ = {_CONFIG_HEAD}, {_CONFIG_HEAD + len(dims)}",
        # RATELIMITD_SHADOW_ALL: every limit is a shadow limit (decide.lua)
        f"local RL_SHADOW_ALL = {'true' if shadow_all else 'false'}",
    ]
    return "\n".join(lines) + "\n"


def configured(
    script: LuaScript, dimensions: Dimensions, retention: Retention, *, shadow_all: bool = False
) -> LuaScript:
    """The script with these settings baked in (see settings_prelude)."""
    prelude = settings_prelude(dimensions, retention, shadow_all=shadow_all)
    return LuaScript(script.name, prelude + script.head, script.body)


class Scripts:
    def __init__(self, redis: Redis) -> None:
        # the hot path's scripts run on the pipelined connection
        self.decide = load("decide")
        self.report = load("report")
        self.rollup = load("rollup")
        self.limit_state = load("limit_state")  # the console's live view, through redis-py
        # control-plane scripts run through redis-py
        self.set_project_limits: AsyncScript = redis.register_script(read_script("set_project_limits"))
        self.effective_limits: AsyncScript = redis.register_script(read_script("effective_limits"))
