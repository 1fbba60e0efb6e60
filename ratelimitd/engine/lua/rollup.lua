--[[
rollup.lua: adds finished minutes of one organization's usage into its hour
and day counters, atomically and idempotently. (lib.lua is prepended.)

Decisions and reports count usage only in the hash of the current minute
(lib.lua, rl_count_usage): one write per counter instead of three. A minute is
finished once the clock has left it (scripts write at the time they run). The
marker says where the rollup stands: every minute before it is in the hour and
day hashes, none from it on. Rolling a minute and moving the marker are one
step, so a query that reads the marker, the hours or days, and the minutes from
the marker on (in one transaction, engine/usage.py) counts every report once,
whether the rollup has run or not. Any process may run it, any number of times.

Minute hashes are kept RL_RESOLUTIONS[1][3] seconds after they end; a marker
older than that (or none yet) starts at the oldest minute that can still exist.
Old-format fields ("<project>|<model>|<key>|<counter>", written to every
resolution directly by earlier versions) are left where they are.

A total would pass 2^62 only if single reports did (report.lua refuses those);
should the sum of many minutes get there, it stays at 2^62 rather than failing
half-applied.

KEYS[1]  the organization's rollup marker   rl:{org_x}:u:r (string: the start, unix s,
         of the first minute not rolled up yet)
ARGV[1]  the most minutes to roll in this call
last     "" to use the server's TIME; tests only: the time, microseconds

Reply: {minutes rolled, the marker after this call}
]]

local prefix = string.sub(KEYS[1], 1, -4) -- strip "u:r"
local now = rl_now(ARGV[#ARGV])
local now_s = math.floor(now / 1000000)
local minute = RL_RESOLUTIONS[1]
local current = now_s - now_s % 60
local oldest = current - math.ceil(minute[3] / 60) * 60 - 60
local marker = tonumber(redis.call("GET", KEYS[1]) or "")
local from = marker
if not from or from < oldest then from = oldest end
local most = tonumber(ARGV[1])

local m, rolled = from, 0
while m < current and rolled < most do
  local flat = redis.call("HGETALL", prefix .. "u:m:" .. m)
  if #flat > 0 then
    for r = 2, 3 do
      local res = RL_RESOLUTIONS[r]
      local start = m - m % res[2]
      local key = prefix .. "u:" .. res[1] .. ":" .. start
      local wrote = false
      for i = 1, #flat, 2 do
        local field, value = flat[i], flat[i + 1]
        if string.match(field, "^%d+|%a%d*$") then
          wrote = true
          if string.sub(field, -2) == "|s" then
            redis.call("HINCRBYFLOAT", key, field, value)
          elseif type(redis.pcall("HINCRBY", key, field, value)) == "table" then
            redis.call("HSET", key, field, string.format("%.0f", RL_MAX_COUNTER))
          end
        end
      end
      if wrote then redis.call("EXPIRE", key, math.max(1, start + res[2] + res[3] - now_s)) end
    end
  end
  m = m + 60
  rolled = rolled + 1
end
if m ~= marker then redis.call("SET", KEYS[1], m) end
return {rolled, m}
