--[[
decide.lua: one rate-limit decision, atomically. (lib.lua is prepended.)

Authenticates the caller, replays an earlier answer to the same request,
checks the monthly spend limits, resolves the project's and the organization's
limits for every item (a model and its costs) of the request, evaluates every
applicable bucket, and charges all of them or none. Items naming the same model
share their buckets, and their costs add up. It also counts the decision in the
usage counters and logs refusals.

Authentication comes first: a caller that fails it (outcomes 4 and 6) gets its
refusal and nothing is read or written under its request id, so it can neither
replay someone else's answer nor claim an id. A request id belongs to the
caller that used it first (the same API key; for a trusted caller, the same
project): the record keeps that caller (p, k) and, with an answer, what was
asked (f: models and costs). Another caller, or the same caller asking for
something else, is refused with outcome 9 and nothing is charged.

Everything the script touches lives under one organization prefix
"rl:{org_<id>}:", so every key shares one hash tag (one Cluster slot). Keys the
script can only name after reading the API key record (the project's limits and
buckets) are built from that prefix, which it takes from KEYS[1].

Buckets are continuously draining levels (a token bucket stored as the amount
used): a bucket of limit L over a window of W drains L/W units per unit of
time, and a request of cost c passes when level + c <= L. The buckets of one
scope and model are one hash, rl:{org_x}:b:o:<model> or
rl:{org_x}:b:p:<project>:<model>, a field "<metric>|<window>" per dimension
holding "<level>:<timestamp_us>"; it expires once all would have drained to 0.

KEYS[1]  the organization's limits hash        rl:{org_x}:lim:o
KEYS[2]  the caller record: API key hash        rl:{org_x}:k:<key_id>
         or, for a trusted caller, the project  rl:{org_x}:p:<project_id>
KEYS[3]  the request record                     rl:{org_x}:r:<request_id>

ARGV[1]  caller kind: "k" (API key) or "p" (project id)
ARGV[2]  sha256 hex of the presented API key ("" for kind "p")
ARGV[3]  project id (kind "p"; "" for kind "k")
ARGV[4]  request id
ARGV[5]  "1": the caller chose the request id; remember any answer for replay
         "2": the caller chose it, but every call is decided anew (the id
              still belongs to its first caller, and keeps the reservation)
         "0": the server made the id up, so no record can exist yet
ARGV[6]  request record lifetime, milliseconds
ARGV[7..9]   usage retention after each minute, hour, day bucket, seconds
ARGV[10] request log: entries kept per project
ARGV[11] request log: seconds kept after the last entry
ARGV[12] d, the number of dimensions, then d pairs:
           dimension "metric|window" (e.g. "tokens|minute"), window length in ms
then     m, the number of items, then m groups of 1 + d values:
           model, then the item's cost in each dimension, in dimension order
last     "" to use the server's TIME; tests only: the time, microseconds

Reply: an array
  [1] outcome: 0 allowed, 1 project limit, 2 organization limit,
      3 larger than a limit can ever admit, 4 invalid API key,
      5 model not available, 6 project not found, 7 model blocked by the
      model permissions, 8 monthly spend limit, 9 the request id was used by
      another caller or for another request
  [2] project id ("" when unknown)
  [3] retry after, milliseconds (0 unless outcome 1 or 2)
  [4] index of the binding bucket in the list below (1-based, 0 for none)
  [5] 1 when this is a replay of an earlier answer, else 0
  [6] detail: for outcome 5 or 7 the index of the item (1-based); for outcome 8
      the scope whose spend limit was reached (1 organization, 2 project)
  [7] n, the number of evaluated buckets, then 5 integers per bucket:
      scope (1 organization, 2 project), dimension index (1-based),
      limit, remaining after this decision, milliseconds until full
  then for each item: k, then the indices of its k buckets
]]

local prefix = string.sub(KEYS[1], 1, -6) -- strip "lim:o"
local kind, key_hash, project = ARGV[1], ARGV[2], ARGV[3]
local request_id, remember, chosen_id = ARGV[4], ARGV[5] == "1", ARGV[5] ~= "0"
local record_ttl = tonumber(ARGV[6])
local resolutions = {{"m", 60, tonumber(ARGV[7])}, {"h", 3600, tonumber(ARGV[8])}, {"d", 86400, tonumber(ARGV[9])}}
local log_cap, log_ttl = tonumber(ARGV[10]), tonumber(ARGV[11])
local ndims = tonumber(ARGV[12])
local dims, windows_us, requests_dim, tokens_dim = {}, {}, nil, nil
for i = 1, ndims do
  dims[i] = ARGV[11 + 2 * i]
  windows_us[i] = tonumber(ARGV[12 + 2 * i]) * 1000
  if not requests_dim and string.sub(dims[i], 1, 9) == "requests|" then requests_dim = i end
  if not tokens_dim and string.sub(dims[i], 1, 7) == "tokens|" then tokens_dim = i end
end
local pos = 13 + 2 * ndims
local nitems = tonumber(ARGV[pos])
local items = {}
for j = 1, nitems do
  local base = pos + 1 + (j - 1) * (ndims + 1)
  local costs = {}
  for i = 1, ndims do costs[i] = tonumber(ARGV[base + i]) end
  items[j] = {
    model = ARGV[base], costs = costs,
    requests = requests_dim and costs[requests_dim] or 0, tokens = tokens_dim and costs[tokens_dim] or 0,
  }
end

-- What is asked, as a replay must match it: every item's model, requests and tokens.
local asked = {}
for j, item in ipairs(items) do
  asked[j] = string.format("%s|%.0f|%.0f", item.model, item.requests, item.tokens)
