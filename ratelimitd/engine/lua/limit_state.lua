--[[
limit_state.lua: what a project may still use now, per model and dimension, for
the console's live view. (lib.lua and the RL_* settings are prepended.) Reads
only: buckets are drained to now in the reply, never written back, a
configuration resolved afresh is not cached, and nothing is charged.

It reads the state hash as decide.lua writes it (lib.lua): the cached
configuration of (project, model) when its version is the hash's "v", else
rl_config_resolve from the source records, and the packed states "o:<model>"
and "p:<project>:<model>" (rl_state_read), drained with rl_state_drain.

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
local head = redis.call("HMGET", KEYS[1], "v", "d")
local version = head[1] or "0"
-- states of another dimension layout are void (lib.lua): read as empty
local layout_ok = head[2] == RL_LAYOUT
local reply = {string.format("%.0f", now)}

local function limit_text(limit)
  if limit < 0 then return "" end
  return string.format("%.0f", limit)
end

for a = 4, #ARGV do
  local model = ARGV[a]
  local st = redis.call("HMGET", KEYS[1], "c:" .. project .. ":" .. model, "o:" .. model,
                        "p:" .. project .. ":" .. model)
  local c = layout_ok and rl_config_decode(st[1], tonumber(version)) or nil
  if not c then c = rl_config_resolve(prefix, version, project, model) end
  local org = rl_state_read(layout_ok and st[2] or nil)
  rl_state_drain(org, c, RL_ORG, now)
  local proj = rl_state_read(layout_ok and st[3] or nil)
  rl_state_drain(proj, c, RL_PROJ, now)
  for i = 1, RL_NDIMS do
    local org_limit, proj_limit = c[RL_ORG + i], c[RL_PROJ + i]
    reply[#reply + 1] = limit_text(org_limit)
    reply[#reply + 1] = org_limit < 0 and "" or string.format("%.17g", org[i + 1])
    reply[#reply + 1] = limit_text(proj_limit)
    reply[#reply + 1] = proj_limit < 0 and "" or string.format("%.17g", proj[i + 1])
  end
end
return reply
