--[[
decide.lua: one rate-limit decision, atomically.

Authenticates the caller, resolves the project's and the organization's limits
for the model, evaluates every applicable bucket, and charges all of them or
none. Everything it touches lives under one organization prefix
"rl:{org_<id>}:", so every key shares one hash tag (one Cluster slot); keys the
script can only name after reading the API key record (the project's limits and
buckets) are built from that prefix.

Buckets are continuously draining levels (a token bucket stored as the amount
used): a bucket of limit L over a window of W microseconds drains L/W units per
microsecond. A request of cost c passes when level + c <= L. Values:
  "<level>:<timestamp_us>", expiring once the level would have drained to 0.

KEYS[1]  the organization's limits hash        rl:{org_x}:lim:o
KEYS[2]  the caller record: API key hash        rl:{org_x}:k:<key_id>
         or, for a trusted caller, the project  rl:{org_x}:p:<project_id>
KEYS[3]  the request record                     rl:{org_x}:r:<request_id>
KEYS[4]  optional: a manual clock (tests only), microseconds as a string

ARGV[1]  caller kind: "k" (API key) or "p" (project id)
ARGV[2]  sha256 hex of the presented API key ("" for kind "p")
ARGV[3]  project id (kind "p"; "" for kind "k")
ARGV[4]  model
ARGV[5]  request id
ARGV[6]  "1" when the caller chose the request id: remember any answer for replay
ARGV[7]  request record lifetime, milliseconds
ARGV[8]  n, the number of dimensions, then n triples:
           ARGV[9+3i]   dimension "metric|window", e.g. "tokens|minute"
           ARGV[10+3i]  window length, milliseconds
           ARGV[11+3i]  cost of this request in the metric's units

Reply: an array
  [1] outcome: 0 allowed, 1 project limit, 2 organization limit,
      3 larger than a limit can ever admit, 4 invalid API key,
      5 model not available, 6 project not found
  [2] project id ("" when unknown)
  [3] retry after, milliseconds (0 unless outcome 1 or 2)
  [4] index of the binding bucket in the list below (1-based, 0 for none)
  [5] 1 when this is a replay of an earlier answer, else 0
  then 5 integers per evaluated bucket:
      scope (1 organization, 2 project), dimension index (1-based),
      limit, remaining after this decision, milliseconds until full
]]

local prefix = string.sub(KEYS[1], 1, -6) -- strip "lim:o"
local kind, key_hash, project = ARGV[1], ARGV[2], ARGV[3]
local model, request_id, remember = ARGV[4], ARGV[5], ARGV[6] == "1"
local record_ttl = tonumber(ARGV[7])
local ndims = tonumber(ARGV[8])

if remember then
  local earlier = redis.call("GET", KEYS[3])
  if earlier then
    local reply = cjson.decode(earlier).reply
    reply[5] = 1
    return reply
  end
end

local now
if KEYS[4] then
  now = tonumber(redis.call("GET", KEYS[4]) or "0")
else
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function finish(reply)
  if remember then
    redis.call("SET", KEYS[3], cjson.encode({reply = reply}), "PX", record_ttl)
  end
  return reply
end

-- Who is asking.
local key_id = ""
if kind == "k" then
  local rec = redis.call("HMGET", KEYS[2], "h", "p", "r", "u")
  if not rec[1] or rec[1] ~= key_hash or rec[3] == "1" then
    return finish({4, "", 0, 0, 0})
  end
  project = rec[2]
  key_id = string.match(KEYS[2], ":k:(.+)$")
  if redis.call("EXISTS", prefix .. "p:" .. project) == 0 then
    return finish({4, "", 0, 0, 0})
  end
  -- last use, at most once a second per key to keep the hot path cheap
  local now_ms = math.floor(now / 1000)
  if not rec[4] or now_ms - tonumber(rec[4]) >= 1000 then
    redis.call("HSET", KEYS[2], "u", now_ms)
  end
elseif redis.call("EXISTS", KEYS[2]) == 0 then
  return finish({6, "", 0, 0, 0})
end

-- Limits: the model's own organization entries, or else the "*" entries.
local fields = {}
for i = 0, ndims - 1 do
  local dim = ARGV[9 + 3 * i]
  fields[i + 1] = model .. "|" .. dim
  fields[ndims + i + 1] = "*|" .. dim
end
local org = redis.call("HMGET", KEYS[1], unpack(fields))
local own = false
for i = 1, ndims do
  if org[i] then own = true break end
end
local offset = own and 0 or ndims
local any = false
for i = 1, ndims do
  if org[offset + i] then any = true break end
end
if not any then
  return finish({5, project, 0, 0, 0})
end
local proj = redis.call("HMGET", prefix .. "lim:p:" .. project, unpack(fields))

-- Every applicable bucket, with its state drained to now.
local buckets = {}
for i = 1, ndims do
  local base = 9 + 3 * (i - 1)
  local dim, window_us, cost = ARGV[base], tonumber(ARGV[base + 1]) * 1000, tonumber(ARGV[base + 2])
  local limits = {org[offset + i], proj[i] or proj[ndims + i]}
  local keys = {prefix .. "b:o:" .. model .. "|" .. dim, prefix .. "b:p:" .. project .. ":" .. model .. "|" .. dim}
  for scope = 1, 2 do
    if limits[scope] then
      local limit = tonumber(limits[scope])
      local level = 0
      local state = redis.call("GET", keys[scope])
      if state then
        local l, t = string.match(state, "^([^:]+):(.+)$")
        level = math.max(0, tonumber(l) - (now - tonumber(t)) * limit / window_us)
      end
      buckets[#buckets + 1] = {scope = scope, dim = i, limit = limit, level = level,
                               cost = cost, window_us = window_us, key = keys[scope]}
    end
  end
end

-- Decide: never passable beats "not now"; among "not now" the bucket that
-- frees up last binds, and its wait is the retry-after.
local outcome, binding, wait = 0, 0, 0
for n, b in ipairs(buckets) do
  if b.cost > b.limit then
    if outcome ~= 3 then outcome, binding, wait = 3, n, 0 end
  elseif outcome ~= 3 and b.level + b.cost > b.limit + 1e-9 then
    local need = (b.level + b.cost - b.limit) * b.window_us / b.limit
    if binding == 0 or need > wait then
      outcome, binding, wait = b.scope == 2 and 1 or 2, n, need
    end
  end
end

if outcome == 0 then
  for _, b in ipairs(buckets) do
    if b.cost > 0 then
      b.level = b.level + b.cost
      local ttl = math.ceil(b.level * b.window_us / b.limit / 1000) + 1000
      redis.call("SET", b.key, string.format("%.17g:%d", b.level, now), "PX", ttl)
    end
  end
end

local reply = {outcome, project, math.ceil(wait / 1000), binding, 0}
for _, b in ipairs(buckets) do
  local remaining = math.floor(b.limit - b.level + 1e-9)
  if remaining < 0 then remaining = 0 end
  local reset = 0
  if b.limit > 0 then reset = math.ceil(b.level * b.window_us / b.limit / 1000) end
  reply[#reply + 1] = b.scope
  reply[#reply + 1] = b.dim
  reply[#reply + 1] = b.limit
  reply[#reply + 1] = remaining
  reply[#reply + 1] = reset
end

if outcome == 0 then
  -- The reservation ReportUsage reconciles against; also the replay answer.
  redis.call("SET", KEYS[3], cjson.encode({reply = reply, p = project, k = key_id, m = model}), "PX", record_ttl)
  return reply
end
return finish(reply)
