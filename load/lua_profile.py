"""Where decide.lua's time goes, measured inside Valkey: ``python load/lua_cost.py --profile``.

The engine (in this process, on a private Valkey) makes one real decision of
lua_cost.py's case; its script and KEYS/ARGV are kept, and a copy of the script
with ``os.clock()`` marks is called again and again with them. A mark goes at the
start (before the settings and libraries), before every top-level comment of
decide.lua's own text (each names the section that follows it), before the
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
from importlib import resources
from pathlib import Path
from typing import Any

FINISH = "return finish(reply)"
ADMITTED = "if outcome == 0 then\n"
FLOOR = Path(__file__).resolve().parent / "decide_floor.lua"
MARK_COST = "local a = os.clock() local b = os.clock() return string.format('%.7f', b - a)"


def own_text() -> str:
    return resources.files("ratelimitd.engine").joinpath("lua", "decide.lua").read_text()


def instrument(source: str, own: str) -> tuple[str, list[str]]:
    """The script with os.clock() marks, and the name of each section between two marks."""
    start = source.index(own)
    names, out, in_comment = ["settings and libraries (lib.lua)"], [], True
    for line in own.split("\n"):
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
    # the body in a loop of one turn, so the marks' reply can follow the last line
    body = "repeat\n" + "\n".join(out) + "\nuntil true\n"
    tail = "for i = 1, #__T do __T[i] = string.format('%.7f', __T[i]) end\nreturn __T\n"
    return "local __T = {os.clock()}\n" + source[:start] + body + tail, names


def floor_script() -> str:
    text = FLOOR.read_text()
    at = text.rindex("return {")
    return "local __t0 = os.clock()\n" + text[:at] + "do return {string.format('%.7f', os.clock() - __t0)} end\n"


def trimmed_mean(values: list[float]) -> float:
    kept = sorted(values)[: max(1, int(len(values) * 0.9))]
    return sum(kept) / len(kept)


def profile(client: Any, source: str, keys: list[str], args: list[str], calls: int) -> dict[str, Any]:
    """Per-section and total script CPU (µs per call) of decide.lua, and of the floor."""
    script, names = instrument(source, own_text())
    sha, floor_sha = client.script_load(script), client.script_load(floor_script())
    per_call: list[list[float]] = []
    floor: list[float] = []
    for _ in range(calls):
        marks = [float(t) for t in client.evalsha(sha, len(keys), *keys, *args)]
        per_call.append([(b - a) * 1e6 for a, b in itertools.pairwise(marks)])
        floor.append(float(client.evalsha(floor_sha, len(keys), *keys, *args)[0]) * 1e6)
    # what one mark costs (os.clock is a system call), taken off every section
    mark = trimmed_mean([float(client.eval(MARK_COST, 0)) * 1e6 for _ in range(calls)])
    sections = {name: round(trimmed_mean([row[i] for row in per_call]) - mark, 2) for i, name in enumerate(names)}
    return {
        "calls": calls,
        "mark_us": round(mark, 2),
        "sections_us": sections,
        "script_cpu_us": round(trimmed_mean([sum(row) for row in per_call]) - mark * len(names), 1),
        "floor_cpu_us": round(trimmed_mean(floor) - mark, 1),
    }


def show(result: dict[str, Any]) -> None:
    print(f"decide.lua, CPU inside Valkey (os.clock), trimmed mean of {result['calls']} calls,")
    print(f"less the cost of a mark itself ({result['mark_us']} µs)")
    for name, us in result["sections_us"].items():
        print(f"  {us:7.2f} µs  {name}")
    print(f"  {result['script_cpu_us']:7.1f} µs  the whole script")
    print(f"  {result['floor_cpu_us']:7.1f} µs  the floor: decide_floor.lua, the same six commands with the least Lua")
