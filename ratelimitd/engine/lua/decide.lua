--[[
decide.lua: one rate-limit decision, atomically.

Authenticates the caller, resolves the project's and the organization's limits
for every item (a model and its costs) of the request, evaluates every
applicable bucket, and charges all of them or none. Items naming the same
model share their buckets, and their costs add up.

Everything the script touches lives under one organization prefix
"rl:{org_<id>}:", so every key shares one hash tag (one Cluster slot). Keys the
script can only name after reading the API key record (the project's limits and
buckets) are built from that prefix, which it takes from KEYS[1].

Buckets are continuously draining levels (a token bucket stored as the amount
used): a bucket of limit L over a window of W microseconds drains L/W units per
microsecond, and a request of cost c passes when level + c <= L. A bucket's
value is "<level>:<timestamp_us>" and it expires once it would have drained
to 0, so idle buckets cost no memory.

KEYS[1]  the organization's limits hash        rl:{org_x}:lim:o
KEYS[2]  the caller record: API key hash        rl:{org_x}:k:<key_id>
         or, for a trusted caller, the project  rl:{org_x}:p:<project_id>
KEYS[3]  the request record                     rl:{org_x}:r:<request_id>
KEYS[4]  optional: a manual clock (tests only), microseconds as a string

ARGV[1]  caller kind: "k" (API key) or "p" (project id)
ARGV[2]  sha256 hex of the presented API key ("" for kind "p")
ARGV[3]  project id (kind "p"; "" for kind "k")
ARGV[4]  request id
ARGV[5]  "1" when the caller chose the request id: remember any answer for replay
ARGV[6]  request record lifetime, milliseconds
ARGV[7]  d, the number of dimensions, then d pairs:
           dimension "metric|window" (e.g. "tokens|minute"), window length in ms
then     m, the number of items, then m groups of 1 + d values:
           model, then the item's cost in each dimension, in dimension order

Reply: an array
  [1] outcome: 0 allowed, 1 project limit, 2 organization limit,
      3 larger than a limit can ever admit, 4 invalid API key,
      5 model not available, 6 project not found, 7 model blocked by the
      model permissions (8 is reserved)
  [2] project id ("" when unknown)
  [3] retry after, milliseconds (0 unless outcome 1 or 2)
  [4] index of the binding bucket in the list below (1-based, 0 for none)
  [5] 1 when this is a replay of an earlier answer, else 0
  [6] index of the item that decided outcome 5 or 7 (1-based, else 0)
  [7] n, the number of evaluated buckets, then 5 integers per bucket:
      scope (1 organization, 2 project), dimension index (1-based),
      limit, remaining after this decision, milliseconds until full
  then for each item: k, then the indices of its k buckets
]]

local prefix = string.sub(KEYS[1], 1, -6) -- strip "lim:o"
local kind, key_hash, project = ARGV[1], ARGV[2], ARGV[3]
local request_id, remember = ARGV[4], ARGV[5] == "1"
local record_ttl = tonumber(ARGV[6])
local ndims = tonumber(ARGV[7])
local dims, windows_us = {}, {}
for i = 1, ndims do
  dims[i] = ARGV[6 + 2 * i]
  windows_us[i] = tonumber(ARGV[7 + 2 * i]) * 1000
end
local pos = 8 + 2 * ndims
local nitems = tonumber(ARGV[pos])
local items = {}
for j = 1, nitems do
  local base = pos + 1 + (j - 1) * (ndims + 1)
  local costs = {}
  for i = 1, ndims do costs[i] = tonumber(ARGV[base + i]) end
  items[j] = {model = ARGV[base], costs = costs}
end

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

local function early(outcome, item)
  return finish({outcome, outcome == 4 and "" or project, 0, 0, 0, item or 0, 0})
end

-- Who is asking.
local key_id = ""
if kind == "k" then
  local rec = redis.call("HMGET", KEYS[2], "h", "p", "r", "u")
  if not rec[1] or rec[1] ~= key_hash or rec[3] == "1" then
    return early(4)
  end
  project = rec[2]
  key_id = string.match(KEYS[2], ":k:(.+)$")
  if redis.call("EXISTS", prefix .. "p:" .. project) == 0 then
    return early(4)
  end
  -- last use, at most once a second per key, to keep the hot path cheap
  local now_ms = math.floor(now / 1000)
  if not rec[4] or now_ms - tonumber(rec[4]) >= 1000 then
    redis.call("HSET", KEYS[2], "u", now_ms)
  end
elseif redis.call("EXISTS", KEYS[2]) == 0 then
  return early(6)
