--[[
limit_state.lua: what a project may still use now, per model and dimension, for
the console's live view. (lib.lua is prepended.) Reads only: buckets are drained
to now in the reply, never written back, and nothing is charged.

KEYS[1]  the organization's decision state hash, rl:{org_<id>}:s (lib.lua)
ARGV[1]  the organization's key prefix "rl:{org_<id>}:" (the limit records are
         built from it, as decide.lua does; one hash tag, one slot)
ARGV[2]  the time in microseconds, or "" to read TIME (tests pass the manual clock)
ARGV[3]  the project id
ARGV[4…] the models

Reply: {now_us, then for each model and each dimension (RL_DIMS order) four
strings: organization limit, organization level, project limit, project level;
"" where that scope has no limit}. A level is the amount used, drained to now.
]]

local prefix, now, project = ARGV[1], rl_now(ARGV[2]), ARGV[3]
local st = redis.call("HMGET", KEYS[1], "d")
-- buckets of another dimension layout are void (lib.lua): read as empty
local layout_ok = st[1] == RL_LAYOUT
local reply = {string.format("%.0f", now)}
for a = 4, #ARGV do
  local model = ARGV[a]
  local c = rl_config_resolve(prefix, project, model)
  local states = {false, false}
  if layout_ok then
    states = redis.call("HMGET", KEYS[1], "o:" .. model, "p:" .. project .. ":" .. model)
  end
  local org = rl_state_load(states[1], c.org, now)
  local proj = rl_state_load(states[2], c.proj, now)
  for i = 1, RL_NDIMS do
    reply[#reply + 1] = c.org[i] and string.format("%.0f", c.org[i]) or ""
    reply[#reply + 1] = org[i] and string.format("%.17g", org[i]) or ""
    reply[#reply + 1] = c.proj[i] and string.format("%.0f", c.proj[i]) or ""
    reply[#reply + 1] = proj[i] and string.format("%.17g", proj[i]) or ""
  end
end
return reply
