"""Where decide.lua's time goes, measured inside Valkey: ``python load/lua_cost.py --profile``.

The engine (in this process, on a private Valkey) makes one real decision of
lua_cost.py's case; its script and KEYS/ARGV are kept, and a copy of its function
library with ``os.clock()`` marks in the function is called (FCALL, as the server
does) again and again with them. The library's top level (settings, lib.lua) runs
once, at load, so it is in no section. A mark goes at the function's start, before
every top-level comment of decide.lua's own text (each names the section that
follows it), before the
admitted decision's writes, and around the closing ``finish`` (usage counter and
request record). ``os.clock`` is Valkey's own CPU time, so a busy machine's
preemption does not count, unlike ``INFO commandstats``' wall time: the sections
and the total are trimmed means (the slowest 10% of calls dropped) per call, less
what a mark itself costs (measured by two marks back to back; os.clock is a system
call).

``decide_floor.lua`` is measured the same way beside it: the six commands a
decision makes (TIME, HMGET key, HMGET state, HSET state, HINCRBY usage, SET
record) with as little Lua as can make them. What it costs is what no rewrite of
decide.lua's Lua can save; the difference is the Lua.

A benchmark tool: nothing here asserts a timing.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from ratelimitd.core.scripts import LuaScript

FINISH = "return finish(reply)"
ADMITTED = "if outcome == 0 then\n"
FLOOR = Path(__file__).resolve().parent / "decide_floor.lua"
MARK_COST = "local a = os.clock() local b = os.clock() return string.format('%.7f', b - a)"


def instrument(script: LuaScript) -> tuple[LuaScript, list[str]]:
    """The decide script with os.clock() marks in its body (its head, the library's top
    level, unmarked), and the name of each section between two marks."""
    names: list[str] = []
    out: list[str] = []
    in_comment = True
    for line in script.body.split("\n"):
        if line.startswith("-- ") and not in_comment:
            names.append(line[3:60])
            out.append("__T[#__T + 1] = os.clock()")
        if line + "\n" == ADMITTED:
            names.append("admitted: the state write (HSET) and spend")
            out.append("__T[#__T + 1] = os.clock()")
        if line == FINISH:
            names.append("finish: usage counter (HINCRBY), request record (SET)")
            out += ["__T[#__T + 1] = os.clock()", "local __r = finish(reply)", "__T[#__T + 1] = os.clock()", "break"]
            continue
        in_comment = line.startswith("--")
        out.append(line)
    # the first mark opens the first section (ARGV and the caller); the body in a loop
    # of one turn, so the marks' reply can follow the last line
    names.insert(0, "KEYS and the first ARGV")
    body = (
        "local __T = {os.clock()}\nrepeat\n"
        + "\n".join(out)
        + "\nuntil true\nfor i = 1, #__T do __T[i] = string.format('%.7f', __T[i]) end\nreturn __T"
    )
    return LuaScript("profile_decide", script.head, body), names


def floor_script() -> LuaScript:
    """decide_floor.lua, answering its own CPU time."""
    text = FLOOR.read_text()
    at = text.rindex("return {")
    body = "local __t0 = os.clock()\n" + text[:at] + "do return {string.format('%.7f', os.clock() - __t0)} end\n"
    return LuaScript("profile_floor", "", body)


def trimmed_mean(values: list[float]) -> float:
    kept = sorted(values)[: max(1, int(len(values) * 0.9))]
    return sum(kept) / len(kept)


def profile(client: Any, script: LuaScript, keys: list[str], args: list[str], calls: int) -> dict[str, Any]:
    """Per-section and total CPU (µs per call) of the decide function (a LuaScript), and of the floor."""
    marked, names = instrument(script)
    floor = floor_script()
    for library in (marked, floor):
        client.function_load(library.library, replace=True)
    per_call: list[list[float]] = []
    floor_us: list[float] = []
    for _ in range(calls):
        marks = [float(t) for t in client.fcall(marked.function, len(keys), *keys, *args)]
        per_call.append([(b - a) * 1e6 for a, b in itertools.pairwise(marks)])
        floor_us.append(float(client.fcall(floor.function, len(keys), *keys, *args)[0]) * 1e6)
    # what one mark costs (os.clock is a system call), taken off every section
    mark = trimmed_mean([float(client.eval(MARK_COST, 0)) * 1e6 for _ in range(calls)])
    sections = {name: round(trimmed_mean([row[i] for row in per_call]) - mark, 2) for i, name in enumerate(names)}
    return {
        "calls": calls,
        "mark_us": round(mark, 2),
        "sections_us": sections,
        "script_cpu_us": round(trimmed_mean([sum(row) for row in per_call]) - mark * len(names), 1),
        "floor_cpu_us": round(trimmed_mean(floor_us) - mark, 1),
    }


def show(result: dict[str, Any]) -> None:
    print(f"decide.lua, CPU inside Valkey (os.clock), trimmed mean of {result['calls']} calls,")
    print(f"less the cost of a mark itself ({result['mark_us']} µs)")
    for name, us in result["sections_us"].items():
        print(f"  {us:7.2f} µs  {name}")
    print(f"  {result['script_cpu_us']:7.1f} µs  the whole script")
    print(f"  {result['floor_cpu_us']:7.1f} µs  the floor: decide_floor.lua, the same six commands with the least Lua")


# -- what the same calls cost back to back and one at a time (--floor) ----------------

EMPTY = LuaScript("profile_empty", "", "return 1")
# Between two decisions through the server, Valkey waits a round trip while the
# server and the client run: about this long on this kind of machine.
GAP_S = 0.0003


def commandstats_us(client: Any, function: str, keys: list[str], args: list[str], calls: int, gap_s: float) -> float:
    """INFO commandstats usec of FCALL per call, calls ``gap_s`` apart (busy-waiting:
    the CPU stays busy, as it does serving the round trip)."""
    client.config_resetstat()
    for _ in range(calls):
        client.fcall(function, len(keys), *keys, *args)
        if gap_s:
            until = time.perf_counter() + gap_s
            while time.perf_counter() < until:
                pass
    stats = client.info("commandstats")
    return float(stats["cmdstat_fcall"]["usec"]) / calls


def floor(client: Any, script: LuaScript, keys: list[str], args: list[str], calls: int) -> dict[str, Any]:
    """Script µs per call (commandstats, as lua_cost.py reads it) of an empty function,
    decide_floor.lua and decide itself, back to back and GAP_S apart."""
    cases = {
        "an empty function": (EMPTY, [], []),
        "decide_floor.lua (six commands, least Lua)": (floor_script(), keys, args),
        "decide": (script, keys, args),
    }
    for library, _, _ in cases.values():
        client.function_load(library.library, replace=True)
    return {
        "calls": calls,
        "gap_us": GAP_S * 1e6,
        "rows": {
            name: [round(commandstats_us(client, f.function, k, a, calls, gap), 1) for gap in (0, GAP_S)]
            for name, (f, k, a) in cases.items()
        },
    }


def show_floor(result: dict[str, Any]) -> None:
    print(f"script µs per call (INFO commandstats), {result['calls']} calls, from one client")
    apart = f"{result['gap_us']:.0f} µs apart"
    print(f"{'':44} {'back to back':>12} {apart:>14}")
    for name, (warm, apart) in result["rows"].items():
        print(f"{name:44} {warm:>12.1f} {apart:>14.1f}")
