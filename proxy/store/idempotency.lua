-- One Idempotency-Key, shared by every proxy: a hash read, checked and written at once, timed
-- by the server's clock (proxy/store/idempotency.py says why each rule is so).
--   state        pending | done | unknown
--   fingerprint  the request's hash: the same key on another request is refused
--   owner        the call that claimed it (a random id); only it may finish the key
--   lease        (pending) Unix ms after which a claim whose holder is silent counts as lost
--   status, headers, body, kept   (done) the answer; kept 0 when it was too large to keep
-- KEYS[1] the key's hash; ARGV[1] the operation, ARGV[2] the owner.

local key, op, owner = KEYS[1], ARGV[1], ARGV[2]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

if op == 'claim' then
  -- ARGV: fingerprint, lease ms, time to keep the key ms.
  -- Replies {'claimed'}, {'reused'}, {'unknown'}, {'pending', ms left of the lease},
  -- or {'done', status, headers, body, kept}.
  local fingerprint, lease, keep = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local found = redis.call('HMGET', key, 'state', 'fingerprint', 'lease', 'owner')
  local state = found[1]
  if not state then
    redis.call('HSET', key, 'state', 'pending', 'fingerprint', fingerprint, 'owner', owner,
      'lease', now + lease)
    redis.call('PEXPIRE', key, keep)
    return {'claimed'}
  end
  if found[2] ~= fingerprint then
    return {'reused'}
  end
  if state == 'pending' and found[4] == owner then
    return {'claimed'} -- asked again after a lost reply: the claim is this caller's already
  end
  if state == 'pending' then
    local left = tonumber(found[3]) - now
    if left > 0 then
      return {'pending', left}
    end
    -- Its holder went silent (it died, or lost Redis) after the call may have gone out.
    redis.call('HSET', key, 'state', 'unknown')
    return {'unknown'}
  end
  if state == 'unknown' then
    return {'unknown'}
  end
  local answer = redis.call('HMGET', key, 'status', 'headers', 'body', 'kept')
  return {'done', answer[1], answer[2], answer[3], answer[4]}
end

if op == 'finish' then
  -- ARGV: outcome (done | released | unknown), time to keep the key ms, then for done:
  -- status, headers, body, kept. Only the owner finishes; replies 1 if it did, else 0.
  local outcome, keep = ARGV[3], tonumber(ARGV[4])
  if redis.call('HGET', key, 'owner') ~= owner then
    return 0
  end
  if outcome == 'released' then
    redis.call('DEL', key)
  elseif outcome == 'unknown' then
    redis.call('HSET', key, 'state', 'unknown')
  else
    redis.call('HSET', key, 'state', 'done', 'status', ARGV[5], 'headers', ARGV[6],
      'body', ARGV[7], 'kept', ARGV[8])
    redis.call('PEXPIRE', key, keep)
  end
  return 1
end

return redis.error_reply('unknown operation ' .. tostring(op))
