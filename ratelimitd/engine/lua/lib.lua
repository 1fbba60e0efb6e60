--[[
lib.lua: functions shared by the scripts that touch buckets, usage and limits.
scripts.py puts this text in front of decide.lua, report.lua and rollup.lua
(after the settings it bakes in as RL_* constants, see scripts.configured), and
of set_project_limits.lua and effective_limits.lua (without them: those use only
the limit resolution, which reads no RL_* setting), so each is still one
self-contained script, and the bucket arithmetic and limit resolution exist once.
For decide.lua and report.lua this text is the top level of a FUNCTION library
(core/scripts.py LuaScript), so it runs once, when the library is loaded, and
each FCALL runs only the script's own body; it must define and compute nothing
that depends on a call.

Units: time in microseconds (from TIME, or the test clock in tests), window
lengths in microseconds, levels in the metric's units, spend in micro-USD
(a price in USD per million tokens is micro-USD per token).

The decision state of one organization is one hash, rl:{org_x}:s (keys.py),
so a decision reads its configuration and every bucket in one HMGET and writes
them back in one HSET:

  "v"                     configuration version: the control plane increments it
                          in the same atomic step as any change a decision reads
  "d"                     the dimension layout (RL_LAYOUT) the states below use;
                          another layout (the windows changed) makes them void
  "x"                     the hash's expiry as last set (ms, on the scripts' clock): a
                          writer whose buckets need longer sets a later one (PEXPIRE
                          relative to now, as the test clock is not the server's), at
                          most about once per RL_EXPIRY_SLACK_MS, not on every call
  "c:<project>:<model>"   the resolved configuration of (project, model), valid
                          while its version equals "v" (rl_config_*: packed doubles)
  "o:<model>"             the organization's buckets of the model (rl_state_*:
                          packed doubles)
  "p:<project>:<model>"   the project's buckets of the model
  "u:<project>:<model>:<key>"  the usage id of (project, model, key) ("ui", below),
                          so a decision finds it in the same read

Fields of idle projects and old versions stay until the hash expires (once every
bucket would have drained): bounded by projects x models (x keys for "u:") of
the organization; deleting a project removes its fields (control.py).
]]

-- The server's clock, or (tests only) the time the caller passes.
local function rl_now(given)
  if given ~= "" then
    return tonumber(given)
  end
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- A group's buckets are stored as struct.pack(RL_STATE_FORMAT, t_us, level 1, ...,
-- level d): one double per dimension (0 where the scope has no limit), read and
-- written by one struct call each, several times cheaper in Valkey's Lua than
-- text (string.match and tonumber per value, string.format per write).
-- Returns {t_us, level 1, ..., level d, next}: RL_EMPTY_STATE (all zero) when
-- there is no state or it has another size.
local function rl_state_read(raw)
  if not raw or #raw ~= RL_STATE_BYTES then raw = RL_EMPTY_STATE end
  return {struct.unpack(RL_STATE_FORMAT, raw)}
end

-- Drains a group's levels (rl_state_read) to now in place, with the limits of one
-- scope in the configuration c (c[off + i]): the level of a dimension without a
-- limit is dropped (0), as nothing charges it.
local function rl_state_drain(s, c, off, now)
  local elapsed = now - s[1]
  for i = 1, RL_NDIMS do
    local limit, l = c[off + i], s[i + 1]
    if limit < 0 then
      s[i + 1] = 0
    elseif l > 0 then
      l = l - elapsed * limit / RL_WINDOWS_US[i]
      if l < 0 then l = 0 end
      s[i + 1] = l
    end
  end
end

-- The state of drained levels s at now, and how long (ms) until the fullest drains.
local function rl_state_pack(s, c, off, now)
  local drain = 0
  for i = 1, RL_NDIMS do
    local l = s[i + 1]
    if l > 0 then
      local d = l * RL_WINDOWS_US[i] / c[off + i] / 1000
      if d > drain then drain = d end
    end
  end
  return struct.pack(RL_STATE_FORMAT, now, unpack(s, 2, RL_NDIMS + 1)), math.ceil(drain)
