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
model there) and for any answer to a caller-chosen id (replay). It holds the
answer only when ARGV[5] is "1": only then can a later call replay it.

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
ARGV[3]  project id (kind "p"); the API key's id (kind "k", as in KEYS[2])
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
local kind, key_hash = ARGV[1], ARGV[2]
local project = kind == "p" and ARGV[3] or ""
local request_id, remember, chosen_id = ARGV[4], ARGV[5] == "1", ARGV[5] ~= "0"
local nitems = tonumber(ARGV[6])

-- The models asked for, in order of first appearance, and what each item's cost
-- adds to its model's buckets: items naming the same model share them. Parallel
-- arrays and no table per item or bucket: allocations are much of a decision's
-- cost in Valkey's Lua.
local models, model_of, item_model, m_requests, m_tokens, nmodels = {}, {}, {}, {}, {}, 0
local fingerprint -- what is asked, as a replay must match it: "<model>|<requests>|<tokens>,..."
for j = 1, nitems do
  local base = 4 + 3 * j
  local model = ARGV[base]
  local m = model_of[model]
  if not m then
    nmodels = nmodels + 1
    m = nmodels
    models[m], model_of[model], m_requests[m], m_tokens[m] = model, m, 0, 0
  end
  item_model[j] = m
  m_requests[m] = m_requests[m] + tonumber(ARGV[base + 1])
  m_tokens[m] = m_tokens[m] + tonumber(ARGV[base + 2])
  local asked = model .. "|" .. ARGV[base + 1] .. "|" .. ARGV[base + 2]
  fingerprint = j == 1 and asked or fingerprint .. "," .. asked
end

