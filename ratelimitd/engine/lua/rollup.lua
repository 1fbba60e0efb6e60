--[[
rollup.lua: adds finished minutes of one organization's usage into its hour
and day counters, atomically and idempotently. (lib.lua is prepended.)

Decisions and reports count usage only in the hash of the current minute
(lib.lua): one write per decision instead of three. A minute is finished once
the clock has left it (scripts write at the time they run). The marker says
where the rollup stands: "<minute>:<id>" means every minute before <minute> is
in the hour and day hashes, and of <minute> the usage ids up to <id>; nothing
else is. Rolling and moving the marker are one step, so a query that reads the
marker, the hours or days, and the rest from the minutes (one transaction,
engine/usage.py) counts every report once, whether the rollup has run or not.
Any process may run it, any number of times.

Each call does a bounded amount of work, as a script blocks Valkey while it
runs: empty minutes are skipped (up to RL_ROLLUP_SKIP), then one minute is
rolled whole when it has at most ARGV[1] fields, else the next ARGV[2] usage
ids of it (ids are allocated 1, 2, 3, ... in "ui"). The caller calls again
until the reply says it is done.

Minute hashes are kept RL_RESOLUTIONS[1][3] seconds after they end; a marker
older than that (or none yet) starts at the oldest minute that can still exist.
Old-format fields ("<project>|<model>|<key>|<counter>", written to every
resolution directly by earlier versions) are left where they are. The field
layouts of minutes, hours and days are in lib.lua; whole numbers are added
exactly (rl_int_add), spend as doubles.

KEYS[1]  the organization's rollup marker   rl:{org_x}:u:r
ARGV[1]  a minute with at most this many fields is rolled whole in one call
ARGV[2]  else: usage ids rolled per call
last     "" to use the server's TIME; tests only: the time, microseconds

Reply: {1 when every finished minute is rolled up, else 0; the marker}
]]

local prefix = string.sub(KEYS[1], 1, -4) -- strip "u:r"
local now = rl_now(ARGV[#ARGV])
local now_s = math.floor(now / 1000000)
local current = now_s - now_s % 60
local oldest = current - math.ceil(RL_RESOLUTIONS[1][3] / 60) * 60 - 60
local whole_fields, ids_per_call = tonumber(ARGV[1]), tonumber(ARGV[2])
local RL_ROLLUP_SKIP = 1440

local raw_marker = redis.call("GET", KEYS[1])
local m, after = nil, 0
if raw_marker then
  local minute_s, id = string.match(raw_marker, "^(%d+):(%d+)$")
  m, after = tonumber(minute_s), tonumber(id)
end
if not m or m < oldest then m, after = oldest, 0 end

-- The minute's counters per usage id: {requests, reports, input, output, cached, spend, refusals,
-- shadow refusals}
-- flat: field, value, ... (HGETALL); ids above `after` and up to `upto` only.
local function minute_totals(flat, after, upto)
  local acc, ids = {}, {}
  for i = 1, #flat, 2 do
    local id, kind, outcome = string.match(flat[i], "^(%d+)|(%a)(%d*)$")
    local n = tonumber(id)
    if n and n > after and n <= upto then
      local a = acc[id]
      if not a then
        a = {"0", "0", "0", "0", "0", 0, {}, {}}
        acc[id] = a
        ids[#ids + 1] = id
      end
      local value = flat[i + 1]
      if kind == "r" then
        a[1] = rl_int_add(a[1], value)
      elseif kind == "x" then
        a[7][outcome] = rl_int_add(a[7][outcome], value)
      elseif kind == "s" then
        -- admitted too: the hour and day count them in requests
        a[1] = rl_int_add(a[1], value)
        a[8][outcome] = rl_int_add(a[8][outcome], value)
      elseif kind == "u" then
        local u = rl_split(value)
        for n = 1, 4 do a[n + 1] = rl_int_add(a[n + 1], u[n]) end
        a[6] = a[6] + (tonumber(u[5]) or 0)
      end
    end
  end
  return acc, ids
end

-- Adds a minute's totals to one id's packed hour or day value (lib.lua).
local function merged(raw, a)
  local t = raw and rl_split(raw) or {}
  local values, counts = {}, {x = {}, s = {}}
  for n = 1, 5 do values[n] = rl_int_add(t[n], a[n]) end
  values[6] = string.format("%.17g", (tonumber(t[6]) or 0) + a[6])
  for n = 7, #t do
    local kind, outcome, count = string.match(t[n], "^([xs])(%d+)=(%d+)$")
    if kind then counts[kind][outcome] = count end
  end
  for outcome, count in pairs(a[7]) do counts.x[outcome] = rl_int_add(counts.x[outcome], count) end
  for outcome, count in pairs(a[8]) do counts.s[outcome] = rl_int_add(counts.s[outcome], count) end
  for kind, by_outcome in pairs(counts) do
    for outcome, count in pairs(by_outcome) do values[#values + 1] = kind .. outcome .. "=" .. count end
  end
  return table.concat(values, ",")
end

-- Adds the totals to the hour and day hashes.
local function add_to_resolutions(m, acc, ids)
  for r = 2, 3 do
    local res = RL_RESOLUTIONS[r]
    local start = m - m % res[2]
    local key = prefix .. "u:" .. res[1] .. ":" .. start
    local old = redis.call("HMGET", key, unpack(ids))
    local writes = {}
    for n, id in ipairs(ids) do
      writes[#writes + 1] = id
      writes[#writes + 1] = merged(old[n], acc[id])
    end
    redis.call("HSET", key, unpack(writes))
    redis.call("EXPIRE", key, math.max(1, start + res[2] + res[3] - now_s))
  end
end

-- Empty minutes first, cheaply.
local skipped = 0
while m < current and after == 0 and skipped < RL_ROLLUP_SKIP
    and redis.call("EXISTS", prefix .. "u:m:" .. m) == 0 do
  m, skipped = m + 60, skipped + 1
end

if m < current then
  local key = prefix .. "u:m:" .. m
  local upto = math.huge
  if after > 0 or redis.call("HLEN", key) > whole_fields then
    -- a large minute: the next ids_per_call usage ids of it
    upto = after + ids_per_call
    if upto >= tonumber(redis.call("HGET", prefix .. "ui", "n") or "0") then upto = math.huge end
  end
  local flat
  if upto == math.huge then
    flat = redis.call("HGETALL", key)
  else
    -- only this slice's fields: every counter an id can have in a minute (lib.lua)
    local names = {}
    for id = after + 1, upto do
      names[#names + 1] = id .. "|r"
      names[#names + 1] = id .. "|u"
      for outcome = 1, 9 do names[#names + 1] = id .. "|x" .. outcome end
      for outcome = 1, 3 do names[#names + 1] = id .. "|s" .. outcome end
    end
    local values = redis.call("HMGET", key, unpack(names))
    flat = {}
    for n, name in ipairs(names) do
      if values[n] then
        flat[#flat + 1] = name
        flat[#flat + 1] = values[n]
      end
    end
  end
  local acc, ids = minute_totals(flat, after, upto)
  if #ids > 0 then add_to_resolutions(m, acc, ids) end
  if upto == math.huge then m, after = m + 60, 0 else after = upto end
end

local marker = m .. ":" .. after
if marker ~= raw_marker then redis.call("SET", KEYS[1], marker) end
return {m >= current and 1 or 0, marker}
