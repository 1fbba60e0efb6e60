--[[
decide_floor.lua: the floor of a decision's cost in Valkey (load/lua_profile.py).
The six commands decide.lua makes for an admitted decision with a token estimate
(TIME, HMGET of the API key, HMGET of the state hash, HSET of two bucket states,
HINCRBY of the usage counter, SET of the request record), the same sizes of
arguments and reply, and as little Lua as can make them: no decision, nothing
decoded or encoded. Only for measuring: it writes made-up values.

KEYS and ARGV: decide.lua's (KEYS[1] state hash, KEYS[2] API key record,
KEYS[3] request record; ARGV[3] the key id, ARGV[7] the model).
Reply: an answer the size of decide.lua's for six buckets.
]]

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local k = redis.call("HMGET", KEYS[2], "h", "p", "r", "u")
local p, m = k[2], ARGV[7]
redis.call("HMGET", KEYS[1], "v", "d", "x", "c:" .. p .. ":" .. m, "o:" .. m, "p:" .. p .. ":" .. m,
  "u:" .. p .. ":" .. m .. ":" .. ARGV[3])
local state = "0123456789012345678901234567890123456789"
redis.call("HSET", KEYS[1], "o:" .. m, state, "p:" .. p .. ":" .. m, state)
redis.call("HINCRBY", string.sub(KEYS[1], 1, -2) .. "u:m:" .. math.floor(now / 60000000) * 60, "1|r", 1)
redis.call("SET", KEYS[3], p .. ";" .. ARGV[3] .. ";;" .. m .. "|1|500;1;;;", "PX", 900000)
return {0, p, 0, 0, 0, 0, 6, 1, 1, 100, 99, 1, 2, 1, 100, 99, 1, 1, 2, 100, 99, 1, 2, 2, 100, 99, 1, 1, 3, 100, 99,
        1, 2, 3, 100, 99, 1, 1, 4, 100, 99, 1, 6, 1, 2, 3, 4, 5, 6}
