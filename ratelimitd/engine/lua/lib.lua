--[[
lib.lua: functions shared by the scripts that touch buckets and usage.
scripts.py puts this text in front of decide.lua and report.lua, so each is
still one self-contained script (one EVALSHA), and the bucket arithmetic and
limit resolution exist once.

Units: time in microseconds (from TIME, or the test clock in tests), window
lengths in microseconds, levels in the metric's units.
]]

-- The server's clock, or (tests only) the time the caller passes.
local function rl_now(given)
  if given ~= "" then
    return tonumber(given)
  end
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- A bucket's level from its stored "<level>:<t_us>", drained to now: it loses
-- limit/window units per microsecond.
local function rl_drain(state, limit, window_us, now)
  if not state then return 0 end
  local l, t = string.match(state, "^([^:]+):(.+)$")
  return math.max(0, tonumber(l) - (now - tonumber(t)) * limit / window_us)
end

-- A bucket group is the buckets of one scope and model: one hash, a field per
-- dimension, so a decision reads and writes each group in one call each.
-- members: {{dim = i, limit = L}, ...}; sets member.level.
local function rl_group_load(key, members, dims, windows_us, now)
  local fields = {}
  for n, m in ipairs(members) do fields[n] = dims[m.dim] end
  local states = redis.call("HMGET", key, unpack(fields))
  for n, m in ipairs(members) do m.level = rl_drain(states[n], m.limit, windows_us[m.dim], now) end
end

-- Writes every member's level (members must be all the group's buckets, so
-- the expiry covers each), expiring the hash once the fullest would have drained.
local function rl_group_store(key, members, dims, windows_us, now)
  local args, ttl = {}, 0
  for _, m in ipairs(members) do
    args[#args + 1] = dims[m.dim]
    args[#args + 1] = string.format("%.17g:%d", m.level, now)
    if m.limit > 0 then
      local drain = math.ceil(m.level * windows_us[m.dim] / m.limit / 1000)
      if drain > ttl then ttl = drain end
    end
  end
  if ttl == 0 then
    redis.call("DEL", key)
    return
  end
  redis.call("HSET", key, unpack(args))
  redis.call("PEXPIRE", key, ttl + 1000)
end

-- The limits of one model: per dimension, the organization's limit (the
-- model's own entries if it has any, else the "*" entries) and the project's
-- custom limit (the model's entry, else the project's "*" entry). Returns
-- org, project (tables indexed by dimension, nil = none) and whether the
-- organization has any limit for the model at all.
local function rl_limits(org_key, proj_key, model, dims)
  local n = #dims
  local fields = {}
  for i = 1, n do
    fields[i] = model .. "|" .. dims[i]
    fields[n + i] = "*|" .. dims[i]
  end
  local org = redis.call("HMGET", org_key, unpack(fields))
  local offset = n
  for i = 1, n do
    if org[i] then offset = 0 break end
  end
  local org_limits, any = {}, false
  for i = 1, n do
    local v = org[offset + i]
    if v then org_limits[i] = tonumber(v) any = true end
  end
  local proj = redis.call("HMGET", proj_key, unpack(fields))
  local proj_limits = {}
  for i = 1, n do
    local v = proj[i] or proj[n + i]
    if v then proj_limits[i] = tonumber(v) end
  end
  return org_limits, proj_limits, any
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

-- The largest total an integer usage counter may reach. HINCRBY fails past
-- 2^63 - 1, and only after whatever the script wrote before it; 2^62 is exact
-- in a Lua number, so the check below is too.
local RL_MAX_COUNTER = 2 ^ 62

-- The usage hash of one resolution at a time.
local function rl_usage_key(prefix, now, r)
  local now_s = math.floor(now / 1000000)
  local start = now_s - now_s % r[2]
  return prefix .. "u:" .. r[1] .. ":" .. start, start
end

-- The name of an integer counter that adding `counters` would take past
-- RL_MAX_COUNTER, or nil when all fit. A script calls it before its first
-- write, so an overflow refuses the whole call instead of half applying it.
local function rl_usage_overflow(prefix, now, resolutions, who, counters)
  local names, fields = {}, {}
  for name in pairs(counters) do
    names[#names + 1] = name
    fields[#fields + 1] = who .. name
  end
  for _, r in ipairs(resolutions) do
    local totals = redis.call("HMGET", rl_usage_key(prefix, now, r), unpack(fields))
    for n, name in ipairs(names) do
      if (tonumber(totals[n]) or 0) + counters[name] > RL_MAX_COUNTER then return name end
    end
  end
  return nil
end

-- Adds counters to the usage of one (project, model, key) at each resolution.
-- resolutions: {{"m", 60, ttl_s}, {"h", 3600, ttl_s}, {"d", 86400, ttl_s}}
-- counters: {name = whole amount, ...}; fractional: {name = amount, ...} (spend),
-- kept apart because a whole amount of spend added with HINCRBY to a fractional
-- total fails (and a large one is written "1e+18", which HINCRBY refuses too).
local function rl_count_usage(prefix, now, resolutions, who, counters, fractional)
  local amounts = {}
  for name, amount in pairs(counters) do amounts[name] = {amount, "HINCRBY", string.format("%.0f", amount)} end
  for name, amount in pairs(fractional or {}) do
    amounts[name] = {amount, "HINCRBYFLOAT", string.format("%.17g", amount)}
  end
  for _, r in ipairs(resolutions) do
    local key, start = rl_usage_key(prefix, now, r)
    local created = false
    for name, a in pairs(amounts) do
      local amount = a[1]
      if amount ~= 0 then
        local total = tonumber(redis.call(a[2], key, who .. name, a[3]))
        -- a field just created (the key too, perhaps): only then set the expiry
        if total == amount then created = true end
      end
    end
    if created then redis.call("EXPIREAT", key, start + r[2] + r[3]) end
  end
end

-- Appends to a project's request log, newest first, capped and expiring.
local function rl_log(prefix, project, entry, cap, ttl_s)
  local key = prefix .. "log:" .. project
  redis.call("LPUSH", key, cjson.encode(entry))
  redis.call("LTRIM", key, 0, cap - 1)
  redis.call("EXPIRE", key, ttl_s)
end
