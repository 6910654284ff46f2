"""The Lua scripts of the Redis governor: each decision one atomic step on Redis's clock."""

from __future__ import annotations

__all__ = ["ACQUIRE", "ANNOUNCE", "APPLY", "RATE_INCREASE", "READ", "RENEW", "REQUEST"]

# AIMD, as in LocalGovernor: cut 30% per 429, win back 2.5% per `probe_after` successes.
RATE_DECREASE = 0.7
RATE_INCREASE = 0.025
MIN_RATE_FACTOR = 0.25

# Shared by every script: Redis's clock in milliseconds, exact number formatting (Lua's
# tostring keeps 14 digits, too few for epoch milliseconds), and the epoch check.
# The epoch names one life of the Redis data. A Redis that holds nothing for the key
# (first use, or restarted without its data) cannot tell what was sent in the last
# window or which tasks run: requests and slots pause for one re-registration round,
# in which every live process writes back its slots and its grants of the last window,
# unless told to trust it.
PRELUDE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local function num(x) return string.format('%.3f', x) end
local function getnum(key, default)
  local v = redis.call('GET', key)
  if v then return tonumber(v) end
  return default
end
local function raise_to(key, value)
  if value > getnum(key, 0) then redis.call('SET', key, num(value)) end
end
local function check_epoch(epoch_key, pause_key, recover_key, known, owner, round)
  -- known: the epoch this process saw last; '' before its first answer, '*' if it was
  -- told to trust a Redis that holds nothing for the key.
  local epoch = redis.call('GET', epoch_key)
  local born = nil
  if not epoch then
    epoch = num(now) .. '/' .. owner
    redis.call('SET', epoch_key, epoch)
    if known ~= '*' then born = now end
  elseif known ~= '' and known ~= '*' and epoch ~= known then
    born = tonumber(string.match(epoch, '^([%d%.]+)/'))
  end
  if born then
    raise_to(pause_key, born + round)
    raise_to(recover_key, born + round)
  end
  return epoch
end
"""

# KEYS: grants, pause, factor, last_poll, epoch, recover, poll_line, poll_due, poll_seq,
#       slots
# ARGV: epoch, owner, member, window_ms, requests, reserve, paced, spacing_ms, round_ms,
#       ticket (a paced request's place in the poll line, the same on every attempt),
#       slot (a create's slot with no task: marked sent with the grant, so that if the
#       process dies only a create that may have left is held as uncertain)
# Returns the grant's time on Redis's clock too: the process keeps its grants of the
# last window, to write them back if Redis loses them.
REQUEST = (
    PRELUDE
    + """
local window = tonumber(ARGV[4])
local epoch = check_epoch(KEYS[5], KEYS[2], KEYS[6], ARGV[1], ARGV[2], tonumber(ARGV[9]))
local wait = getnum(KEYS[2], 0) - now
local factor = getnum(KEYS[3], 1)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', num(now - window))
local n = redis.call('ZCARD', KEYS[1])
local limit = math.max(1, math.floor(tonumber(ARGV[5]) * factor + 1e-9))
local paced = ARGV[7] == '1'
local step = tonumber(ARGV[8]) / factor
local cap = limit
if paced then cap = math.max(1, limit - tonumber(ARGV[6])) end
if n >= cap then
  -- the grant that must leave the window before one more may enter it
  local leaving = redis.call('ZRANGE', KEYS[1], n - cap, n - cap, 'WITHSCORES')
  wait = math.max(wait, tonumber(leaving[2]) + window - now)
end
if paced then
  wait = math.max(wait, getnum(KEYS[4], -1e18) + step - now)
  -- Polls of every process wait in one line, first come first served: only the head
  -- may be granted, the others sleep until about their turn. A ticket that stops
  -- asking (cancelled, or its process died) leaves the line when its due time passes.
  local line, due, ticket = KEYS[7], KEYS[8], ARGV[10]
  for _, t in ipairs(redis.call('ZRANGE', line, 0, -1)) do
    if tonumber(redis.call('HGET', due, t) or '0') < now then
      redis.call('ZREM', line, t)
      redis.call('HDEL', due, t)
    end
  end
  if not redis.call('ZSCORE', line, ticket) then
    redis.call('ZADD', line, redis.call('INCR', KEYS[9]), ticket)
  end
  -- A waiter behind the head comes back a little before its turn: it then learns its
  -- exact time as the head, while coming late would leave the budget idle.
  local rank = redis.call('ZRANK', line, ticket)
  if rank > 0 then wait = math.max(wait, 0) + rank * step - math.min(step / 4, 25) end
  redis.call('HSET', due, ticket, num(now + wait + math.max(2000, 2 * step)))
  redis.call('PEXPIRE', line, math.ceil(window + wait) + 2000)
  redis.call('PEXPIRE', due, math.ceil(window + wait) + 2000)