end

-- Adds the expiry to a state write (fields: a flat {field, value, ...} list for
-- HSET) when the hash would expire before `need_ms` (ms, the scripts' clock):
-- once the hash is written, "x" says until when it is kept. Returns the new
-- expiry, or nil when the current one will do.
local function rl_state_expiry(fields, expiry, need_ms)
  if expiry and expiry >= need_ms then return end
  local at = need_ms + RL_EXPIRY_SLACK_MS
  fields[#fields + 1] = "x"
  fields[#fields + 1] = at
  return at
end

--[[ Limit resolution: the one place its rules are written (docs/control-plane.md).
set_project_limits.lua checks a project limit against rl_org_limits; decide.lua
and report.lua apply what rl_config_resolve makes of both. Neither function
reads an RL_* setting, so set_project_limits.lua gets this library without them. ]]

-- A stored limit value: "<limit>", or "<limit>s" for a shadow limit (evaluated and
-- counted, never refusing: docs/operations.md "Shadow mode"). Returns the limit
-- and whether it is a shadow limit.
local function rl_limit_value(raw)
  local n = tonumber(raw)
  if n then return n, false end
  return tonumber(string.sub(raw, 1, -2)), true
end

-- A limit hash's entries of a model, in one HMGET: per dimension name in dims the
-- model's own entry ([i]), then every "*" entry ([n + i]); nil where there is none.
local function rl_limit_entries(key, model, dims)
  local n, fields = #dims, {}
  for i = 1, n do
    fields[i] = model .. "|" .. dims[i]
    fields[n + i] = "*|" .. dims[i]
  end
  return redis.call("HMGET", key, unpack(fields))
end

-- The organization's limits of a model, one per dimension name in dims (nil for
-- none): the model's own entries when it has any, else the "*" entries; whether
-- there is any (else the model is not available); and which are shadow limits
-- (shadow[i] true).
local function rl_org_limits(key, model, dims)
  local n = #dims
  local v = rl_limit_entries(key, model, dims)
  local offset = n
  for i = 1, n do
    if v[i] then offset = 0 break end
  end
  local limits, any, shadow = {}, false, {}
  for i = 1, n do
    local x = v[offset + i]
    if x then limits[i], shadow[i] = rl_limit_value(x) any = true end
  end
  return limits, any, shadow
end

-- A project's custom limits of a model, one per dimension name in dims (nil for
-- none, where it inherits): per dimension the model's entry, else its "*" entry;
-- and which are shadow limits.
local function rl_project_limits(key, model, dims)
  local n = #dims
  local v = rl_limit_entries(key, model, dims)
  local limits, shadow = {}, {}
  for i = 1, n do
    local x = v[i] or v[n + i]
    if x then limits[i], shadow[i] = rl_limit_value(x) end
  end
  return limits, shadow
end

--[[ The configuration a decision needs for (project, model), a flat array of
numbers (RL_NONE, -1, where there is none), stored with struct.pack in the state
hash's "c:<project>:<model>" while its version is the hash's "v":
  [1] the configuration version it was resolved at
  [2] the verdict: 0 may be used, 5 the organization has no limit for the model,
      7 blocked by the model permissions
  [3], [4] the monthly spend limits of the organization and of the project
  [5] the price (micro-USD per token) a token estimate is reserved at, under a
      spend limit: the higher of the model's input and output price, else the "*"
      price's (RL_NONE without a spend limit: nothing is reserved)
  [6] RL_SHADOW: which limits are shadow limits, a bit mask (rl_shadow_bit): 0 for
      none, so a decision without shadow limits tests one number
  [7], [8], [9] RL_PRICES: the model's input, output and cached input price (the
      "*" price's when it has none; RL_NONE when neither exists), which report.lua
      charges spend at
  [10] RL_COUNTS_CACHED: 1 when the organization counts cached input tokens toward
      token limits (its usage setting "cached"), else 0
  [RL_ORG + i]  the limit of dimension i that applies to the organization's bucket
  [RL_PROJ + i] the project's custom limit of dimension i
Everything in it changes only with the configuration version (keys.py,
invalidate_decision_config), which is what lets a decision and a report read it
from the state hash instead of from the source records. ]]
local RL_NONE = -1
local RL_SHADOW = 6
local RL_PRICES = 7
local RL_COUNTS_CACHED = 10

-- The bit of (scope, dimension i) in a configuration's shadow mask: scope 1
-- (organization) or 2 (project). Test it with bit.band.
local function rl_shadow_bit(scope, i)
  return 2 ^ ((scope - 1) * RL_NDIMS + i - 1)
end

local function rl_config_resolve(prefix, version, project, model)
  local n = RL_NDIMS
  local org, any, org_shadow = rl_org_limits(prefix .. "lim:o", model, RL_DIMS)
  local proj, proj_shadow = rl_project_limits(prefix .. "lim:p:" .. project, model, RL_DIMS)
  local verdict = 0
  if not any then verdict = 5 end
  if verdict == 0 then
    -- the organization's allow- or block-list, then the project's, which can only narrow it
    local mp = redis.call("HMGET", prefix .. "mp", "o", "o|" .. model, "p:" .. project, "p:" .. project .. "|" .. model)
    for s = 1, 3, 2 do
      if (mp[s] == "allow" and not mp[s + 1]) or (mp[s] == "block" and mp[s + 1]) then verdict = 7 break end
    end
  end
  local spend = redis.call("HMGET", prefix .. "spendlim", "o", "p:" .. project)
  local p = redis.call("HMGET", prefix .. "price", model, "*")
  local raw = p[1] or p[2]
  local p_in, p_out, p_cached = RL_NONE, RL_NONE, RL_NONE
  if raw then
    p_in, p_out, p_cached = string.match(raw, "^([^,]+),([^,]+),([^,]+)$")
    p_in, p_out, p_cached = tonumber(p_in), tonumber(p_out), tonumber(p_cached)
  end
  local price = RL_NONE
  if (spend[1] or spend[2]) and raw then price = math.max(p_in, p_out) end
  local counts_cached = redis.call("HGET", prefix .. "cfg", "cached") == "1" and 1 or 0
  local mask = 0
  for i = 1, n do
    if org_shadow[i] then mask = mask + rl_shadow_bit(1, i) end
    if proj_shadow[i] then mask = mask + rl_shadow_bit(2, i) end
  end
  local c = {tonumber(version), verdict, tonumber(spend[1] or "") or RL_NONE, tonumber(spend[2] or "") or RL_NONE,
             price, mask, p_in, p_out, p_cached, counts_cached}
  for i = 1, n do
    c[RL_ORG + i] = org[i] or RL_NONE
    c[RL_ORG + n + i] = proj[i] or RL_NONE
  end
  return c
end

local function rl_config_encode(c)
  return struct.pack(RL_CONFIG_FORMAT, unpack(c, 1, RL_CONFIG_SIZE))
end

-- The cached configuration when it is of `version` (a number), else nil.
local function rl_config_decode(raw, version)
  if not raw or #raw ~= RL_CONFIG_BYTES then return nil end
  local c = {struct.unpack(RL_CONFIG_FORMAT, raw)}
  if c[1] ~= version then return nil end
  return c
end

-- "YYYYMM" of a time, UTC (days-to-civil, proleptic Gregorian).
local function rl_month(now)
  local z = math.floor(now / 86400000000) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return string.format("%04d%02d", year, month)
end

-- Adds to (subtracts from, when negative) the month's spend of the organization
-- and the project; the hash is kept 400 days.
local function rl_add_spend(prefix, month, project, amount)
  if amount == 0 then return end
  local key = prefix .. "spend:" .. month
  local a = string.format("%.17g", amount)
  redis.call("HINCRBYFLOAT", key, "o", a)
  redis.call("HINCRBYFLOAT", key, "p:" .. project, a)
  redis.call("EXPIRE", key, 400 * 86400)
end

-- The request record (decide.lua writes it, report.lua reads and completes it),
-- fields separated by ";":
--   p   the project            k   the key id ("-" for a trusted caller)
--   rm  the model reported ("" until reported)
--   f   what was asked: "<model>|<requests>|<tokens>" per item, comma-separated
--   a   "1" when admitted: f's tokens are reserved
--   e   spend reserved per item (micro-USD, comma-separated, "" for none)
--   em  the month the spend was reserved in ("YYYYMM")
--   r   the answer, comma-separated ("" for none)
local function rl_record_encode(p, k, rm, f, admitted, e, em, reply)
  -- one concatenation: a single new string, no table
  return (p or "") .. ";" .. (k or "") .. ";" .. (rm or "") .. ";" .. (f or "") .. ";" .. (admitted and "1" or "")
    .. ";" .. (e or "") .. ";" .. (em or "") .. ";" .. (reply and table.concat(reply, ",") or "")
end

local function rl_record_decode(raw)
  local p, k, rm, f, a, e, em, reply = string.match(raw, "^([^;]*);([^;]*);([^;]*);([^;]*);([^;]*);([^;]*);([^;]*);(.*)$")
  local r = {p = p, k = k, rm = rm ~= "" and rm or nil, f = f, a = a == "1", e = e, em = em}
  if reply ~= "" then
    r.reply = {}
    for v in string.gmatch(reply .. ",", "([^,]*),") do
      r.reply[#r.reply + 1] = tonumber(v) or v
    end
  end
  return r
end

-- The reservation of a record: items {model, tokens, spend} in order.
local function rl_record_items(r)
  local items, spends = {}, {}
  for s in string.gmatch((r.e or "") .. ",", "([^,]*),") do spends[#spends + 1] = tonumber(s) or 0 end
  for m, _, t in string.gmatch(r.f or "", "([^|,]+)|([^|,]*)|([^|,]*)") do
    items[#items + 1] = {model = m, tokens = tonumber(t) or 0, spend = spends[#items + 1] or 0}
  end
  return items
end

-- The largest total an integer usage counter may reach: the int64 range the
-- counters had as HINCRBY fields, with room to spare. Totals are added exactly
-- (rl_int_add) however large; the check compares doubles, which is exact enough
-- this far from 2^63.
local RL_MAX_COUNTER = 2 ^ 62

--[[ Usage counters (docs/usage.md). One hash per minute, rl:{org_x}:u:m:<start_s>;
rollup.lua adds finished minutes into one hash per hour and per day (u:h:, u:d:).
<id> is a small integer standing for one (project, model, key), interned in the
hash "ui": "<project>|<model>|<key>" -> id, "#<id>" -> "<project>|<model>|<key>",
"n" the last id. A (project, model, key) costs one or two fields per bucket, so
a bucket shared by thousands (a hashtable, no longer a listpack) stays small:

  minute  "<id>|r"   requests admitted (HINCRBY: the decision's one write)
          "<id>|x<N>" refusals with outcome N
          "<id>|s<N>" requests admitted that a shadow limit would have refused
                     with outcome N (not in "|r": an admitted decision writes one)
          "<id>|u"   what ReportUsage counted: "<reports>,<input>,<output>,<cached>,<spend>"
  hour, day "<id>"   "<requests>,<reports>,<input>,<output>,<cached>,<spend>" then
                     ",x<N>=<refusals>" for each refusal outcome and ",s<N>=<requests>"
                     for each shadow outcome (these requests are in <requests> too)
Spend is micro-USD (a double); every other value a whole number. ]]
local RL_REPORT_COUNTERS = {"rep", "in", "out", "cached", "spend"}

-- a + b for non-negative whole numbers (numbers or decimal strings), exactly,
-- as a decimal string: doubles while both are well inside 2^53, digits past it.
local function rl_int_add(a, b)
  a, b = tostring(a or ""), tostring(b or "")
  if a == "" then a = "0" end
  if b == "" then b = "0" end
  if #a < 16 and #b < 16 then return string.format("%.0f", tonumber(a) + tonumber(b)) end
  local out, carry, i, j = {}, 0, #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local d = carry + (i > 0 and string.byte(a, i) - 48 or 0) + (j > 0 and string.byte(b, j) - 48 or 0)
    out[#out + 1] = d % 10
    carry = math.floor(d / 10)
    i, j = i - 1, j - 1
  end
  local digits = {}
  for n = #out, 1, -1 do digits[#digits + 1] = out[n] end
  return table.concat(digits)
end

local function rl_split(s)
  local t = {}
  for v in string.gmatch(s .. ",", "([^,]*),") do t[#t + 1] = v end
  return t
end

-- The usage id of (project, model, key), allocated at its first use.
local function rl_usage_id(prefix, project, model, key_id)
  local key, who = prefix .. "ui", project .. "|" .. model .. "|" .. key_id
  local id = redis.call("HGET", key, who)
  if id then return id end
  id = tostring(redis.call("HINCRBY", key, "n", 1))
  redis.call("HSET", key, who, id, "#" .. id, who)
  return id
end

-- The usage hash of one resolution at a time.
local function rl_usage_key(prefix, now, r)
  local now_s = math.floor(now / 1000000)
  local start = now_s - now_s % r[2]
  return prefix .. "u:" .. r[1] .. ":" .. start, start
end

-- Adds a whole amount to a decision's counter of one (project, model, key) id in
-- this minute: field suffix "|r" (requests admitted), "|x<outcome>" (refusals) or
-- "|s<outcome>" (admitted, but a shadow limit would have refused).
local function rl_count_one(prefix, now, id, suffix, amount)
  if amount == 0 then return end
  local now_s = math.floor(now / 1000000)
  local start = now_s - now_s % 60
  local key = prefix .. "u:m:" .. start
  if redis.call("HINCRBY", key, id .. suffix, amount) == amount then
    -- a field just created (the key too, perhaps): only then set the expiry, relative
    -- to the scripts' clock, which in tests is not the server's
    redis.call("EXPIRE", key, start + 60 + RL_RESOLUTIONS[1][3] - now_s)
  end
end

-- What a report adds to the usage of one id, checked and then written. Returns
-- a writer (call it to apply) and nil, or nil and the name of a whole counter
-- that would pass RL_MAX_COUNTER in this minute, hour or day (checked before
-- any write, so an overflow refuses the whole report).
-- adds: {rep = n, ["in"] = n, out = n, cached = n, spend = micro-USD}
local function rl_usage_report(prefix, now, id, adds)
  local minute_key, start = rl_usage_key(prefix, now, RL_RESOLUTIONS[1])
  local minute = redis.call("HGET", minute_key, id .. "|u")
  local totals = {minute and rl_split(minute) or {}}
  for r = 2, 3 do
    local raw = redis.call("HGET", rl_usage_key(prefix, now, RL_RESOLUTIONS[r]), id)
    local t = raw and rl_split(raw) or {}
    totals[r] = {t[2], t[3], t[4], t[5]} -- hour and day values begin with requests
  end
  for n = 1, 4 do
    local name = RL_REPORT_COUNTERS[n]
    for r = 1, 3 do
      if (tonumber(totals[r][n]) or 0) + adds[name] > RL_MAX_COUNTER then return nil, name end
    end
  end
  return function()
    local old = totals[1]
    local values = {}
    for n = 1, 4 do values[n] = rl_int_add(old[n], adds[RL_REPORT_COUNTERS[n]]) end
    values[5] = string.format("%.17g", (tonumber(old[5]) or 0) + adds.spend)
    redis.call("HSET", minute_key, id .. "|u", table.concat(values, ","))
    if not minute then
      local now_s = math.floor(now / 1000000)
      redis.call("EXPIRE", minute_key, start + 60 + RL_RESOLUTIONS[1][3] - now_s)
    end
  end, nil
end

-- Appends to a project's request log, newest first, capped and expiring.
local function rl_log(prefix, project, entry, cap, ttl_s)
  local key = prefix .. "log:" .. project
  redis.call("LPUSH", key, cjson.encode(entry))
  redis.call("LTRIM", key, 0, cap - 1)
  redis.call("EXPIRE", key, ttl_s)
end