local now = rl_now(ARGV[#ARGV])
local key_id = "-"
local reported_model = nil
local reserved_spend, spend_month = nil, nil
local usage_ids, new_usage_ids = {}, nil -- per model: the usage counters' id (lib.lua)

-- Only for an authenticated caller: counts the decision, logs a refusal, and
-- remembers the answer (never over another caller's record: outcome 9).
local function finish(reply)
  local outcome = reply[1]
  if outcome == 0 then
    for m = 1, nmodels do
      rl_count_one(prefix, now, usage_ids[m], "|r", m_requests[m])
    end
  else
    -- one refusal per item
    local refused = {}
    for j = 1, nitems do
      local m = item_model[j]
      refused[m] = (refused[m] or 0) + 1
    end
    for m = 1, nmodels do
      rl_count_one(prefix, now, usage_ids[m], "|x" .. outcome, refused[m])
    end
    rl_log(prefix, project, {id = request_id, t = math.floor(now / 1000), m = ARGV[7], k = key_id,
                             ok = false, r = outcome, tok = tonumber(ARGV[9])}, RL_LOG_CAP, RL_LOG_TTL_S)
  end
  if outcome == 9 then return reply end
  if remember or outcome == 0 then
    -- the answer only where a replay may read it: turning ~40 numbers into text is
    -- a good part of a decision's cost
    redis.call("SET", KEYS[3], rl_record_encode(project, key_id, reported_model, fingerprint, outcome == 0,
      reserved_spend and table.concat(reserved_spend, ","), reserved_spend and spend_month, remember and reply or nil),
      "PX", RL_RECORD_TTL_MS)
  end
  return reply
end

local function early(outcome, detail)
  return finish({outcome, project, 0, 0, 0, detail or 0, 0})
end

-- Who is asking. Unauthenticated: refused, and nothing written anywhere.
local key_rec
if kind == "k" then
  key_rec = redis.call("HMGET", KEYS[2], "h", "p", "r", "u")
  if not key_rec[1] or key_rec[1] ~= key_hash or key_rec[3] == "1" then
    return {4, "", 0, 0, 0, 0, 0}
  end
  project, key_id = key_rec[2], ARGV[3]
end

-- Configuration and buckets of every model asked for, in one read: per model its
-- configuration, organization state, project state and usage id (4 fields).
local model = models[1]
local fields = {"v", "d", "x", "c:" .. project .. ":" .. model, "o:" .. model, "p:" .. project .. ":" .. model,
                "u:" .. project .. ":" .. model .. ":" .. key_id}
for m = 2, nmodels do
  model = models[m]
  fields[4 * m], fields[4 * m + 1] = "c:" .. project .. ":" .. model, "o:" .. model
  fields[4 * m + 2], fields[4 * m + 3] = "p:" .. project .. ":" .. model, "u:" .. project .. ":" .. model .. ":" .. key_id
end
local st = redis.call("HMGET", state_key, unpack(fields))
local version, layout_ok, expiry = st[1] or "0", st[2] == RL_LAYOUT, tonumber(st[3])
local configs, resolved, cached_any = {}, nil, false
for m = 1, nmodels do
  local c = layout_ok and rl_config_decode(st[4 * m], tonumber(version)) or nil
  if c then cached_any = true end
  configs[m] = c
  usage_ids[m] = st[4 * m + 3]
end

-- A cached configuration exists only for a project that existed when it was
-- cached, and deleting a project changes the version.
if not cached_any then
  local record = kind == "k" and prefix .. "p:" .. project or KEYS[2]
  if redis.call("EXISTS", record) == 0 then
    if kind == "k" then return {4, "", 0, 0, 0, 0, 0} end
    return {6, project, 0, 0, 0, 0, 0}
  end
end
-- The usage counters' id of (project, model, key), kept in the state hash too.
for m = 1, nmodels do
  if not usage_ids[m] then
    usage_ids[m] = rl_usage_id(prefix, project, models[m], key_id)
    new_usage_ids = new_usage_ids or {}
    new_usage_ids[m] = true
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
    -- (a record without f is a usage report that came first)
    local same_caller = rec.p == project and (rec.f == "" or rec.k == key_id)
    if not same_caller or (remember and rec.f ~= "" and rec.f ~= fingerprint) then
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

for m = 1, nmodels do
  if not configs[m] then
    configs[m] = rl_config_resolve(prefix, version, project, models[m])
    resolved = resolved or {}
    resolved[m] = true
  end
end

-- Monthly spend limits: reached means refused until next month or a higher limit.
local spend_cfg = configs[1]
local spend_o, spend_p = spend_cfg[3], spend_cfg[4]
local spend_limited = spend_o >= 0 or spend_p >= 0
if spend_limited then
  spend_month = rl_month(now)
  local spent = redis.call("HMGET", prefix .. "spend:" .. spend_month, "o", "p:" .. project)
  if spend_o >= 0 and tonumber(spent[1] or "0") >= spend_o then return early(8, 1) end
  if spend_p >= 0 and tonumber(spent[2] or "0") >= spend_p then return early(8, 2) end
end

-- The first item (in order) whose model may not be used is the refusal's detail.
for j = 1, nitems do
  local verdict = configs[item_model[j]][2]
  if verdict ~= 0 then return early(verdict, j) end
end

-- Every applicable bucket, once, with its state drained to now: per model, per
-- dimension, the organization's bucket then the project's, so a model's buckets
-- are m_first[m] .. nb at its end. A bucket's five reply slots (from r0 + 1) hold
-- its scope, dimension and limit, and until the reply is filled in, its group
-- (groups[g]: the model's state of its scope, rl_state_read; 2m - 1 is model m's
-- organization state, 2m its project's) and its cost: no table per bucket.
local reply = {0, project, 0, 0, 0, 0, 0}
local r0 = 7
local nb, groups, m_first = 0, {}, {}
for m = 1, nmodels do
  m_first[m] = nb + 1
  local c = configs[m]
  local requests, tokens = m_requests[m], m_tokens[m]
  local og, pg
  for i = 1, RL_NDIMS do
    local cost = RL_METRIC_TOKENS[i] and tokens or requests
    for scope = 1, 2 do
      local limit = c[(scope == 1 and RL_ORG or RL_PROJ) + i]
      if limit >= 0 then
        local g = 2 * m - 2 + scope
        if not groups[g] then
          local s = rl_state_read(layout_ok and st[4 * m + scope] or nil)
          rl_state_drain(s, c, scope == 1 and RL_ORG or RL_PROJ, now)
          groups[g] = s
        end
        nb = nb + 1
        local r = r0 + 5 * nb
        reply[r - 4], reply[r - 3], reply[r - 2], reply[r - 1], reply[r] = scope, i, limit, g, cost
      end
    end
  end
end

-- Decide: "never passable" beats "not now"; among "not now" the bucket that
-- frees up last binds, and its wait is the retry-after.
local outcome, binding, wait = 0, 0, 0
for n = 1, nb do
  local r = r0 + 5 * n
  local dim, limit, g, cost = reply[r - 3], reply[r - 2], reply[r - 1], reply[r]
  local level = groups[g][dim + 1]
  if cost > limit then
    if outcome ~= 3 then outcome, binding, wait = 3, n, 0 end
  elseif outcome ~= 3 and level + cost > limit + 1e-9 then
    local need = (level + cost - limit) * RL_WINDOWS_US[dim] / limit
    if binding == 0 or need > wait then
      outcome, binding, wait = reply[r - 4] == 2 and 1 or 2, n, need
    end
  end
end

if outcome == 0 then
  -- One write: the charged groups, the configurations just resolved, and the
  -- hash's layout and expiry when they need it.
  local charged = {}
  for n = 1, nb do
    local r = r0 + 5 * n
    local cost = reply[r]
    if cost > 0 then
      local g, i = reply[r - 1], reply[r - 3] + 1
      local s = groups[g]
      s[i] = s[i] + cost
      charged[g] = true
    end
  end
  local writes, w, longest = {}, 0, 0
  for g = 1, 2 * nmodels do
    if charged[g] then
      local m = math.ceil(g / 2)
      local packed, drain = rl_state_pack(groups[g], configs[m], g % 2 == 1 and RL_ORG or RL_PROJ, now)
      writes[w + 1], writes[w + 2], w = fields[4 * m + 2 - g % 2], packed, w + 2
      if drain > longest then longest = drain end
    end
  end
  if resolved then
    for m in pairs(resolved) do
      writes[w + 1], writes[w + 2], w = fields[4 * m], rl_config_encode(configs[m]), w + 2
    end
  end
  if new_usage_ids then
    for m in pairs(new_usage_ids) do
      writes[w + 1], writes[w + 2], w = fields[4 * m + 3], usage_ids[m], w + 2
    end
  end
  if not layout_ok then
    writes[w + 1], writes[w + 2], w = "d", RL_LAYOUT, w + 2
  end
  local now_ms = math.floor(now / 1000)
  local expire_at = rl_state_expiry(writes, layout_ok and expiry or nil, now_ms + longest)
  if #writes > 0 then redis.call("HSET", state_key, unpack(writes)) end
  if expire_at then redis.call("PEXPIRE", state_key, expire_at - now_ms) end

  -- Spend reserved at the estimate, in the month the limit is checked against.
  if spend_limited then
    local total = 0
    reserved_spend = {}
    for j = 1, nitems do
      local m = item_model[j]
      local price, tokens = configs[m][5], tonumber(ARGV[6 + 3 * j])
      if price < 0 then price = 0 end
      reserved_spend[j] = string.format("%.17g", tokens * price)
      total = total + tokens * price
    end
    if total > 0 then
      rl_add_spend(prefix, spend_month, project, total)
    else
      reserved_spend = nil
    end
  end
end

reply[1], reply[3], reply[4], reply[7] = outcome, math.ceil(wait / 1000), binding, nb
for n = 1, nb do
  local r = r0 + 5 * n
  local dim, limit = reply[r - 3], reply[r - 2]
  local level = groups[reply[r - 1]][dim + 1]
  local remaining = math.floor(limit - level + 1e-9)
  if remaining < 0 then remaining = 0 end
  local reset = 0
  if limit > 0 then reset = math.ceil(level * RL_WINDOWS_US[dim] / limit / 1000) end
  reply[r - 1], reply[r] = remaining, reset
end
-- then each item: its model's buckets (k, then their indices)
local r = r0 + 5 * nb
for j = 1, nitems do
  local m = item_model[j]
  local first, last = m_first[m], m < nmodels and m_first[m + 1] - 1 or nb
  reply[r + 1] = last - first + 1
  r = r + 1
  for n = first, last do
    r = r + 1
    reply[r] = n
  end
end
return finish(reply)