end
if wait > 0 then return {0, num(wait), epoch, num(factor), n, num(now)} end
local slot = nil
if ARGV[11] ~= '' then
  -- a create goes only on a slot still ours (a lapsed lease may have lost it)
  local raw = redis.call('HGET', KEYS[10], ARGV[11])
  slot = raw and cjson.decode(raw)
  if not slot or slot.o ~= ARGV[2] or slot.t ~= '' then
    return {-1, '0', epoch, num(factor), n, num(now)}
  end
end
redis.call('ZADD', KEYS[1], num(now), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window) + 1000)
if paced then
  redis.call('SET', KEYS[4], num(now), 'PX', math.ceil(window))
  redis.call('ZREM', KEYS[7], ARGV[10])
  redis.call('HDEL', KEYS[8], ARGV[10])
end
if slot then
  slot.w = 1
  redis.call('HSET', KEYS[10], ARGV[11], cjson.encode(slot))
end
return {1, '0', epoch, num(factor), n + 1, num(now)}
"""
)

# KEYS: slots, tickets, owners, seq, slot_limit, epoch, pause, recover, interactive
#       (a hash: Redis's time of the last interactive create, and the reserve and the
#       lending time of the process that made it)
# ARGV: epoch, owner, ticket, nominal, round_ms, rank (0 highest: the ticket's priority,
#       0 too once it waited long enough), interactive (1 for a user's create in a process
#       that reserves slots),
#       reserved (slots below rank 0 may not take), lend_ms (after this long with no
#       interactive create the reserve is lent; negative: never), priority (the rank
#       the slot is taken at, kept in its record). The reserve is the interactive
#       side's setting: the batch's processes need none.
# A ticket's score is its rank's class plus its order of arrival on the key, so the
# line is by priority, then first come first served.
ACQUIRE = (
    PRELUDE
    + """
local epoch = check_epoch(KEYS[6], KEYS[7], KEYS[8], ARGV[1], ARGV[2], tonumber(ARGV[5]))
local alive = redis.call('ZSCORE', KEYS[3], ARGV[2])
if (not alive) or tonumber(alive) < now then return {-1, '0', epoch, 0} end
local recover = getnum(KEYS[8], 0)
if recover > now then return {0, num(recover - now), epoch, 0} end
-- uncertain creates free their slots by time
local next_free = -1
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  if rec.f > 0 then
    if rec.f <= now then redis.call('HDEL', KEYS[1], all[i])
    elseif next_free < 0 or rec.f < next_free then next_free = rec.f end
  end
end
local class = tonumber(ARGV[6]) * 1e12
local score = redis.call('ZSCORE', KEYS[2], ARGV[3])
if not score then
  redis.call('ZADD', KEYS[2], num(class + redis.call('INCR', KEYS[4])), ARGV[3])
elseif tonumber(score) >= class + 1e12 then
  -- it waited long enough: served with the interactive ones, in order of arrival
  redis.call('ZADD', KEYS[2], num(class + tonumber(score) % 1e12), ARGV[3])
end
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[9], 'at', num(now), 'reserved', ARGV[8], 'lend', ARGV[9])
end
local reserve = 0
if ARGV[6] ~= '0' then
  local seen = redis.call('HMGET', KEYS[9], 'at', 'reserved', 'lend')
  local at, kept, lend = tonumber(seen[1]), tonumber(seen[2]), tonumber(seen[3])
  if at and kept and lend and (lend < 0 or now - at < lend) then reserve = kept end
end
local rank = redis.call('ZRANK', KEYS[2], ARGV[3])
local used = redis.call('HLEN', KEYS[1])
local limit = getnum(KEYS[5], tonumber(ARGV[4]))
if rank < limit - used - reserve then
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('HSET', KEYS[1], ARGV[3],
             cjson.encode({o = ARGV[2], t = '', m = '', s = now, f = 0, w = 0,
                           p = tonumber(ARGV[10])}))
  return {1, '0', epoch, used + 1}
end
if next_free > 0 then return {0, num(next_free - now), epoch, used} end
return {0, '-1', epoch, used}
"""
)

# KEYS: slots, tickets, pause, factor, slot_limit, limited (429s seen on the key),
#       poll_line, poll_due
# ARGV: owner, channel, nominal, then groups of four: op, token, a, b
APPLY = PRELUDE + (
    """
