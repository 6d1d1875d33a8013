-- Forget the members of nodes that stopped refreshing themselves (they died), or of the nodes named.
-- KEYS[1]: the set of nodes with members. ARGV: prefix, the most nodes to forget, then node ids (none: the
-- expired ones). Returns {channel, user, users left in the channel, ...} for each user whose last connection
-- in a channel went that way.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local prefix = ARGV[1]
local totals = prefix .. 'cs'
local nodes = {}
if #ARGV > 2 then
  for i = 3, #ARGV do nodes[#nodes + 1] = ARGV[i] end
else
  nodes = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[2]))
end
local left = {}
for _, node in ipairs(nodes) do
  local key = prefix .. 'members:' .. node
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local field = flat[i]
    local bar = string.find(field, '|', 1, true)
    if bar then
      local channel, user, count = string.sub(field, 1, bar - 1), string.sub(field, bar + 1), tonumber(flat[i + 1])
      local members = prefix .. 'cm:' .. channel
      if redis.call('HINCRBY', members, user, -count) <= 0 then
        redis.call('HDEL', members, user)
        left[#left + 1] = channel
        left[#left + 1] = user
        left[#left + 1] = redis.call('HLEN', members)
      end
      if redis.call('HINCRBY', totals, channel, -count) <= 0 then redis.call('HDEL', totals, channel) end
    end
  end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], node)
end
return left
