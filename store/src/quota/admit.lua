-- Admits one request for several subjects at once, or changes nothing.
--
-- KEYS: five per subject, in this order: requests this minute, requests today, tokens
--   today, tokens this month (string counters), and the concurrency slots (a sorted set of
--   permit ids scored by their expiry in ms).
-- ARGV[1] now in ms; ARGV[2] the permit id; ARGV[3] the permit's expiry in ms;
-- ARGV[4..6] the ttl in ms of the minute keys, the day keys and the slot sets;
-- ARGV[7..] five limits per subject, in the order of the keys (0 is unlimited).
--
-- Returns {1} when admitted (every subject's requests counted and a slot taken), or
-- {0, the five counters of each subject} when some limit is reached, so the caller can
-- say which one with the same decision code as the in-process backend.

local subjects = #KEYS / 5
local used = {}
local refused = false

for s = 0, subjects - 1 do
  local key = s * 5
  -- Slots whose permits were never released (their node died) expire here.
  redis.call('ZREMRANGEBYSCORE', KEYS[key + 5], '-inf', ARGV[1])
  for c = 1, 4 do
    used[key + c] = tonumber(redis.call('GET', KEYS[key + c]) or '0')
  end
  used[key + 5] = redis.call('ZCARD', KEYS[key + 5])
  for c = 1, 5 do
    local max = tonumber(ARGV[6 + key + c])
    if max > 0 and used[key + c] >= max then
      refused = true
    end
  end
end

if refused then
  table.insert(used, 1, 0)
  return used
end

for s = 0, subjects - 1 do
  local key = s * 5
  redis.call('INCR', KEYS[key + 1])
  redis.call('PEXPIRE', KEYS[key + 1], ARGV[4])
  redis.call('INCR', KEYS[key + 2])
  redis.call('PEXPIRE', KEYS[key + 2], ARGV[5])
  redis.call('ZADD', KEYS[key + 5], ARGV[3], ARGV[2])
  redis.call('PEXPIRE', KEYS[key + 5], ARGV[6])
end
return {1}
