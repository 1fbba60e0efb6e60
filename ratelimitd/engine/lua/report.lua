--[[
report.lua: what one request really used, reconciled atomically. (lib.lua is prepended.)

With a reservation (the request record decide.lua wrote when it admitted the
request), the difference between the tokens that count and the tokens reserved
goes to the same token buckets of the project and the organization: an
over-estimate is refunded (a level never drops below 0), an under-estimate is
charged even past the limit (later requests then wait until it drains).
Without one (expired, or never checked) the counted tokens are charged in full.
Either way the usage is recorded: counters at three resolutions, the monthly
spend from the model's price, and one entry in the project's request log.
Exactly once per request id: the record remembers it was reported.

A revoked key, or a key whose project was deleted, may still report the one
thing it can honestly have: a request it was admitted for before (the record
holds a reservation made by that very key), because that request ran and its
usage is real. Any other report from it is refused (status 4) and writes
nothing, as from an unknown key.

Tokens that count toward token limits: input + output, less the cached input
tokens unless the organization counts them (setting "cached" = "1" in cfg).

KEYS[1]  the organization's limits hash        rl:{org_x}:lim:o
KEYS[2]  the caller record (API key or project), as in decide.lua
KEYS[3]  the request record                     rl:{org_x}:r:<request_id>

ARGV[1]  caller kind "k" or "p"        ARGV[2]  sha256 of the API key or ""
ARGV[3]  project id (kind "p") or ""   ARGV[4]  request id
ARGV[5]  model ("" = the reservation's first model)
ARGV[6]  input tokens (including cached)   ARGV[7]  output tokens
ARGV[8]  cached input tokens               ARGV[9]  status code of the request
ARGV[10] latency, milliseconds
ARGV[11] request record lifetime, ms   ARGV[12..14] usage retention (minute, hour, day buckets), s
ARGV[15] log entries kept per project  ARGV[16] log lifetime, s
ARGV[17] d, then d pairs: dimension "metric|window", window length in ms
last     "" to use the server's TIME; tests only: the time, microseconds

Every check comes before the first write: a report is applied whole or not at all.

Reply: {status, project, model, tokens counted, token delta applied, spend (micro-USD, as a string)}
  status: 0 reconciled, 1 duplicate (nothing changed), 2 no reservation (charged in full),
          4 invalid API key (unknown, not matching, or revoked/project deleted
            and not reporting its own reservation), 5 no model (no reservation and none given),
          6 project not found, 7 the request id belongs to another project,
          8 a usage counter would pass its maximum (the name of the counter in place of the model)
]]

local prefix = string.sub(KEYS[1], 1, -6)
local kind, key_hash, project = ARGV[1], ARGV[2], ARGV[3]
local request_id, model = ARGV[4], ARGV[5]
local input, output, cached = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local status_code, latency = tonumber(ARGV[9]), tonumber(ARGV[10])
local record_ttl = tonumber(ARGV[11])
local resolutions = {{"m", 60, tonumber(ARGV[12])}, {"h", 3600, tonumber(ARGV[13])}, {"d", 86400, tonumber(ARGV[14])}}
local log_cap, log_ttl = tonumber(ARGV[15]), tonumber(ARGV[16])
local ndims = tonumber(ARGV[17])
local dims, windows_us = {}, {}
for i = 1, ndims do
  dims[i] = ARGV[16 + 2 * i]
  windows_us[i] = tonumber(ARGV[17 + 2 * i]) * 1000
end

local key_id = "-"
local retired = false -- revoked, or its project deleted: only its own reservations may be reported
if kind == "k" then
  local rec = redis.call("HMGET", KEYS[2], "h", "p", "r")
  if not rec[1] or rec[1] ~= key_hash then return {4, "", "", 0, 0, "0"} end
  project = rec[2]
  key_id = string.match(KEYS[2], ":k:(.+)$")
  retired = rec[3] == "1" or redis.call("EXISTS", prefix .. "p:" .. project) == 0
elseif redis.call("EXISTS", KEYS[2]) == 0 then
  return {6, "", "", 0, 0, "0"}
end

local now = rl_now(ARGV[#ARGV])
local raw = redis.call("GET", KEYS[3])
local record = raw and cjson.decode(raw) or nil
if retired and not (record and record.m and record.p == project and record.k == key_id) then
  return {4, "", "", 0, 0, "0"}
end
if record and record.rep then
  return {1, project, record.rm or "", 0, 0, "0"}
end
if record and record.p and record.p ~= project then
  return {7, project, "", 0, 0, "0"}
end

local reserved, status = 0, 2
if record and record.m then
  status = 0
  local index = 1
  if model ~= "" then
    index = nil
    for j, m in ipairs(record.m) do
      if m == model then index = j break end
    end
  end
  if index then
    model = record.m[index]
    reserved = record.t[index] or 0
  else
    status = 2 -- reserved for other models only
  end
end
if model == "" then return {5, project, "", 0, 0, "0"} end

local settings = redis.call("HMGET", prefix .. "cfg", "cached")
local counted = input + output
if settings[1] ~= "1" then counted = counted - cached end
if counted < 0 then counted = 0 end
local delta = counted - reserved

local who = project .. "|" .. model .. "|" .. key_id .. "|"
local counters = {rep = 1, ["in"] = input, out = output, cached = cached}
local overflow = rl_usage_overflow(prefix, now, resolutions, who, counters)
if overflow then return {8, project, overflow, 0, 0, "0"} end

-- Checked: from here on every call writes.
if delta ~= 0 then
  -- the same groups decide.lua charged: every limited dimension is loaded so the
  -- group's expiry still covers each bucket, and the tokens ones take the delta
  local org_limits, proj_limits = rl_limits(KEYS[1], prefix .. "lim:p:" .. project, model, dims)
  local scoped = {{org_limits, prefix .. "b:o:" .. model}, {proj_limits, prefix .. "b:p:" .. project .. ":" .. model}}
  for _, s in ipairs(scoped) do
    local limits, key = s[1], s[2]
    local members, touched = {}, false
    for i = 1, ndims do
      if limits[i] then members[#members + 1] = {dim = i, limit = limits[i]} end
    end
    if #members > 0 then
      rl_group_load(key, members, dims, windows_us, now)
      for _, m in ipairs(members) do
        if string.sub(dims[m.dim], 1, 7) == "tokens|" then
          m.level = math.max(0, m.level + delta)
          touched = true
        end
      end
      if touched then rl_group_store(key, members, dims, windows_us, now) end
    end
  end
end

-- Spend, in micro-USD: tokens x USD per million tokens.
local spend = 0
local price = redis.call("HGET", prefix .. "price", model) or redis.call("HGET", prefix .. "price", "*")
if price then
  local p_in, p_out, p_cached = string.match(price, "^([^,]+),([^,]+),([^,]+)$")
  spend = (input - cached) * tonumber(p_in) + output * tonumber(p_out) + cached * tonumber(p_cached)
  if spend > 0 then
    local month_key = prefix .. "spend:" .. rl_month(now)
    redis.call("HINCRBYFLOAT", month_key, "o", string.format("%.17g", spend))
    redis.call("HINCRBYFLOAT", month_key, "p:" .. project, string.format("%.17g", spend))
    redis.call("EXPIRE", month_key, 400 * 86400)
  end
end

rl_count_usage(prefix, now, resolutions, who, counters, {spend = spend})
rl_log(prefix, project, {id = request_id, t = math.floor(now / 1000), m = model, k = key_id, ok = true,
                         ["in"] = input, out = output, cached = cached, s = status_code, lat = latency,
                         res = status}, log_cap, log_ttl)

-- Remember the report: a repeat changes nothing.
if record then
  record.rep, record.rm = 1, model
  redis.call("SET", KEYS[3], cjson.encode(record), "KEEPTTL")
else
  redis.call("SET", KEYS[3], cjson.encode({rep = 1, rm = model, p = project}), "PX", record_ttl)
end
return {status, project, model, counted, delta, string.format("%.6f", spend)}
