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
script can only name after reading the API key record (the project's records,
the spend hash) are built from that prefix, which it takes from KEYS[1].

Buckets are continuously draining levels (a token bucket stored as the amount
used): a bucket of limit L over a window of W drains L/W units per unit of
time, and a request of cost c passes when level + c <= L. The buckets of one
scope and model are one field of the organization's state hash (lib.lua), next
to the resolved configuration of each (project, model): one HMGET reads
configuration and buckets, one HSET writes them. A configuration whose version
is not the hash's "v" is resolved again from the source records (lim:o,
lim:p:<project>, mp, spendlim, price) and cached with the admitted decision's
write. A refused decision writes no state, so it leaves that hash as it was.

The request record (lib.lua, rl_record_*, one delimited string) is written for
an admitted request (ReportUsage reconciles its reservation, and finds its
model there) and for any answer to a caller-chosen id (replay).

Monthly spend limits: a decision is refused (8) once the month's spend of the
organization or the project has reached its limit. An admitted decision under
a spend limit reserves its estimate in the month's spend, in the same step:
the token estimate of each item at the higher of the model's input and output
price. ReportUsage replaces the estimate with the real cost; an estimate never
reported stays charged, as reserved tokens do.

Settings are baked into the script text as RL_* constants (scripts.configured):
RL_DIMS / RL_WINDOWS_US / RL_NDIMS / RL_METRIC_TOKENS (the dimensions, and which
count tokens), RL_LAYOUT, RL_RECORD_TTL_MS, RL_RESOLUTIONS (usage buckets),
RL_LOG_CAP and RL_LOG_TTL_S (request log), RL_EXPIRY_SLACK_MS.

KEYS[1]  the organization's state hash          rl:{org_x}:s
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
ARGV[6]  m, the number of items, then m triples: model, requests, tokens
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

