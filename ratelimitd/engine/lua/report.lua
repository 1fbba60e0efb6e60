--[[
report.lua: what one request really used, reconciled atomically. (lib.lua is prepended.)

With a reservation (the request record decide.lua wrote when it admitted the
request), the difference between the tokens that count and the tokens reserved
goes to the same token buckets of the project and the organization: an
over-estimate is refunded (a level never drops below 0), an under-estimate is
charged even past the limit (later requests then wait until it drains).
Without one (expired, or never checked) the counted tokens are charged in full.
Either way the usage is recorded: counters of this minute (rollup.lua adds them
to hours and days), the monthly
spend from the model's price, and one entry in the project's request log.
Spend the decision reserved (decide.lua) is replaced by the real cost: the
estimate is taken back from the month it was reserved in, the cost added to
this month.
Exactly once per request id: the record remembers it was reported.

A revoked key, or a key whose project was deleted, may still report the one
thing it can honestly have: a request it was admitted for before (the record
holds a reservation made by that very key), because that request ran and its
usage is real. Any other report from it is refused (status 4) and writes
nothing, as from an unknown key.

Tokens that count toward token limits: input + output, less the cached input
tokens unless the organization counts them (setting "cached" = "1" in cfg). That
setting and the prices come from the resolved configuration in the state hash
(lib.lua), which decide.lua caches for (project, model): one HMGET reads them with
the buckets and the usage id.

KEYS[1]  the organization's state hash           rl:{org_x}:s (lib.lua)
KEYS[2]  the caller record (API key or project), as in decide.lua
KEYS[3]  the request record                     rl:{org_x}:r:<request_id>

ARGV[1]  caller kind "k" or "p"        ARGV[2]  sha256 of the API key or ""
ARGV[3]  project id (kind "p") or ""   ARGV[4]  request id
ARGV[5]  model ("" = the reservation's first model)
ARGV[6]  input tokens (including cached)   ARGV[7]  output tokens
ARGV[8]  cached input tokens               ARGV[9]  status code of the request
ARGV[10] latency, milliseconds
last     "" to use the server's TIME; tests only: the time, microseconds

Settings are baked in as RL_* constants, as for decide.lua.

Every check comes before the first write: a report is applied whole or not at all.

Reply: {status, project, model, tokens counted, token delta applied, spend (micro-USD, as a string)}
  status: 0 reconciled, 1 duplicate (nothing changed), 2 no reservation (charged in full),
          4 invalid API key (unknown, not matching, or revoked/project deleted
            and not reporting its own reservation), 5 no model (no reservation and none given),
          6 project not found, 7 the request id belongs to another project,
          8 a usage counter would pass its maximum (the name of the counter in place of the model)
]]

local state_key = KEYS[1]
local prefix = string.sub(state_key, 1, -2) -- strip "s"
local kind, key_hash, project = ARGV[1], ARGV[2], ARGV[3]
local request_id, model = ARGV[4], ARGV[5]
local input, output, cached = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local status_code, latency = tonumber(ARGV[9]), tonumber(ARGV[10])

local key_id, revoked = "-", false
if kind == "k" then
  local rec = redis.call("HMGET", KEYS[2], "h", "p", "r")
  if not rec[1] or rec[1] ~= key_hash then return {4, "", "", 0, 0, "0"} end
  project = rec[2]
  key_id = string.match(KEYS[2], ":k:(.+)$")
  revoked = rec[3] == "1"
elseif redis.call("EXISTS", KEYS[2]) == 0 then
  return {6, "", "", 0, 0, "0"}
end

local now = rl_now(ARGV[#ARGV])
local raw = redis.call("GET", KEYS[3])
local record = raw and rl_record_decode(raw) or nil
-- A key reporting a reservation it made itself may report it whatever became of
-- the key since; any other report needs a key that is still valid (revoked, or its
-- project deleted: retired).
local own_reservation = record and record.a and record.p == project and record.k == key_id
if kind == "k" and not own_reservation then
  if revoked or redis.call("EXISTS", prefix .. "p:" .. project) == 0 then return {4, "", "", 0, 0, "0"} end
end
if record and record.rm then
  return {1, project, record.rm, 0, 0, "0"}
end
if record and record.p ~= project then
  return {7, project, "", 0, 0, "0"}
end

local reserved, reserved_spend, status = 0, 0, 2
if record and record.a then
  status = 0
  local reservation = rl_record_items(record)
  local index = 1
  if model ~= "" then
    index = nil
    for j, item in ipairs(reservation) do
      if item.model == model then index = j break end
    end
  end
  if index and reservation[index] then
    model = reservation[index].model
    reserved, reserved_spend = reservation[index].tokens, reservation[index].spend
  else
    status = 2 -- reserved for other models only
  end
end
if model == "" then return {5, project, "", 0, 0, "0"} end

-- The configuration (prices, whether cached tokens count), both token buckets and
-- the usage id, in one read of the state hash; the configuration from the source
-- records only when the decision's cached copy is of an older version.
local org_field, proj_field = "o:" .. model, "p:" .. project .. ":" .. model
local st = redis.call("HMGET", state_key, "v", "d", "x", "c:" .. project .. ":" .. model, org_field, proj_field,
                      "u:" .. project .. ":" .. model .. ":" .. key_id)
local layout_ok = st[2] == RL_LAYOUT
local config = layout_ok and rl_config_decode(st[4], tonumber(st[1] or "0")) or nil
if not config then config = rl_config_resolve(prefix, st[1] or "0", project, model) end

local counted = input + output
if config[RL_COUNTS_CACHED] ~= 1 then counted = counted - cached end
if counted < 0 then counted = 0 end
local delta = counted - reserved

-- Spend, in micro-USD: tokens x USD per million tokens.
local spend = 0
local p_in, p_out, p_cached = config[RL_PRICES], config[RL_PRICES + 1], config[RL_PRICES + 2]
if p_in >= 0 then
  spend = (input - cached) * p_in + output * p_out + cached * p_cached
end

-- Counters can only be near their maximum if they exist: a (project, model, key)
-- without a usage id yet gets one with the writes below.
local adds = {rep = 1, ["in"] = input, out = output, cached = cached, spend = spend}
local usage_id = st[7] or redis.call("HGET", prefix .. "ui", project .. "|" .. model .. "|" .. key_id)
local count_usage, overflow = nil, nil
if usage_id then count_usage, overflow = rl_usage_report(prefix, now, usage_id, adds) end
if overflow then return {8, project, overflow, 0, 0, "0"} end

-- Checked: from here on every call writes.
if delta ~= 0 then
  -- the same buckets decide.lua charged: the token ones take the delta
  local writes, longest = {}, 0
  for scope = 1, 2 do
    local off, field = scope == 1 and RL_ORG or RL_PROJ, scope == 1 and org_field or proj_field
    local touched = false
    local s = rl_state_read(layout_ok and st[4 + scope] or nil)
    rl_state_drain(s, config, off, now)
    for i = 1, RL_NDIMS do
      if config[off + i] >= 0 and RL_METRIC_TOKENS[i] then
        s[i + 1] = math.max(0, s[i + 1] + delta)
        touched = true
      end
    end
    if touched then
      local packed, drain = rl_state_pack(s, config, off, now)
      writes[#writes + 1] = field
      writes[#writes + 1] = packed
      if drain > longest then longest = drain end
    end
  end
  if #writes > 0 then
    if not layout_ok then
      writes[#writes + 1] = "d"
      writes[#writes + 1] = RL_LAYOUT
    end
    local expire_at = rl_state_expiry(writes, layout_ok and tonumber(st[3]) or nil, math.floor(now / 1000) + longest)
    redis.call("HSET", state_key, unpack(writes))
    if expire_at then redis.call("PEXPIRE", state_key, expire_at - math.floor(now / 1000)) end
  end
end

-- The month's spend; an estimate the decision reserved is taken back from the
-- month it was reserved in.
local month = rl_month(now)
if reserved_spend ~= 0 and record.em ~= month then
  rl_add_spend(prefix, record.em, project, -reserved_spend)
  reserved_spend = 0
end
if spend > 0 or reserved_spend ~= 0 then
  rl_add_spend(prefix, month, project, spend - reserved_spend)
end

if not count_usage then
  count_usage = rl_usage_report(prefix, now, rl_usage_id(prefix, project, model, key_id), adds)
end
count_usage()
rl_log(prefix, project, {id = request_id, t = math.floor(now / 1000), m = model, k = key_id, ok = true,
                         ["in"] = input, out = output, cached = cached, s = status_code, lat = latency,
                         res = status}, RL_LOG_CAP, RL_LOG_TTL_S)

-- Remember the report: a repeat changes nothing.
if record then
  record.rm = model
  redis.call("SET", KEYS[3], rl_record_encode(record.p, record.k, model, record.f, record.a, record.e, record.em,
                                               record.reply), "KEEPTTL")
else
  redis.call("SET", KEYS[3], rl_record_encode(project, nil, model), "PX", RL_RECORD_TTL_MS)
end
return {status, project, model, counted, delta, string.format("%.6f", spend)}
