-- KEYS[1]: the metadata hash. ARGV[1]: a candidate epoch. Returns {epoch, seq}.
return {epoch, tonumber(redis.call('HGET', meta, 'seq'))}
