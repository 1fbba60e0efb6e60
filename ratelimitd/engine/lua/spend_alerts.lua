--[[
spend_alerts.lua: claims the spend alerts of one organization and month that
are due: for the organization and each project with a monthly spend limit, each
threshold (percent of the limit) the month's spend has reached. A threshold is
claimed once per scope and month, by whichever process asks first (HSETNX in
one atomic step), so any number of ratelimitd processes deliver it once. Each
claim appends a "SpendThresholdCrossed" audit event (audit.py) in the same step.

Spend and limits are in micro-USD, as report.lua and decide.lua keep them. A
limit of 0 has every threshold reached, as GetSpend shows it.

KEYS[1]  the spend limits hash                 rl:{org_x}:spendlim ("o", "p:<project>")
KEYS[2]  the month's spend hash                rl:{org_x}:spend:<YYYYMM> (same fields)
KEYS[3]  the month's claimed alerts hash       rl:{org_x}:sa:<YYYYMM>, field "<scope field>|<percent>"
KEYS[4]  the organization's audit stream       rl:{org_x}:audit

ARGV[1]  seconds the claims hash lives after its last claim (past the month's end)
ARGV[2]  the audit stream's cap (XADD MAXLEN ~)
ARGV[3]  the actor, as audit.actor_json encodes it
ARGV[4]  the month, "YYYY-MM" (for the audit event)
ARGV[5]  n, the number of thresholds, then n percents, ascending

Reply: a flat list, four per claim made now:
       {scope field, percent, spend (micro-USD), limit (micro-USD), ...}
]]

local limits = redis.call("HGETALL", KEYS[1])
local nthresholds = tonumber(ARGV[5])
local claimed = {}
for i = 1, #limits, 2 do
  local scope, limit = limits[i], tonumber(limits[i + 1])
  local spent = tonumber(redis.call("HGET", KEYS[2], scope) or "0")
  for j = 1, nthresholds do
    local percent = tonumber(ARGV[5 + j])
    if limit and spent >= limit * percent / 100 and redis.call("HSETNX", KEYS[3], scope .. "|" .. percent, "1") == 1 then
      local project = ""
      if string.sub(scope, 1, 2) == "p:" then project = string.sub(scope, 3) end
      local values = string.format(
        '{"limit_usd":%.6f,"month":"%s","spend_usd":%.6f,"threshold":%d}', limit / 1e6, ARGV[4], spent / 1e6, percent)
      redis.call("XADD", KEYS[4], "MAXLEN", "~", ARGV[2], "*", "op", "SpendThresholdCrossed", "actor", ARGV[3],
                 "project", project, "target", project ~= "" and project or "organization", "before", "null",
                 "after", values)
      claimed[#claimed + 1] = scope
      claimed[#claimed + 1] = percent
      claimed[#claimed + 1] = string.format("%.17g", spent)
      claimed[#claimed + 1] = string.format("%.17g", limit)
    end
  end
end
if #claimed > 0 then
  redis.call("EXPIRE", KEYS[3], ARGV[1])
end
return claimed
