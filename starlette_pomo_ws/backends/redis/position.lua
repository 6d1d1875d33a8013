-- KEYS[1]: the metadata hash. ARGV[1]: a candidate epoch; optionally ARGV[2], a channel, and ARGV[3], a
-- token: then `token|epoch|seq` is published on that channel, after every event up to that seq (the
-- pub/sub heartbeat's barrier). Returns {epoch, seq}.
local seq = tonumber(redis.call('HGET', meta, 'seq'))
if ARGV[2] then
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. '|' .. epoch .. '|' .. seq)
end
return {epoch, seq}
