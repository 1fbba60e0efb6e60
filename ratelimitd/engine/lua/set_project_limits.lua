--[[
set_project_limits.lua: set and clear a project's custom limits, each checked
against the organization's limit in the same atomic step (so a concurrent change
of the organization limit cannot slip between check and write). Stores nothing
unless every value passes, and the project holds no more than its maximum
number of limits afterwards (unless it held more before and shrinks). A change that alters anything appends its audit
event (audit.py) in the same step, with the project's limits before and after.

The organization's limit for (model, dimension) is resolved by lib.lua
(rl_org_limits, prepended without the RL_* settings, which it does not read):
its own entry when the organization has any entry for that model, else its "*"
entry; absent means the organization sets no ceiling for that dimension.

KEYS[1]  the organization's limits hash   rl:{org_x}:lim:o
KEYS[2]  the project's limits hash        rl:{org_x}:lim:p:<project_id>
KEYS[3]  the project record               rl:{org_x}:p:<project_id>
KEYS[4]  the organization's audit stream   rl:{org_x}:audit
KEYS[5]  the organization's decision state rl:{org_x}:s: its configuration
         version "v" changes with the limits, so decisions resolve them afresh

ARGV[1]  the audit stream's cap (XADD MAXLEN ~)
ARGV[2]  the actor, as audit.actor_json encodes it
ARGV[3]  the project id
ARGV[4]  the most limits a project may hold
ARGV[5]  d, the number of configured dimensions, then d dimension names
         ("metric|window")
then     s, the number of limits to set, then s triples (model, dimension, value)
then     the fields ("model|metric|window") to clear

Reply: {"ok"} | {"not_found"} | {"above", model, dimension, value, org_limit}
       | {"no_model", model} | {"too_many", limits before, limits after}
]]

if redis.call("EXISTS", KEYS[3]) == 0 then
  return {"not_found"}
end

local max_limits = tonumber(ARGV[4])
local ndims = tonumber(ARGV[5])
local dims = {}
for i = 1, ndims do dims[i] = ARGV[5 + i] end

local function stored()
  local flat, t = redis.call("HGETALL", KEYS[2]), {}
  for i = 1, #flat, 2 do t[flat[i]] = tonumber(flat[i + 1]) end
  return t
end

local function same(a, b)
  for k, v in pairs(a) do if b[k] ~= v then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

-- The organization's limit of (model, dimension) and whether the model is
-- available at all, resolved by lib.lua (rl_org_limits) as decisions resolve it,
-- once per model named.
local dim_index, org_of = {}, {}
for i = 1, ndims do dim_index[dims[i]] = i end
local function org_limit(model, dim)
  local o = org_of[model]
  if not o then
    local limits, any = rl_org_limits(KEYS[1], model, dims)
    o = {limits, any}
    org_of[model] = o
  end
  return o[1][dim_index[dim]], o[2]
end

local pos = 6 + ndims
local nset = tonumber(ARGV[pos])
local writes = {}
for i = 0, nset - 1 do
  local model, dim, value = ARGV[pos + 1 + 3 * i], ARGV[pos + 2 + 3 * i], ARGV[pos + 3 + 3 * i]
  local ceiling, available = org_limit(model, dim)
  if not available then
    return {"no_model", model}
  end
  if ceiling and tonumber(value) > ceiling then
    return {"above", model, dim, value, ceiling}
  end
  writes[#writes + 1] = model .. "|" .. dim
  writes[#writes + 1] = value
end

local clears = {}
for i = pos + 1 + 3 * nset, #ARGV do clears[#clears + 1] = ARGV[i] end
local before = stored()

-- How many limits the project would hold (the caller names each field once).
local held = 0
for _ in pairs(before) do held = held + 1 end
local count = held
for i = 1, #writes, 2 do
  if before[writes[i]] == nil then count = count + 1 end
end
for _, field in ipairs(clears) do
  if before[field] ~= nil then count = count - 1 end
end
if count > max_limits and count > held then
  return {"too_many", held, count}
end

if #writes > 0 then redis.call("HSET", KEYS[2], unpack(writes)) end
if #clears > 0 then redis.call("HDEL", KEYS[2], unpack(clears)) end
local after = stored()
if not same(before, after) then
  redis.call("HINCRBY", KEYS[5], "v", 1)
  redis.call("XADD", KEYS[4], "MAXLEN", "~", ARGV[1], "*", "op", "SetProjectLimits", "actor", ARGV[2],
    "project", ARGV[3], "target", ARGV[3], "before", cjson.encode(before), "after", cjson.encode(after))
end
return {"ok"}