local owner = ARGV[1]
local freed = false
for i = 4, #ARGV, 4 do
  local op, token, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if op == 'bind' or op == 'hold' or op == 'free' then
    local raw = redis.call('HGET', KEYS[1], token)
    local rec = raw and cjson.decode(raw)
    if rec and rec.o == owner then
      if op == 'free' then
        redis.call('HDEL', KEYS[1], token)
        freed = true
      else
        if op == 'bind' then rec.t = a; rec.m = b else rec.f = now + tonumber(a) end
        redis.call('HSET', KEYS[1], token, cjson.encode(rec))
      end
    end
  elseif op == 'cancel' then
    -- a waiter gave up: its ticket goes, and a slot granted just then is given back
    redis.call('ZREM', KEYS[2], token)
    local raw = redis.call('HGET', KEYS[1], token)
    if raw and cjson.decode(raw).o == owner then redis.call('HDEL', KEYS[1], token) end
    freed = true
  elseif op == 'unline' then
    -- a poll's waiter gave up: its place in the poll line goes at once
    redis.call('ZREM', KEYS[7], token)
    redis.call('HDEL', KEYS[8], token)
  elseif op == 'news' then
    redis.call('PUBLISH', ARGV[2], a)
  elseif op == 'limited' then
    redis.call('INCR', KEYS[6])
    raise_to(KEYS[3], now + tonumber(a))
    redis.call('SET', KEYS[4], num(math.max(@MIN_FACTOR@, getnum(KEYS[4], 1) * @DECREASE@)))
    if b == 'create' then
      local limit = getnum(KEYS[5], tonumber(ARGV[3]))
      redis.call('SET', KEYS[5], math.max(1, math.min(limit, redis.call('HLEN', KEYS[1])) - 1))
    end
  elseif op == 'slots_full' then
    -- a create refused with the window far from full: tasks we do not know hold
    -- slots. The limit: the slots our tasks hold (refused creates hold slots too,
    -- and their retries must not cut further). Rate and pause stay.
    redis.call('INCR', KEYS[6])
    local bound = 0
    local all = redis.call('HVALS', KEYS[1])
    for j = 1, #all do
      if cjson.decode(all[j]).t ~= '' then bound = bound + 1 end
    end
    redis.call('SET', KEYS[5], math.max(1, bound))
  elseif op == 'probe' then
    redis.call('SET', KEYS[4], num(math.min(1, getnum(KEYS[4], 1) + @INCREASE@)))
  elseif op == 'slot_probe' then
    -- one step above the limit, or above the slots held if a retried create went over it
    local limit = math.max(getnum(KEYS[5], tonumber(ARGV[3])), redis.call('HLEN', KEYS[1]))
    redis.call('SET', KEYS[5], math.min(tonumber(ARGV[3]), limit + 1))
    freed = true
  end
end
if freed then redis.call('PUBLISH', ARGV[2], '{"kind":"freed"}') end
return {num(getnum(KEYS[4], 1)), getnum(KEYS[5], tonumber(ARGV[3])), redis.call('HLEN', KEYS[1]),
        getnum(KEYS[6], 0), redis.call('ZCARD', KEYS[2])}
""".replace("@MIN_FACTOR@", repr(MIN_RATE_FACTOR))
    .replace("@DECREASE@", repr(RATE_DECREASE))
    .replace("@INCREASE@", repr(RATE_INCREASE))
)

# KEYS: owners, slots, tickets, epoch, pause, recover, grants, factor, slot_limit
# ARGV: epoch, owner, lease_ms, window_ms, hold_ms, channel, period_ms, nominal, readd,
#       round_ms, this process's grants of the last window (JSON: [[time_ms, member]...]),
#       then groups of six for each slot this process holds: token, task, model, hold_ms,
#       sent (1 if a create was granted on it), priority (its rank)
# A process is taken for dead one lease after its lease ran out: after a Redis restart
# that kept the data, live processes renew within that grace, and keep their tasks.
# After a restart that lost it, each writes back its slots and the grants of its last
# window (stamped on Redis's clock when they were made), so the window is whole again.
RENEW = (
    PRELUDE
    + """
local owner = ARGV[2]
local known = ARGV[1]
local epoch = check_epoch(KEYS[4], KEYS[5], KEYS[6], known, owner, tonumber(ARGV[10]))
local data_lost = (known ~= '' and known ~= '*' and epoch ~= known) or ARGV[9] == '1'
if data_lost then
  local window = tonumber(ARGV[4])
  for _, grant in ipairs(cjson.decode(ARGV[11])) do
    if grant[1] > now - window then
      redis.call('ZADD', KEYS[7], 'NX', num(grant[1]), grant[2])
    end
  end
  redis.call('PEXPIRE', KEYS[7], math.ceil(window) + 1000)
