#!lua name=reprise_store_6

-- The terminal entry's id: the largest a stream entry can have, so that any
-- later XADD fails (a fence against a stale writer). Its field `f` holds
-- '[seq, outcome]'.
local TERMINAL_ID = '18446744073709551615-18446744073709551615'

-- The last seq a stream's entries cover (0 if none): the top id, or the
-- terminal entry's own seq.
local function top_seq(entries)
  local top = redis.call('XREVRANGE', entries, '+', '-', 'COUNT', 1)
  if #top == 0 then return 0 end
  if top[1][1] == TERMINAL_ID then
    return tonumber(string.match(top[1][2][2], '^%[(%d+),'))
  end
  return tonumber(string.match(top[1][1], '^(%d+)-'))
end

-- Append a batch of entries to a stream, atomically.
-- KEYS: metadata hash, entries stream.
-- ARGV: first seq, last covered seq, live TTL ms, retention ms, end record
--       JSON or '', notification shard channel (in the stream's slot; not a
--       key, so that a half-migrated slot does not answer TRYAGAIN for a key
--       that never exists), then for each entry: its id, its field name,
--       its value.
--       Entry ids are the last seq each entry covers (a pack's last event,
--       a gap's `upto`), TERMINAL_ID for the end; packs are built and
--       unpacked by the relay.
-- Returns the key binding pointing at the stream when the batch ends it.
local function append(keys, args)
  local meta, entries, channel = keys[1], keys[2], args[6]
  -- One lookup for both checks: every stream's metadata has an `id`.
  local state = redis.call('HMGET', meta, 'id', 'end')
  if not state[1] then
    return redis.error_reply('REPRISE_CONFLICT unknown or expired stream')
  end
  if state[2] then
    return redis.error_reply('REPRISE_CONFLICT stream already ended')
  end
  -- The top id is the last covered seq, a pack's or a gap's included.
  local stored = top_seq(entries)
  if stored + 1 ~= tonumber(args[1]) then
    return redis.error_reply('REPRISE_CONFLICT append at seq ' .. args[1] ..
      ' but the last stored seq is ' .. stored)
  end
  local gaps = 0
  for i = 7, #args, 3 do
    redis.call('XADD', entries, args[i], args[i + 1], args[i + 2])
    if args[i + 1] == 'g' then gaps = gaps + 1 end
  end
  if gaps > 0 then
    redis.call('HINCRBY', meta, 'gaps', gaps)
  end
  if stored == 0 then
    -- The entries expire with the metadata, whose life started at creation.
    local ttl = redis.call('PTTL', meta)
    if ttl <= 0 then ttl = args[3] end
    redis.call('PEXPIRE', entries, ttl)
  end
  local binding = false
  if args[5] ~= '' then
    redis.call('HSET', meta, 'end', args[5])
    redis.call('PEXPIRE', meta, args[4])
    redis.call('PEXPIRE', entries, args[4])
    binding = redis.call('HGET', meta, 'k')
  end
  redis.call('SPUBLISH', channel, args[2])
  return binding
end

-- `append` by the stream's writer, which knows how many records it left
-- the stream with: refused as lost if the metadata is gone or the stream
-- holds fewer records (a failover to a replica lacking the last writes, a
-- restart without persistence).
-- KEYS: metadata hash, entries stream.
-- ARGV: the records the writer expects (0: no check), then `append`'s ARGV.
-- Returns {key binding or '' (as `append`), records now held}.
local function append_at(keys, args)
  if redis.call('EXISTS', keys[1]) == 0 then
    return redis.error_reply('REPRISE_LOST unknown or expired stream')
  end
  local held = redis.call('XLEN', keys[2])
  if held < tonumber(args[1]) then
    return redis.error_reply('REPRISE_LOST the store holds ' .. held ..
      ' records, the writer appended ' .. args[1])
  end
  local rest = {}
  for i = 2, #args do rest[#rest + 1] = args[i] end
  local binding = append(keys, rest)
  if type(binding) == 'table' and binding.err then
    return binding
  end
  return {binding or '', redis.call('XLEN', keys[2])}
end

-- Remember which key binding points at a stream, if the stream exists.
-- KEYS: metadata hash. ARGV: binding key name.
local function note_binding(keys, args)
  if redis.call('EXISTS', keys[1]) == 1 then
    redis.call('HSET', keys[1], 'k', args[1])
    return 1
  end
  return 0
end

-- Shorten a key binding to the retention if it still points at the stream.
-- KEYS: binding key. ARGV: stream id, retention ms.
local function end_binding(keys, args)
  if redis.call('GET', keys[1]) == args[1] then
    return redis.call('PEXPIRE', keys[1], args[2], 'LT')
  end
  return 0
end

-- Take or renew the producer lease.
-- KEYS: metadata hash. ARGV: owner, now ms, until ms.
-- Returns 1 if a cancel was requested, else 0.
local function renew_lease(keys, args)
  local meta = keys[1]
  if redis.call('EXISTS', meta) == 0 then
    return redis.error_reply('REPRISE_CONFLICT unknown or expired stream')
  end
  if redis.call('HEXISTS', meta, 'end') == 1 then
    return redis.error_reply('REPRISE_CONFLICT stream already ended')
  end
  local lease = redis.call('HMGET', meta, 'lease_owner', 'lease_until_ms')
  local owner, lease_until = lease[1], lease[2]
  if owner and lease_until and owner ~= args[1] and tonumber(lease_until) >= tonumber(args[2]) then
    return redis.error_reply('REPRISE_CONFLICT leased by ' .. owner .. ' until ' .. lease_until)
  end
  redis.call('HSET', meta, 'lease_owner', args[1], 'lease_until_ms', args[3])
  return redis.call('HEXISTS', meta, 'cancel')
end

-- Flag a cancel request for the stream's producer, if the stream exists.
-- KEYS: metadata hash. Returns 1 if it exists, else 0.
local function request_cancel(keys, args)
  if redis.call('EXISTS', keys[1]) == 0 then
    return 0
  end
  redis.call('HSET', keys[1], 'cancel', '1')
  return 1
end

-- End a stream whose lease expired, with an End entry after the last one.
-- KEYS: metadata hash, entries stream.
-- ARGV: now ms, retention ms, outcome JSON, notification shard channel.
-- Returns false if nothing was written, else {seq, key binding or ''}.
local function end_if_abandoned(keys, args)
  local meta, entries, channel = keys[1], keys[2], args[4]
  if redis.call('EXISTS', meta) == 0 or redis.call('HEXISTS', meta, 'end') == 1 then
    return false
  end
  local lease_until = redis.call('HGET', meta, 'lease_until_ms')
  if not lease_until or tonumber(lease_until) >= tonumber(args[1]) then
    return false
  end
  local seq = string.format('%d', top_seq(entries) + 1)
  redis.call('XADD', entries, TERMINAL_ID, 'f', '[' .. seq .. ',' .. args[3] .. ']')
  redis.call('HSET', meta, 'end', '[' .. seq .. ',' .. args[3] .. ']')
  redis.call('PEXPIRE', meta, args[2])
  redis.call('PEXPIRE', entries, args[2])
  redis.call('SPUBLISH', channel, seq)
  return {seq, redis.call('HGET', meta, 'k') or ''}
end

-- Whether string a sorts after string b, bytewise (Lua's own comparison
-- follows the server's locale).
local function sorts_after(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end

-- Durable Streams writer checks (idempotent producer, Stream-Seq), then
-- `append`, atomically. The writer state hash holds `p:<producer id>` =
-- '<epoch> <last seq>', `s` = the last Stream-Seq, `c` = '<epoch> <seq>
-- <producer id>' of the append that ended the stream; it expires with the
-- metadata.
-- KEYS: metadata hash, entries stream, writer state hash.
-- ARGV: producer id ('' for none), its epoch, its seq, Stream-Seq ('' for
--       none, else '=' and the value), then `append`'s ARGV.
-- Returns {'ok', binding or ''}, or a refusal that wrote nothing:
-- {'ended'}, {'dup', last seq, closed 0/1}, {'stale', epoch},
-- {'epoch_seq'}, {'gap', last seq or '', received seq}, {'stream_seq'}.
local function checked_append(keys, args)
  local meta, entries, writers = keys[1], keys[2], keys[3]
  local pid, sseq = args[1], args[4]
  local state = redis.call('HMGET', meta, 'id', 'end')
  if not state[1] then
    return redis.error_reply('REPRISE_CONFLICT unknown or expired stream')
  end
  local claim = args[2] .. ' ' .. args[3] .. ' ' .. pid
  if state[2] then
    if pid ~= '' and redis.call('HGET', writers, 'c') == claim then
      return {'dup', args[3], 1}
    end
    return {'ended'}
  end
  if pid ~= '' then
    local epoch, seq = tonumber(args[2]), tonumber(args[3])
    local p = redis.call('HGET', writers, 'p:' .. pid)
    if not p then
      if seq ~= 0 then return {'gap', '', args[3]} end
    else
      local e, s = string.match(p, '^(%d+) (%d+)$')
      if epoch < tonumber(e) then return {'stale', e} end
      if epoch > tonumber(e) then
        if seq ~= 0 then return {'epoch_seq'} end
      elseif seq <= tonumber(s) then
        return {'dup', s, 0}
      elseif seq ~= tonumber(s) + 1 then
        return {'gap', s, args[3]}
      end
    end
  end
  if sseq ~= '' then
    local last = redis.call('HGET', writers, 's')
    if last and not sorts_after(string.sub(sseq, 2), last) then
      return {'stream_seq'}
    end
  end
  local rest = {}
  for i = 5, #args do rest[#rest + 1] = args[i] end
  local binding = append({meta, entries}, rest)
  if type(binding) == 'table' and binding.err then
    return binding
  end
  if pid ~= '' then
    redis.call('HSET', writers, 'p:' .. pid, args[2] .. ' ' .. args[3])
    if rest[5] ~= '' then redis.call('HSET', writers, 'c', claim) end
  end
  if sseq ~= '' then
    redis.call('HSET', writers, 's', string.sub(sseq, 2))
  end
  if pid ~= '' or sseq ~= '' then
    local ttl = redis.call('PTTL', meta)
    if ttl > 0 then redis.call('PEXPIRE', writers, ttl) end
  end
  return {'ok', binding or ''}
end

-- A sliding expiry: whether the stream's last access (its creation if none)
-- is less than a window ago, recording this access if asked.
-- KEYS: metadata hash, writer state hash. ARGV: now ms, window ms, touch 1/0.
local function sliding_expiry(keys, args)
  local created = redis.call('HGET', keys[1], 'created_ms')
  if not created then return 0 end
  local last = tonumber(redis.call('HGET', keys[2], 't') or created)
  local now = tonumber(args[1])
  if last + tonumber(args[2]) <= now then return 0 end
  if args[3] == '1' and now > last then
    redis.call('HSET', keys[2], 't', args[1])
    local ttl = redis.call('PTTL', keys[1])
    if ttl > 0 then redis.call('PEXPIRE', keys[2], ttl) end
  end
  return 1
end

redis.register_function('reprise_store_6_append', append)
redis.register_function('reprise_store_6_append_at', append_at)
redis.register_function('reprise_store_6_renew_lease', renew_lease)
redis.register_function('reprise_store_6_request_cancel', request_cancel)
redis.register_function('reprise_store_6_end_if_abandoned', end_if_abandoned)
redis.register_function('reprise_store_6_note_binding', note_binding)
redis.register_function('reprise_store_6_end_binding', end_binding)
redis.register_function('reprise_store_6_checked_append', checked_append)
redis.register_function('reprise_store_6_sliding_expiry', sliding_expiry)
