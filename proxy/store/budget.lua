-- The token's budget, shared by every proxy that holds the token: one call of this script
-- is one decision, read, checked and written at once, timed by the server's clock.
-- The rules are those of proxy/stages/budget.py (read its docstring first); this is the
-- same code, step for step, on a hash:
--   reset, used                   the window: when it ends, calls counted in it
--   c:NAME = "count stamp first window used"   one client's decaying count and window count
-- KEYS[1] the budget's hash (or, for "beat", the set of live proxies); ARGV[1] the operation.

local WINDOW, MIN_AGE, ACTIVE, FORGOTTEN, SHORTEST_WAIT = 60, 5, 0.5, 0.05, 0.05
local NEWCOMERS = 0.05
local KEEP_MS = 600000 -- a budget untouched for ten minutes is forgotten
-- A take may grant a proxy a lease of several calls, to spend without asking again: at most
-- this share of what the client may take now (so one call at InvoisX's 60 a minute), and
-- at most LEASE_MAX. Leased calls are counted when granted, so leases never over-admit.
local LEASE_SHARE, LEASE_MAX = 1 / 64, 1000

local key, op = KEYS[1], ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6

if op == 'beat' then
  -- ARGV: proxy id, seconds a heartbeat counts; returns the proxies alive.
  local alive = tonumber(ARGV[3])
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - alive)
  redis.call('PEXPIRE', key, math.ceil(alive * 1000))
  return redis.call('ZCARD', key)
end

local limit, margin = tonumber(ARGV[2]), tonumber(ARGV[3])
local fields = redis.call('HGETALL', key)
local state, clients = {}, {}
for i = 1, #fields, 2 do
  local name = fields[i]
  if string.sub(name, 1, 2) == 'c:' then
    local c, s, f, w, u = string.match(fields[i + 1], '(%S+) (%S+) (%S+) (%S+) (%S+)')
    clients[string.sub(name, 3)] = {
      count = tonumber(c), stamp = tonumber(s), first = tonumber(f),
      window = tonumber(w), used = tonumber(u),
    }
  else
    state[name] = tonumber(fields[i + 1])
  end
end
local reset, used = state.reset or 0, state.used or 0
local fresh = reset == 0 -- no window yet, or Redis lost it

local function decayed(use)
  return use.count * math.exp((use.stamp - now) / WINDOW)
end

local function rate(use)
  local age = math.max(now - use.first, MIN_AGE)
  return decayed(use) / (1 - math.exp(-age / WINDOW))
end

local function roll()
  if reset == 0 then
    reset, used = now + WINDOW, 0
  elseif now >= reset + margin then
    reset = reset + WINDOW * (math.floor((now - margin - reset) / WINDOW) + 1)
    used = 0
  end
end

local function move(to)
  -- The current window ends elsewhere: what each client used in it stays counted.
  for _, use in pairs(clients) do
    if use.window == reset then use.window = to end
  end
  reset = to
end

local function used_in_window(use)
  if use ~= nil and use.window == reset then return use.used end
  return 0
end