local state_key = KEYS[1]
local prefix = string.sub(state_key, 1, -2) -- strip "s"
local kind, key_hash, project = ARGV[1], ARGV[2], ARGV[3]
local request_id, remember, chosen_id = ARGV[4], ARGV[5] == "1", ARGV[5] ~= "0"
local nitems = tonumber(ARGV[6])
local items, asked, models, model_seen = {}, {}, {}, {}
for j = 1, nitems do
  local base = 4 + 3 * j
  local model, requests, tokens = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  items[j] = {model = model, requests = requests, tokens = tokens}
  -- What is asked, as a replay must match it: every item's model, requests and tokens.
  asked[j] = model .. "|" .. ARGV[base + 1] .. "|" .. ARGV[base + 2]
  if not model_seen[model] then
    model_seen[model] = true
    models[#models + 1] = model
  end
end
local fingerprint = table.concat(asked, ",")

local now = rl_now(ARGV[#ARGV])
local key_id = "-"
local reported_model = nil
local reserved_spend, spend_month = nil, nil
local usage_ids, new_usage_ids = {}, {} -- per model: the usage counters' id (lib.lua)

-- Only for an authenticated caller: counts the decision, logs a refusal, and
-- remembers the answer (never over another caller's record: outcome 9).
local function finish(reply)
  local outcome = reply[1]
  local per_model = {}
  for _, item in ipairs(items) do
    local add = outcome == 0 and item.requests or 1
    per_model[item.model] = (per_model[item.model] or 0) + add
  end
  local counter = outcome == 0 and "req" or "ref:" .. outcome
  for _, model in ipairs(models) do
    rl_count_usage(prefix, now, usage_ids[model], {[counter] = per_model[model]})
  end
  if outcome ~= 0 then
    rl_log(prefix, project, {id = request_id, t = math.floor(now / 1000), m = items[1].model, k = key_id,
                             ok = false, r = outcome, tok = items[1].tokens}, RL_LOG_CAP, RL_LOG_TTL_S)
  end
  if outcome == 9 then return reply end
  if remember or outcome == 0 then
    local record = {p = project, k = key_id, rm = reported_model, f = fingerprint, a = outcome == 0, reply = reply}
    if reserved_spend then record.e, record.em = table.concat(reserved_spend, ","), spend_month end
    redis.call("SET", KEYS[3], rl_record_encode(record), "PX", RL_RECORD_TTL_MS)
  end
  return reply
end

local function early(outcome, detail)
  return finish({outcome, project, 0, 0, 0, detail or 0, 0})
end

-- Who is asking. Unauthenticated: refused, and nothing written anywhere.
local unauthenticated = {4, "", 0, 0, 0, 0, 0}
local key_rec
if kind == "k" then
  key_rec = redis.call("HMGET", KEYS[2], "h", "p", "r", "u")
  if not key_rec[1] or key_rec[1] ~= key_hash or key_rec[3] == "1" then
    return unauthenticated
  end
  project = key_rec[2]
  key_id = string.match(KEYS[2], ":k:(.+)$")
end

-- Configuration and buckets of every model asked for, in one read.
local fields = {"v", "d", "x"}
for _, model in ipairs(models) do
  fields[#fields + 1] = "c:" .. project .. ":" .. model
  fields[#fields + 1] = "o:" .. model
  fields[#fields + 1] = "p:" .. project .. ":" .. model
  fields[#fields + 1] = "u:" .. project .. ":" .. model .. ":" .. key_id
end
local st = redis.call("HMGET", state_key, unpack(fields))
local version, layout_ok, expiry = st[1] or "0", st[2] == RL_LAYOUT, tonumber(st[3])
local configs, states, resolved, cached_any = {}, {}, {}, false
for n, model in ipairs(models) do
  local c = layout_ok and rl_config_decode(st[4 * n], version) or nil
  if c then cached_any = true end
  configs[model] = c
  if layout_ok then
    states["o:" .. model] = st[4 * n + 1]
    states["p:" .. project .. ":" .. model] = st[4 * n + 2]
  end
  usage_ids[model] = st[4 * n + 3]
end

-- A cached configuration exists only for a project that existed when it was
-- cached, and deleting a project changes the version.
if not cached_any then
  local record = kind == "k" and prefix .. "p:" .. project or KEYS[2]
  if redis.call("EXISTS", record) == 0 then
    if kind == "k" then return unauthenticated end
    return {6, project, 0, 0, 0, 0, 0}
  end
end
-- The usage counters' id of (project, model, key), kept in the state hash too.
for _, model in ipairs(models) do
  if not usage_ids[model] then
    usage_ids[model] = rl_usage_id(prefix, project, model, key_id)
    new_usage_ids[model] = true
  end
end
if kind == "k" then
  -- last use, at most once a second per key, to keep the hot path cheap
  local now_ms = math.floor(now / 1000)
  if not key_rec[4] or now_ms - tonumber(key_rec[4]) >= 1000 then
    redis.call("HSET", KEYS[2], "u", now_ms)
  end
end

-- An earlier use of the request id: replayed to its own caller asking the same
-- thing, refused to anyone else. A record without an answer is a usage report
-- that came first; it binds the id to its project only (reports are per project).
if chosen_id then
  local earlier = redis.call("GET", KEYS[3])
  if earlier then
    local rec = rl_record_decode(earlier)
    local same_caller = rec.p == project and (rec.reply == nil or rec.k == key_id)
    if not same_caller or (remember and rec.reply and rec.f ~= fingerprint) then
      return early(9)
    end
    if remember and rec.reply then
      rec.reply[5] = 1
      return rec.reply
    end
    -- its usage report came first: decide, but never reconcile again
    if remember then reported_model = rec.rm end
  end
end

for _, model in ipairs(models) do
  if not configs[model] then
    configs[model] = rl_config_resolve(prefix, project, model)
    resolved[model] = true
  end
end

-- Monthly spend limits: reached means refused until next month or a higher limit.
local spend_cfg = configs[models[1]]
local spend_limited = spend_cfg.spend_o or spend_cfg.spend_p
if spend_limited then
  spend_month = rl_month(now)
  local spent = redis.call("HMGET", prefix .. "spend:" .. spend_month, "o", "p:" .. project)
  local limits = {spend_cfg.spend_o, spend_cfg.spend_p}
  for scope = 1, 2 do
    if limits[scope] and tonumber(spent[scope] or "0") >= limits[scope] then
      return early(8, scope)
    end
  end
end

-- Every applicable bucket, once, with its state drained to now. Buckets live
-- in groups, one state field per scope and model; items naming the same model
-- share them.
local buckets, groups, group_of, item_buckets = {}, {}, {}, {}

local function add(field, scope, dim, limits, cost, mine)
  local g = group_of[field]
  if not g then
    g = {field = field, limits = limits, by_dim = {}}
    g.levels = rl_state_load(states[field], limits, now)
    group_of[field] = g
    groups[#groups + 1] = g
  end
  local b = g.by_dim[dim]
  if not b then
    b = {scope = scope, dim = dim, limit = limits[dim], cost = 0, group = g}
    b.level = g.levels[dim]
    g.by_dim[dim] = b
    buckets[#buckets + 1] = b
    b.index = #buckets
  end
  b.cost = b.cost + cost
  mine[#mine + 1] = b.index
end

for j, item in ipairs(items) do
  local model = item.model
  local c = configs[model]
  if c.verdict ~= 0 then
    return early(c.verdict, j)
  end
  local mine = {}
  local org_field, proj_field = "o:" .. model, "p:" .. project .. ":" .. model
  for i = 1, RL_NDIMS do
    local cost = RL_METRIC_TOKENS[i] and item.tokens or item.requests
    if c.org[i] then add(org_field, 1, i, c.org, cost, mine) end
    if c.proj[i] then add(proj_field, 2, i, c.proj, cost, mine) end
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
    local need = (b.level + b.cost - b.limit) * RL_WINDOWS_US[b.dim] / b.limit
    if binding == 0 or need > wait then
      outcome, binding, wait = b.scope == 2 and 1 or 2, n, need
    end
  end
end

if outcome == 0 then
  -- One write: the charged groups, the configurations just resolved, and the
  -- hash's layout and expiry when they need it.
  local writes, longest = {}, 0
  for _, b in ipairs(buckets) do
    if b.cost > 0 then
      b.level = b.level + b.cost
      b.group.levels[b.dim] = b.level
      b.group.charged = true
    end
  end
  for _, g in ipairs(groups) do
    if g.charged then
      local packed, drain = rl_state_pack(g.levels, g.limits, now)
      writes[#writes + 1] = g.field
      writes[#writes + 1] = packed
      if drain > longest then longest = drain end
    end
  end
  for model in pairs(resolved) do
    writes[#writes + 1] = "c:" .. project .. ":" .. model
    writes[#writes + 1] = rl_config_encode(version, configs[model])
  end
  for model in pairs(new_usage_ids) do
    writes[#writes + 1] = "u:" .. project .. ":" .. model .. ":" .. key_id
    writes[#writes + 1] = usage_ids[model]
  end
  if not layout_ok then
    writes[#writes + 1] = "d"
    writes[#writes + 1] = RL_LAYOUT
  end
  local expire_at = rl_state_expiry(writes, layout_ok and expiry or nil, math.floor(now / 1000) + longest)
  if #writes > 0 then redis.call("HSET", state_key, unpack(writes)) end
  if expire_at then redis.call("PEXPIRE", state_key, expire_at - math.floor(now / 1000)) end

  -- Spend reserved at the estimate, in the month the limit is checked against.
  if spend_limited then
    local total = 0
    reserved_spend = {}
    for j, item in ipairs(items) do
      local price = configs[item.model].price or 0
      reserved_spend[j] = string.format("%.17g", item.tokens * price)
      total = total + item.tokens * price
    end
    if total > 0 then
      rl_add_spend(prefix, spend_month, project, total)
    else
      reserved_spend = nil
    end
  end
end

local reply = {outcome, project, math.ceil(wait / 1000), binding, 0, 0, #buckets}
for _, b in ipairs(buckets) do
  local remaining = math.floor(b.limit - b.level + 1e-9)
  if remaining < 0 then remaining = 0 end
  local reset = 0
  if b.limit > 0 then reset = math.ceil(b.level * RL_WINDOWS_US[b.dim] / b.limit / 1000) end
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
