"""Script handles: what the engine hands storage to run, and what storage promises back.

The engine reads and configures the Lua source (engine/scripts.py); storage runs it
(storage/pipelined.py and its cluster and sentinel siblings). Both sides name these
two types, so they live below both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol


@dataclass(frozen=True)
class LuaScript:
    """A hot-path script, in the two forms storage can run it.

    ``head`` holds definitions the script uses (the settings, lib.lua), ``body`` the
    script itself, which reads KEYS and ARGV and returns the reply.

    ``library`` is a Valkey/Redis FUNCTION library of one function, ``function``:
    its top level (the head) runs once, when it is loaded, and each FCALL runs only
    the body, which is what makes it cheaper than EVALSHA of ``source`` (head and body
    as one script: the fallback for servers without functions, and what redis-py's
    control-plane calls run). Both names derive from the text, so processes with the
    same settings share one library, and a library is never replaced by another text."""

    name: str
    head: str
    body: str

    @cached_property
    def source(self) -> str:
        return self.head + "\n" + self.body if self.head else self.body

    @cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()

    @cached_property
    def function(self) -> str:
        return f"ratelimitd_{self.name}_{self.sha[:16]}"

    @cached_property
    def library(self) -> str:
        return (
            f"#!lua name={self.function}\n{self.head}\n"
            f"redis.register_function('{self.function}', function(KEYS, ARGV)\n{self.body}\nend)\n"
        )


class ScriptRunner(Protocol):
    """Runs a script (FCALL of its function, loading the library when the server lacks
    it; EVALSHA on servers without functions); raises StorageUnavailable when storage
    cannot be reached. storage/pipelined.py is the production one."""

    async def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any: ...