end
local fingerprint = table.concat(asked, ",")

local now = rl_now(ARGV[#ARGV])
local key_id = "-"
local reported = false

-- Only for an authenticated caller: counts the decision, logs a refusal, and
-- remembers the answer (never over another caller's record: outcome 9).
local function finish(reply)
  local outcome = reply[1]
  for _, item in ipairs(items) do
    local counters = {}
    if outcome == 0 then counters.req = item.requests else counters["ref:" .. outcome] = 1 end
    rl_count_usage(prefix, now, resolutions, project .. "|" .. item.model .. "|" .. key_id .. "|", counters)
  end
  if outcome ~= 0 then
    rl_log(prefix, project, {id = request_id, t = math.floor(now / 1000), m = items[1].model, k = key_id,
                             ok = false, r = outcome, tok = items[1].tokens}, log_cap, log_ttl)
  end
  if outcome ~= 9 and (remember or outcome == 0) then
    local record = {reply = reply, rep = reported and 1 or nil, p = project, k = key_id, f = fingerprint}
    if outcome == 0 then
      -- The reservation ReportUsage reconciles against.
      record.m, record.t = {}, {}
      for j, item in ipairs(items) do record.m[j], record.t[j] = item.model, item.tokens end
    end
    redis.call("SET", KEYS[3], cjson.encode(record), "PX", record_ttl)
  end
  return reply
end

local function early(outcome, detail)
  return finish({outcome, project, 0, 0, 0, detail or 0, 0})
end

-- Who is asking. Unauthenticated: refused, and nothing written anywhere.
local unauthenticated = {4, "", 0, 0, 0, 0, 0}
if kind == "k" then
  local rec = redis.call("HMGET", KEYS[2], "h", "p", "r", "u")
  if not rec[1] or rec[1] ~= key_hash or rec[3] == "1" then
    return unauthenticated
  end
  project = rec[2]
  key_id = string.match(KEYS[2], ":k:(.+)$")
  if redis.call("EXISTS", prefix .. "p:" .. project) == 0 then
    return unauthenticated
  end
  -- last use, at most once a second per key, to keep the hot path cheap
  local now_ms = math.floor(now / 1000)
  if not rec[4] or now_ms - tonumber(rec[4]) >= 1000 then
    redis.call("HSET", KEYS[2], "u", now_ms)
  end
elseif redis.call("EXISTS", KEYS[2]) == 0 then
  return {6, project, 0, 0, 0, 0, 0}
end

-- An earlier use of the request id: replayed to its own caller asking the same
-- thing, refused to anyone else. A record without an answer is a usage report
-- that came first; it binds the id to its project only (reports are per project).
if chosen_id then
  local earlier = redis.call("GET", KEYS[3])
  if earlier then
    local rec = cjson.decode(earlier)
    local same_caller = rec.p == project and (rec.reply == nil or rec.k == key_id)
    if not same_caller or (remember and rec.reply and rec.f ~= fingerprint) then
      return early(9)
    end
    if remember and rec.reply then
      rec.reply[5] = 1
      return rec.reply
    end
    reported = remember and rec.rep == 1 -- its usage report came first: decide, but never reconcile again
  end
end

-- Monthly spend limits: reached means refused until next month or a higher limit.
local spend_limits = redis.call("HMGET", prefix .. "spendlim", "o", "p:" .. project)
if spend_limits[1] or spend_limits[2] then
  local spent = redis.call("HMGET", prefix .. "spend:" .. rl_month(now), "o", "p:" .. project)
  for scope = 1, 2 do
    if spend_limits[scope] and tonumber(spent[scope] or "0") >= tonumber(spend_limits[scope]) then
      return early(8, scope)
    end
  end
end

-- Every applicable bucket, once, with its state drained to now. Buckets live
-- in groups, one hash per scope and model (lib.lua); items naming the same
-- model share them.
local buckets, groups, group_of, item_buckets = {}, {}, {}, {}
local proj_limits_key = prefix .. "lim:p:" .. project

local function add(key, scope, dim, limit, cost, mine)
  local g = group_of[key]
  if not g then
    g = {key = key, members = {}, by_dim = {}}
    group_of[key] = g
    groups[#groups + 1] = g
  end
  local b = g.by_dim[dim]
  if not b then
    b = {scope = scope, dim = dim, limit = limit, cost = 0}
    g.by_dim[dim] = b
    g.members[#g.members + 1] = b
    buckets[#buckets + 1] = b
    b.index = #buckets
  end
  b.cost = b.cost + cost
  mine[#mine + 1] = b.index
end

for j, item in ipairs(items) do
  local model = item.model
  local org_limits, proj_limits, available = rl_limits(KEYS[1], proj_limits_key, model, dims)
  if not available then
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
  local mine = {}
  local org_key, proj_key = prefix .. "b:o:" .. model, prefix .. "b:p:" .. project .. ":" .. model
  for i = 1, ndims do
    if org_limits[i] then add(org_key, 1, i, org_limits[i], item.costs[i], mine) end
    if proj_limits[i] then add(proj_key, 2, i, proj_limits[i], item.costs[i], mine) end
  end
  item_buckets[j] = mine
end
for _, g in ipairs(groups) do
  rl_group_load(g.key, g.members, dims, windows_us, now)
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
  for _, g in ipairs(groups) do
    local charged = false
    for _, b in ipairs(g.members) do
      if b.cost > 0 then
        b.level = b.level + b.cost
        charged = true
      end
    end
    if charged then rl_group_store(g.key, g.members, dims, windows_us, now) end
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
return finish(reply)