local function save()
  local writes = {'reset', reset, 'used', used}
  for name, use in pairs(clients) do
    writes[#writes + 1] = 'c:' .. name
    writes[#writes + 1] = string.format(
      '%.17g %.17g %.17g %.17g %d', use.count, use.stamp, use.first, use.window, use.used)
  end
  redis.call('HSET', key, unpack(writes))
  redis.call('PEXPIRE', key, KEEP_MS)
end

local function reply(wait)
  local wait_ms = math.floor(math.max(wait, SHORTEST_WAIT) * 1000 + 0.5)
  return {wait_ms, math.floor(reset * 1000), used, 0, 0}
end

local function left()
  return math.max(0, reset + margin - now)
end

roll()

if op == 'take' then
  -- ARGV: limit, margin, client, cap (0: none), calls of an expired lease given back and
  -- its window's reset in ms, then reservations as name, calls pairs.
  -- Returns the wait in ms (0: admitted), the window's reset in ms, the calls counted in it,
  -- the calls granted, and the ms left in the window.
  local client, cap = ARGV[4], tonumber(ARGV[5])
  local returned, returned_window = tonumber(ARGV[6]), tonumber(ARGV[7])
  local reservations = {}
  for i = 8, #ARGV, 2 do reservations[ARGV[i]] = tonumber(ARGV[i + 1]) end
  local back = clients[client]
  if returned > 0 and back ~= nil and math.floor(reset * 1000) == returned_window
      and back.window == reset then
    returned = math.min(returned, back.used)
    used = math.max(0, used - returned)
    back.used = back.used - returned
    back.count = math.max(0, back.count - returned)
  end
  local rates = {}
  for name, use in pairs(clients) do
    if decayed(use) < FORGOTTEN then
      clients[name] = nil
      redis.call('HDEL', key, 'c:' .. name)
    else
      rates[name] = rate(use)
    end
  end
  local own = clients[client]
  if cap > 0 and used_in_window(own) >= cap then return reply(reset + margin - now) end
  -- What this client must leave to the others (stages/budget.py, WindowBudget._held).
  local t_left = left()
  local to_come = math.min(t_left, WINDOW) / WINDOW
  local active, n_active = {}, 0
  for name, use in pairs(clients) do
    if decayed(use) >= ACTIVE then
      active[name] = true
      if name ~= client then n_active = n_active + 1 end
    end
  end
  local fair = limit / (n_active + 1)
  local heavy = (rates[client] or 0) >= fair
    and used_in_window(own) >= (reservations[client] or 0)
  local names = {}
  for name in pairs(reservations) do names[name] = true end
  if heavy then for name in pairs(active) do names[name] = true end end
  local held, holding_rate = 0, 0
  for name in pairs(names) do
    if name ~= client then
      local need, r = 0, 0
      local reserved = reservations[name] or 0
      if reserved > 0 then
        local taken = used_in_window(clients[name])
        need = math.min(math.max(0, reserved - taken), math.ceil(reserved * to_come))
        r = reserved
      end
      local light = rates[name] or 0
      if heavy and active[name] and light < fair then
        need = math.max(need, math.ceil(light * to_come))
        r = math.max(r, light)
      end
      if need > 0 then
        held = held + need
        holding_rate = holding_rate + r
      end
    end
  end
  if heavy then
    held = held + math.ceil(limit * NEWCOMERS * to_come)
    holding_rate = holding_rate + limit * NEWCOMERS
  end
  local capacity = limit - used
  if capacity < 1 then return reply(reset + margin - now) end
  if capacity - 1 < held then
    return reply(math.min((held - capacity + 1) * WINDOW / holding_rate, t_left))
  end
  local granted = math.max(1, math.min(math.floor((capacity - held) * LEASE_SHARE), LEASE_MAX))
  if cap > 0 then granted = math.min(granted, cap - used_in_window(own)) end
  if own == nil or decayed(own) < FORGOTTEN then
    own = {count = 0, stamp = now, first = now, window = 0, used = 0}
    clients[client] = own
  end
  own.count = decayed(own) + granted
  own.stamp = now
  if own.window ~= reset then own.window, own.used = reset, 0 end
  own.used = own.used + granted
  used = used + granted
  save()
  return {0, math.floor(reset * 1000), used, granted, math.floor(t_left * 1000)}
elseif op == 'refund' then
  -- ARGV: limit, margin, client.
  local own = clients[ARGV[4]]
  if own ~= nil and own.window == reset then
    used = math.max(0, used - 1)
    own.used = math.max(0, own.used - 1)
    own.count = math.max(0, own.count - 1)
    save()
  end
  return reply(0)
elseif op == 'learn' then
  -- ARGV: limit, margin, status, remaining, reset, retry after (-1: not sent).
  local status, remaining, their_reset = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local retry_after = tonumber(ARGV[7])
  if remaining >= 0 and their_reset >= 0 and now - margin < their_reset
      and their_reset <= now + WINDOW then
    local theirs = math.max(0, limit - remaining)
    if their_reset > reset then
      reset, used = their_reset, theirs
    elseif their_reset < reset and now < their_reset then
      move(their_reset)
      used = math.max(used, theirs)
    elseif their_reset == reset then
      used = math.max(used, theirs)
    end
  end
  if status == 429 then
    if retry_after < 0 then retry_after = WINDOW end
    move(now + retry_after - margin)
    used = limit
  end
  save()
  return reply(0)
elseif op == 'merge' then
  -- ARGV: limit, margin, the window's reset in ms, calls admitted in it while apart.
  -- A Redis that lost its state (restarted empty) takes the window as the proxies kept it.
  local their_window, admitted = tonumber(ARGV[4]), tonumber(ARGV[5])
  local placed = fresh and their_window / 1000 > now
  if placed then reset, used = their_window / 1000, 0 end
  if placed or math.floor(reset * 1000) == their_window then
    used = math.min(limit, used + admitted)
    save()
  end
  return reply(0)
end
return redis.error_reply('unknown operation ' .. tostring(op))
