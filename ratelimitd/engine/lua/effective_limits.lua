--[[
effective_limits.lua: a project's limits of some models, resolved by lib.lua
(rl_org_limits, rl_project_limits: prepended without the RL_* settings, which
they do not read) exactly as decisions resolve them, for the control plane to
report (GetProjectLimits). Reads only.

KEYS[1]  the organization's limits hash   rl:{org_x}:lim:o
KEYS[2]  the project's limits hash        rl:{org_x}:lim:p:<project_id>

ARGV[1]  d, the number of configured dimensions, then d dimension names
         ("metric|window")
then     the models

Reply: per model, 2 x d integers: the organization's limit of each dimension,
then the project's custom limit of each; -1 where there is none
]]

local ndims = tonumber(ARGV[1])
local dims = {}
for i = 1, ndims do dims[i] = ARGV[1 + i] end
local reply = {}
for a = 2 + ndims, #ARGV do
  local org = rl_org_limits(KEYS[1], ARGV[a], dims)
  local proj = rl_project_limits(KEYS[2], ARGV[a], dims)
  for i = 1, ndims do
    reply[#reply + 1] = org[i] or -1
  end
  for i = 1, ndims do
    reply[#reply + 1] = proj[i] or -1
  end
end
return reply