end
local lost = {}
for i = 12, #ARGV, 6 do
  local token = ARGV[i]
  local raw = redis.call('HGET', KEYS[2], token)
  local held = tonumber(ARGV[i + 3])
  local mine = {o = owner, t = ARGV[i + 1], m = ARGV[i + 2], s = now, f = 0,
                w = tonumber(ARGV[i + 4]), p = tonumber(ARGV[i + 5])}
  if held > 0 then mine.f = now + held end
  if raw then
    local rec = cjson.decode(raw)
    if rec.o == owner then
      mine.s = rec.s
      -- This renewal's view was taken before it was sent: a create granted meanwhile
      -- marked the slot sent (and a bind named its task) in Redis. Never undo either,
      -- or a death now would free a slot whose create may have made a task.
      if (rec.w or 1) > mine.w then mine.w = rec.w or 1 end
      if mine.t == '' and rec.t and rec.t ~= '' then mine.t = rec.t; mine.m = rec.m end
      redis.call('HSET', KEYS[2], token, cjson.encode(mine))
    else
      table.insert(lost, token)  -- adopted by another process while our lease had lapsed
    end
  elseif data_lost then
    redis.call('HSET', KEYS[2], token, cjson.encode(mine))
  else
    table.insert(lost, token)
  end
end
redis.call('ZADD', KEYS[1], num(now + tonumber(ARGV[3])), owner)
-- A dead process's tasks still run and hold the key's slots: adopt them. Its slots
-- with no task are freed at once if no create was granted on them (nothing left), else
-- held as uncertain (a create may have made a task), then freed. A record with no
-- mark (written by an older version) counts as sent.
local alive = {}
local function is_alive(o)
  if alive[o] == nil then
    local score = redis.call('ZSCORE', KEYS[1], o)
    alive[o] = score ~= false and tonumber(score) >= now - tonumber(ARGV[3])
  end
  return alive[o]
end
local adopted = {}
local freed = false
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local token, rec = all[i], cjson.decode(all[i + 1])
  if rec.f > 0 and rec.f <= now then
    redis.call('HDEL', KEYS[2], token)
    freed = true
  elseif not is_alive(rec.o) then
    if rec.t == '' and rec.f == 0 and rec.w == 0 then
      redis.call('HDEL', KEYS[2], token)
      freed = true
    else
      if rec.t ~= '' then
        rec.o = owner
        table.insert(adopted, token); table.insert(adopted, rec.t); table.insert(adopted, rec.m)
      elseif rec.f == 0 then
        rec.f = now + tonumber(ARGV[5])
      end
      redis.call('HSET', KEYS[2], token, cjson.encode(rec))
    end
  end
end
local dead_before = '(' .. num(now - tonumber(ARGV[3]))
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', dead_before)) do
  redis.call('ZREM', KEYS[1], dead)
end
for _, ticket in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if not is_alive(string.match(ticket, '^([^:]*)')) then
    redis.call('ZREM', KEYS[3], ticket)
    freed = true
  end
end
if freed then redis.call('PUBLISH', ARGV[6], '{"kind":"freed"}') end
local in_window = redis.call('ZCOUNT', KEYS[7], num(now - tonumber(ARGV[7])), '+inf')
return {epoch, lost, adopted, redis.call('HLEN', KEYS[2]),
        getnum(KEYS[9], tonumber(ARGV[8])), num(getnum(KEYS[8], 1)), in_window}
"""
)

# A process that reserves slots for interactive creates says so when it starts, as if
# one had just come: the reserve holds from then on, not from its first user.
# KEYS: interactive; ARGV: reserved, lend_ms
ANNOUNCE = (
    PRELUDE
    + """
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or '0')
redis.call('HSET', KEYS[1], 'at', num(math.max(at, now)), 'reserved', ARGV[1], 'lend', ARGV[2])
"""
)

# Read the key's figures, writing nothing (an operator's view: sora-async top).
# KEYS: grants, slots, tickets, factor, slot_limit, limited
# ARGV: period_ms, nominal slots
# Also the waiting creates and the slots taken by priority (ranks 0, 1, 2; a slot
# recorded by an older version counts as normal).
READ = (
    PRELUDE
    + """
local waiting = {}
for rank = 0, 2 do
  local top = rank == 2 and '+inf' or ('(' .. num((rank + 1) * 1e12))
  waiting[rank + 1] = redis.call('ZCOUNT', KEYS[3], num(rank * 1e12), top)
end
local slots = {0, 0, 0}
for _, raw in ipairs(redis.call('HVALS', KEYS[2])) do
  local rank = cjson.decode(raw).p or 1
  slots[rank + 1] = slots[rank + 1] + 1
end
return {redis.call('ZCOUNT', KEYS[1], '(' .. num(now - tonumber(ARGV[1])), '+inf'),
        redis.call('HLEN', KEYS[2]), redis.call('ZCARD', KEYS[3]), num(getnum(KEYS[4], 1)),
        getnum(KEYS[5], tonumber(ARGV[2])), getnum(KEYS[6], 0), waiting, slots}
"""
)