end

-- Every applicable bucket, once, with its state drained to now. An item's
-- organization limits are the model's own entries, or else the "*" entries;
-- its project limit per dimension is the model's custom entry, else the
-- project's "*" entry, else none (the organization bucket covers it).
local buckets, by_key, item_buckets = {}, {}, {}
local proj_limits = prefix .. "lim:p:" .. project

local function bucket(key, scope, dim, limit)
  local b = by_key[key]
  if not b then
    local level = 0
    local state = redis.call("GET", key)
    if state then
      local l, t = string.match(state, "^([^:]+):(.+)$")
      level = math.max(0, tonumber(l) - (now - tonumber(t)) * limit / windows_us[dim])
    end
    b = {scope = scope, dim = dim, limit = limit, level = level, cost = 0, key = key}
    buckets[#buckets + 1] = b
    b.index = #buckets
    by_key[key] = b
  end
  return b
end

for j, item in ipairs(items) do
  local model = item.model
  local fields = {}
  for i = 1, ndims do
    fields[i] = model .. "|" .. dims[i]
    fields[ndims + i] = "*|" .. dims[i]
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
    return early(5, j)
  end
  -- Model permissions (keys.py "mp"): the organization's allow- or block-list,
  -- then the project's, which can only narrow it. Refused before any charge.
  local mp = redis.call("HMGET", prefix .. "mp", "o", "o|" .. model, "p:" .. project, "p:" .. project .. "|" .. model)
  for s = 1, 3, 2 do
    if (mp[s] == "allow" and not mp[s + 1]) or (mp[s] == "block" and mp[s + 1]) then
      return early(7, j)
    end
  end
  local proj = redis.call("HMGET", proj_limits, unpack(fields))
  local mine = {}
  for i = 1, ndims do
    local org_limit, proj_limit = org[offset + i], proj[i] or proj[ndims + i]
    if org_limit then
      local b = bucket(prefix .. "b:o:" .. model .. "|" .. dims[i], 1, i, tonumber(org_limit))
      b.cost = b.cost + item.costs[i]
      mine[#mine + 1] = b.index
    end
    if proj_limit then
      local b = bucket(prefix .. "b:p:" .. project .. ":" .. model .. "|" .. dims[i], 2, i, tonumber(proj_limit))
      b.cost = b.cost + item.costs[i]
      mine[#mine + 1] = b.index
    end
  end
  item_buckets[j] = mine
end

-- Decide: "never passable" beats "not now"; among "not now" the bucket that
-- frees up last binds, and its wait is the retry-after.
local outcome, binding, wait = 0, 0, 0
for n, b in ipairs(buckets) do
  if b.cost > b.limit then
    if outcome ~= 3 then outcome, binding, wait = 3, n, 0 end
  elseif outcome ~= 3 and b.level + b.cost > b.limit + 1e-9 then
    local need = (b.level + b.cost - b.limit) * windows_us[b.dim] / b.limit
    if binding == 0 or need > wait then
      outcome, binding, wait = b.scope == 2 and 1 or 2, n, need
    end
  end
end

if outcome == 0 then
  for _, b in ipairs(buckets) do
    if b.cost > 0 then
      b.level = b.level + b.cost
      local ttl = math.ceil(b.level * windows_us[b.dim] / b.limit / 1000) + 1000
      redis.call("SET", b.key, string.format("%.17g:%d", b.level, now), "PX", ttl)
    end
  end
end

local reply = {outcome, project, math.ceil(wait / 1000), binding, 0, 0, #buckets}
for _, b in ipairs(buckets) do
  local remaining = math.floor(b.limit - b.level + 1e-9)
  if remaining < 0 then remaining = 0 end
  local reset = 0
  if b.limit > 0 then reset = math.ceil(b.level * windows_us[b.dim] / b.limit / 1000) end
  reply[#reply + 1] = b.scope
  reply[#reply + 1] = b.dim
  reply[#reply + 1] = b.limit
  reply[#reply + 1] = remaining
  reply[#reply + 1] = reset
end
for j = 1, nitems do
  local mine = item_buckets[j]
  reply[#reply + 1] = #mine
  for _, index in ipairs(mine) do reply[#reply + 1] = index end
end

if outcome == 0 then
  -- The reservation usage reports reconcile against; also the replay answer.
  local models = {}
  for j, item in ipairs(items) do models[j] = item.model end
  redis.call("SET", KEYS[3], cjson.encode({reply = reply, p = project, k = key_id, m = models}), "PX", record_ttl)
  return reply
end
return finish(reply)
