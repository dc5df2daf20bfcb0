"""The queue's multi-key updates as Lua scripts: each one runs atomically inside Redis.

A crash (of a worker, a client or Redis itself with AOF on) can only happen between two
scripts, never inside one, so every state below is consistent. Keys are derived from
the prefix passed as ARGV[1] (single-instance Redis; a cluster would need hash tags).

Layout (P = prefix, J = job id, N = shard number):
  P:jobs                zset  J -> created ms
  P:job:J               hash  job record, counters (total/completed/failed/leased/shards_finished,
                              tokens: prompt + completion tokens of its results, the harvested work;
                              device_seconds: the engine time its results took)
  P:job:J:ready         list  shard numbers waiting for a lease
  P:job:J:dead          zset  N -> dead-lettered ms (expires with the job)
  P:job:J:shard:N       hash  state, token, attempts, worker, size, requests (JSON), costs (JSON
                              estimated tokens per request), last_error,
                              visibility_ms, grace, admitted (JSON indices), crashes (JSON index -> n)
  P:job:J:shard:N:results   hash index -> result JSON (HSETNX: the first write wins)
  P:job:J:shard:N:progress  hash index -> progress JSON
  P:classes             zset  deadline class C -> its end ms: classes holding jobs with ready shards
                              (C = the class end in ms, or 'none' for jobs without a window)
  P:class:C             zset  tenant T -> its virtual served tokens in class C (VTC fair share)
  P:class:C:T           zset  T's jobs in class C with ready shards -> turn (round-robin: the
                              least turn goes next, and takes a new one from P:turns)
  P:turns               counter of round-robin turns
  P:served              hash  tenant -> tokens served (estimated at lease, corrected by results)
  P:harvested           hash  tenant -> prompt + completion tokens of its results (no estimates)
  P:device_seconds      hash  tenant -> engine time its results took (a float)
  P:active              list  (older harvest) jobs with ready shards; LEASE moves them into classes
  P:rate:B              hash  results written in the 10 s bucket B: r (requests), t (tokens); 10 min TTL
  P:leases              zset  "J/N" -> lease deadline ms
  P:deadlines           zset  J -> expiry ms (completion window)
  P:retired             zset  J -> ms when its keys expire (a finished job, on the job TTL)
  P:config              hash  job_ttl_ms: how long finished jobs are kept (default 7 days)
  P:clock               string server ms of the last script call (outage detection)
  P:finalizing          set   jobs whose last shard finished
  P:validating          zset  J -> ms by which its submitter must show signs of life (else the
                        job fails and its shards are dropped)
  P:tokens              counter of fencing tokens
"""

CLASS_STEP_MS = 10 * 60 * 1000  # deadlines in the same 10-minute step count as equal (one class)
RATE_BUCKET_MS = 10_000  # results written are counted per 10 s bucket (P:rate:B) ...
RATE_TTL_MS = 10 * 60 * 1000  # ... kept 10 minutes: the fleet's recent throughput, for batch ETAs

PRELUDE = (
    f"""
local CLASS_STEP_MS, RATE_BUCKET_MS, RATE_TTL_MS = {CLASS_STEP_MS}, {RATE_BUCKET_MS}, {RATE_TTL_MS}
"""
    + r"""
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function jkey(job) return P .. ':job:' .. job end
local function skey(job, n) return P .. ':job:' .. job .. ':shard:' .. n end
local TERMINAL = {completed = true, failed = true, expired = true, cancelled = true}
local DEFAULT_JOB_TTL_MS = 7 * 86400 * 1000
local MAX_CRASHES = 2  -- a request in this many crashed leases gets an error record, not another try
local NO_DEADLINE = 9e15  -- the class of jobs without a window sorts after every deadline

-- Leasing order (see docs/QUEUE.md, "Who is leased first"): the earliest deadline class first;
-- within it the tenant with the fewest served tokens (VTC); within that tenant's jobs in the
-- class, round-robin. A job is queued while it has ready shards.
local function class_of(job)
  local expires = tonumber(redis.call('HGET', jkey(job), 'expires_ms') or '0')
  if expires <= 0 then return 'none', NO_DEADLINE end
  local step_end = math.ceil(expires / CLASS_STEP_MS) * CLASS_STEP_MS
  return string.format('%d', step_end), step_end
end

local function tenant_of(job) return redis.call('HGET', jkey(job), 'owner') or '' end

local function enqueue(job)
  local class, score = class_of(job)
  local tenant = tenant_of(job)
  local ck = P .. ':class:' .. class
  local list = ck .. ':' .. tenant
  if redis.call('ZSCORE', list, job) then return end
  redis.call('ZADD', list, redis.call('INCR', P .. ':turns'), job)  -- last in line
  redis.call('ZADD', P .. ':classes', score, class)
  if not redis.call('ZSCORE', ck, tenant) then
    -- a tenant arriving with work starts at the least counter of those waiting (VTC's lift):
    -- time it spent idle earns it no credit to crowd the others out with
    local served = tonumber(redis.call('HGET', P .. ':served', tenant) or '0')
    local least = redis.call('ZRANGE', ck, 0, 0, 'WITHSCORES')
    if least[2] then served = math.max(served, tonumber(least[2])) end
    redis.call('ZADD', ck, served, tenant)
  end
end

-- `job` has no ready shard left (or is closed): take it out of its class
local function leave(class, tenant, job)
  local ck = P .. ':class:' .. class
  redis.call('ZREM', ck .. ':' .. tenant, job)
  if redis.call('ZCARD', ck .. ':' .. tenant) == 0 then
    redis.call('ZREM', ck, tenant)
    if redis.call('ZCARD', ck) == 0 then redis.call('ZREM', P .. ':classes', class) end
  end
end

local function dequeue(job) leave((class_of(job)), tenant_of(job), job) end

-- a job reached a final state: all its keys expire after the store's job TTL, and the job
-- leaves the job list then (the sweep); nothing finished lives forever
local function retire(job, now)
  local jk = jkey(job)
  local ttl = tonumber(redis.call('HGET', P .. ':config', 'job_ttl_ms') or DEFAULT_JOB_TTL_MS)
  for _, key in ipairs({jk, jk .. ':ready', jk .. ':dead'}) do redis.call('PEXPIRE', key, ttl) end
  for n = 0, tonumber(redis.call('HGET', jk, 'num_shards') or '0') - 1 do
    local sk = skey(job, n)
    for _, key in ipairs({sk, sk .. ':results', sk .. ':progress'}) do redis.call('PEXPIRE', key, ttl) end
  end
  redis.call('ZADD', P .. ':retired', now + ttl, job)
end

-- Outages cost no attempts. Every script records the server time of the queue's last call;
-- a lease whose deadline fell in a silence (no call at all) of at least half its visibility
-- timeout could not have been renewed (Redis was down, or unreachable for everyone): it gets
-- one more visibility timeout from now instead of being charged. `grace` makes that once per
-- lease: a renewal clears it, so a holder that really died is reclaimed, and charged, one
-- timeout later. See docs/QUEUE.md.
local function heard(now)
  local last = tonumber(redis.call('GET', P .. ':clock') or now)
  redis.call('SET', P .. ':clock', now)
  if last >= now then return end
  for _, member in ipairs(redis.call('ZRANGE', P .. ':leases', '(' .. last, now, 'BYSCORE')) do
    local job, n = string.match(member, '^(.*)/(%d+)$')
    local s = redis.call('HMGET', skey(job, n), 'visibility_ms', 'grace')
    local visibility = tonumber(s[1] or '30000')
    if s[1] and not s[2] and now - last >= visibility / 2 then  -- s[1]: the shard still exists
      redis.call('ZADD', P .. ':leases', now + visibility, member)
      redis.call('HSET', skey(job, n), 'grace', 1)
    end
  end
end

-- redis.call(cmd, key, unpack(args)) in slices (Lua's stack caps unpack), keeping `group`-sized
-- tuples together; the replies of all slices in one table (HMGET's values, in order)
local function chunked(cmd, key, args, group)
  local out, step = {}, 4000 - 4000 % group
  for s = 1, #args, step do
    local reply = redis.call(cmd, key, unpack(args, s, math.min(#args, s + step - 1)))
    if type(reply) == 'table' then
      for _, v in ipairs(reply) do table.insert(out, v) end
    end
  end
  return out
end

-- the shard is no longer leased: count it off its job and settle a cancelling job
local function unlease(job, n, now)
  redis.call('ZREM', P .. ':leases', job .. '/' .. n)
  local jk = jkey(job)
  if redis.call('EXISTS', jk) == 0 then return end  -- purged or expired: recreate nothing
  local leased = redis.call('HINCRBY', jk, 'leased', -1)
  if leased <= 0 and redis.call('HGET', jk, 'status') == 'cancelling' then
    redis.call('HSET', jk, 'status', 'cancelled', 'cancelled_ms', now)
    retire(job, now)
  end
end

-- a shard reached done or dead: the job may now be finished (true: it just was)
local function shard_finished(job, now)
  local jk = jkey(job)
  local finished = redis.call('HINCRBY', jk, 'shards_finished', 1)
  if finished >= tonumber(redis.call('HGET', jk, 'num_shards'))
      and redis.call('HGET', jk, 'status') == 'in_progress' then
    redis.call('HSET', jk, 'status', 'finalizing', 'finalizing_ms', now)
    redis.call('SADD', P .. ':finalizing', job)
    redis.call('ZREM', P .. ':deadlines', job)
    dequeue(job)
    return true
  end
  return false
end

-- a job that was never queued (rejected, abandoned or cancelled while validating): drop the
-- shards its submitter wrote, so a failed submission leaves no payloads behind
local function discard_shards(job)
  local jk = jkey(job)
  if redis.call('EXISTS', jk) == 0 or redis.call('HEXISTS', jk, 'in_progress_ms') == 1 then return end
  for n = 0, tonumber(redis.call('HGET', jk, 'num_shards') or '0') - 1 do
    local sk = skey(job, n)
    redis.call('DEL', sk, sk .. ':results', sk .. ':progress')
  end
  redis.call('DEL', jk .. ':ready')
  redis.call('HSET', jk, 'num_shards', 0, 'total', 0)
end

local function make_ready(job, n)
  redis.call('HSET', skey(job, n), 'state', 'ready')
  redis.call('LPUSH', jkey(job) .. ':ready', n)  -- front: a retried shard holds older work
  enqueue(job)
end

-- an attempt ended badly (error or expired lease): retry, or dead-letter after max_attempts
local function retry_or_dead(job, n, err, now)
  local sk, jk = skey(job, n), jkey(job)
  redis.call('HSET', sk, 'last_error', err)
  if redis.call('HGET', jk, 'status') ~= 'in_progress' then
    redis.call('HSET', sk, 'state', 'cancelled')
    return 'closed'
  end
  local attempts = tonumber(redis.call('HGET', sk, 'attempts'))
  if attempts < tonumber(redis.call('HGET', jk, 'max_attempts')) then
    make_ready(job, n)
    return 'requeued'
  end
  redis.call('HSET', sk, 'state', 'dead')
  redis.call('ZADD', jk .. ':dead', now, n)
  local record = cjson.encode({status = 'failed', error = {code = 'shard_failed', message = err},
                               finished_at = now / 1000, attempt = attempts})
  local failed = 0
  for i = 0, tonumber(redis.call('HGET', sk, 'size')) - 1 do
    failed = failed + redis.call('HSETNX', sk .. ':results', i, record)
  end
  redis.call('DEL', sk .. ':progress')
  redis.call('HINCRBY', jk, 'failed', failed)
  shard_finished(job, now)
  return 'dead'
end

-- is (job, n) leased under this token? every write a worker makes is fenced by this
local function holds(job, n, token)
  local s = redis.call('HMGET', skey(job, n), 'state', 'token')
  return s[1] == 'leased' and s[2] == token
end

-- A lease ended in a crash (expired, its worker died): each request it admitted to the engine
-- and did not finish is charged one crash; one charged MAX_CRASHES times gets an error record
-- instead of another try, so a request that kills its worker stops killing workers
local function charge_crashes(job, n, now, why)
  local sk, jk = skey(job, n), jkey(job)
  local admitted = cjson.decode(redis.call('HGET', sk, 'admitted') or '[]')
  redis.call('HDEL', sk, 'admitted')
  if #admitted == 0 or redis.call('HGET', jk, 'status') ~= 'in_progress' then return end
  local crashes = cjson.decode(redis.call('HGET', sk, 'crashes') or '{}')
  local failed, seen = 0, {}
  for _, i in ipairs(admitted) do
    -- `seen`: an ADMIT retried after a lost reply recorded its indices twice
    if not seen[i] and redis.call('HEXISTS', sk .. ':results', i) == 0 then
      seen[i] = true
      local c = (crashes[tostring(i)] or 0) + 1
      crashes[tostring(i)] = c
      if c >= MAX_CRASHES then
        local record = cjson.encode({status = 'failed', finished_at = now / 1000,
          error = {code = 'engine_crash', message = 'crashed the engine twice (last: ' .. why .. ')'},
          attempt = tonumber(redis.call('HGET', sk, 'attempts'))})
        failed = failed + redis.call('HSETNX', sk .. ':results', i, record)
        redis.call('HDEL', sk .. ':progress', i)
      end
    end
  end
  redis.call('HSET', sk, 'crashes', cjson.encode(crashes))
  if failed > 0 then redis.call('HINCRBY', jk, 'failed', failed) end
end

-- return expired leases to their jobs (or the dead letters), expire overdue jobs, and drop
-- retired jobs whose keys have expired from the job list
local function sweep(now, limit)
  local reclaimed = 0
  for _, member in ipairs(redis.call('ZRANGE', P .. ':leases', '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)) do
    local job, n = string.match(member, '^(.*)/(%d+)$')
    if redis.call('EXISTS', jkey(job)) == 0 then  -- its job's keys expired: recreate nothing
      redis.call('ZREM', P .. ':leases', member)
    else
      local worker = redis.call('HGET', skey(job, n), 'worker') or '?'
      local why = 'lease expired (worker ' .. worker .. ' stopped renewing)'
      charge_crashes(job, n, now, why)
      unlease(job, n, now)
      retry_or_dead(job, n, why, now)
      reclaimed = reclaimed + 1
    end
  end
  for _, job in ipairs(redis.call('ZRANGE', P .. ':retired', '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)) do
    redis.call('ZREM', P .. ':retired', job)
    redis.call('ZREM', P .. ':jobs', job)
  end
  for _, job in ipairs(redis.call('ZRANGE', P .. ':deadlines', '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)) do
    redis.call('ZREM', P .. ':deadlines', job)
    local jk = jkey(job)
    if redis.call('HGET', jk, 'status') == 'in_progress' then
      redis.call('HSET', jk, 'status', 'expired', 'expired_ms', now)
      dequeue(job)
      redis.call('DEL', jk .. ':ready')
      retire(job, now)
    end
  end
  -- a submitter that died mid-validation leaves its job in validating: fail it and drop the
  -- shards it wrote (nothing of it was ever leasable, so nothing is lost)
  for _, job in ipairs(redis.call('ZRANGE', P .. ':validating', '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)) do
    redis.call('ZREM', P .. ':validating', job)
    local jk = jkey(job)
    if redis.call('HGET', jk, 'status') == 'validating' then
      local why = cjson.encode({{line = 0, unit = 'line', custom_id = cjson.null,
        message = 'submission abandoned: the submitter stopped before the job was queued'}})
      redis.call('HSET', jk, 'status', 'failed', 'failed_ms', now, 'errors', why, 'num_errors', 1)
      discard_shards(job)
      retire(job, now)
    end
  end
  return reclaimed
end

heard(now_ms())
"""
)

# ARGV: prefix, worker -> shards returned to the queue. The controller calls this when it
# sees a worker die, so its shards go back at once instead of after the visibility timeout.
EXPIRE_WORKER = r"""
local worker, now, reclaimed = ARGV[2], now_ms(), 0
for _, member in ipairs(redis.call('ZRANGE', P .. ':leases', 0, -1)) do
  local job, n = string.match(member, '^(.*)/(%d+)$')
  if redis.call('HGET', skey(job, n), 'worker') == worker then
    charge_crashes(job, n, now, 'worker ' .. worker .. ' died')
    unlease(job, n, now)
    retry_or_dead(job, n, 'worker ' .. worker .. ' died', now)
    reclaimed = reclaimed + 1
  end
end
return reclaimed
"""

# ARGV: prefix, job, submitter timeout ms, then the record's (field, value) pairs -> 'validating'
# The record and its submitter's deadline in one step: no job is ever left without a deadline.
CREATE = r"""
local job, now = ARGV[2], now_ms()
redis.call('HSET', jkey(job), 'status', 'validating', 'created_ms', now, unpack(ARGV, 4))
redis.call('ZADD', P .. ':jobs', now, job)
redis.call('ZADD', P .. ':validating', now + tonumber(ARGV[3]), job)
return 'validating'
"""

# ARGV: prefix, job, timeout_ms -> the job's status; 'validating' when the deadline was pushed
# back. On the server's clock, like every lease and deadline. A heartbeat that finds the job
# gone from validating (cancelled, or failed by a sweep) tells the submitter to stop.
VALIDATING = r"""
local job = ARGV[2]
local status = redis.call('HGET', jkey(job), 'status')
if status ~= 'validating' then return status or 'gone' end
redis.call('ZADD', P .. ':validating', 'XX', now_ms() + tonumber(ARGV[3]), job)
return 'validating'
"""

# ARGV: prefix, job, first shard number, then (size, requests JSON, costs JSON) per shard
# -> 'ok', or the job's status when it is no longer validating (then nothing is written).
# Idempotent: a write retried after a lost reply finds its shards there and adds nothing twice.
ADD_SHARDS = r"""
local job, first = ARGV[2], tonumber(ARGV[3])
local jk = jkey(job)
local status = redis.call('HGET', jk, 'status')
if status ~= 'validating' then return status or 'gone' end
for i = 4, #ARGV, 3 do
  local n = first + (i - 4) / 3
  local sk = skey(job, n)
  if redis.call('EXISTS', sk) == 0 then
    redis.call('HSET', sk, 'state', 'ready', 'size', ARGV[i], 'attempts', 0, 'token', 0,
               'requests', ARGV[i + 1], 'costs', ARGV[i + 2])
    redis.call('RPUSH', jk .. ':ready', n)
    redis.call('HINCRBY', jk, 'num_shards', 1)
    redis.call('HINCRBY', jk, 'total', tonumber(ARGV[i]))
  end
end
return 'ok'
"""

# ARGV: prefix, job -> new status
ACTIVATE = r"""
local job = ARGV[2]
local jk = jkey(job)
redis.call('ZREM', P .. ':validating', job)
if redis.call('HGET', jk, 'status') ~= 'validating' then return redis.call('HGET', jk, 'status') end
local window = tonumber(redis.call('HGET', jk, 'completion_window_ms') or '0')
local now = now_ms()
redis.call('HSET', jk, 'status', 'in_progress', 'in_progress_ms', now)
if window > 0 then
  redis.call('HSET', jk, 'expires_ms', now + window)
  redis.call('ZADD', P .. ':deadlines', now + window, job)
end
if tonumber(redis.call('HGET', jk, 'num_shards')) == 0 then
  redis.call('HSET', jk, 'status', 'finalizing', 'finalizing_ms', now)
  redis.call('SADD', P .. ':finalizing', job)
  return 'finalizing'
end
enqueue(job)
return 'in_progress'
"""

# ARGV: prefix, worker, visibility_ms, max_shards, sweep_limit
# -> {{job, n, token, attempts, requests, {done indices}, {index, progress, ...}, crashes JSON}, ...}
# O(log n) per shard in the number of classes, tenants and jobs waiting: each pass either leases
# a shard or drops one stale entry (an empty job, tenant or class; a counter behind its tenant's).
LEASE = r"""
local worker, visibility, max_shards = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
sweep(now, tonumber(ARGV[5]))
if redis.call('EXISTS', P .. ':active') == 1 then
  -- jobs queued by an older harvest, in one round-robin list: queue them in their classes, once
  for _, job in ipairs(redis.call('LRANGE', P .. ':active', 0, -1)) do enqueue(job) end
  redis.call('DEL', P .. ':active')
end
local got = {}
while #got < max_shards do
  local class = redis.call('ZRANGE', P .. ':classes', 0, 0)[1]  -- the earliest deadline class
  if not class then break end
  local ck = P .. ':class:' .. class
  local least = redis.call('ZRANGE', ck, 0, 0, 'WITHSCORES')  -- its least-served tenant
  if not least[1] then
    redis.call('ZREM', P .. ':classes', class)
  else
    local tenant, counter = least[1], tonumber(least[2])
    local served = tonumber(redis.call('HGET', P .. ':served', tenant) or '0')
    local list = ck .. ':' .. tenant
    local job = redis.call('ZRANGE', list, 0, 0)[1]  -- its job whose turn it is
    if served > counter then
      -- served in another class since it was last ranked here: rank it by what it has had
      redis.call('ZADD', ck, served, tenant)
    elseif not job then
      redis.call('ZREM', ck, tenant)
    else
      local jk = jkey(job)
      local n = false
      if redis.call('HGET', jk, 'status') == 'in_progress' then n = redis.call('LPOP', jk .. ':ready') end
      if not n then
        leave(class, tenant, job)
      else
        redis.call('ZADD', list, redis.call('INCR', P .. ':turns'), job)  -- to the back of the line
        local sk = skey(job, n)
        local token = redis.call('INCR', P .. ':tokens')
        local attempts = redis.call('HINCRBY', sk, 'attempts', 1)
        redis.call('HSET', sk, 'state', 'leased', 'token', token, 'worker', worker, 'leased_ms', now,
                   'visibility_ms', visibility)
        redis.call('HDEL', sk, 'grace', 'admitted')
        redis.call('HINCRBY', jk, 'leased', 1)
        redis.call('ZADD', P .. ':leases', now + visibility, job .. '/' .. n)
        local done = redis.call('HKEYS', sk .. ':results')
        -- charge the tenant the estimate of what is left to run; results correct it
        local costs, finished, cost = cjson.decode(redis.call('HGET', sk, 'costs') or '[]'), {}, 0
        for _, i in ipairs(done) do finished[tonumber(i)] = true end
        for i, c in ipairs(costs) do if not finished[i - 1] then cost = cost + c end end
        redis.call('HINCRBY', P .. ':served', tenant, cost)
        redis.call('ZINCRBY', ck, cost, tenant)
        table.insert(got, {job, n, token, attempts, redis.call('HGET', sk, 'requests'), done,
                           redis.call('HGETALL', sk .. ':progress'),
                           redis.call('HGET', sk, 'crashes') or '{}'})
      end
    end
  end
end
return got
"""

# ARGV: prefix, job, n, token, visibility_ms -> ok | lost | closed
RENEW = r"""
local job, n, token = ARGV[2], ARGV[3], ARGV[4]
if not holds(job, n, token) then return 'lost' end
local status = redis.call('HGET', jkey(job), 'status')
if status ~= 'in_progress' then return 'closed' end
redis.call('ZADD', P .. ':leases', now_ms() + tonumber(ARGV[5]), job .. '/' .. n)
redis.call('HSET', skey(job, n), 'visibility_ms', ARGV[5])
redis.call('HDEL', skey(job, n), 'grace')
return 'ok'
"""

# ARGV: prefix, job, n, token, then (index, 'c'|'f', tokens, device seconds, result JSON) quintuples
# -> {'ok'|'dup', ...} per result, or 'lost' | 'closed' for all of them.
# A handful of commands per call, not per result: Lua's per-call cost dominates otherwise.
# New results correct their tenant's served tokens (the lease charged an estimate), count
# toward the fleet's recent throughput (P:rate, read for batch ETAs) and toward the harvested
# tokens and device seconds of their job and tenant (read for metrics and `harvest status`).
WRITE_RESULTS = r"""
local job, n, token = ARGV[2], ARGV[3], ARGV[4]
if not holds(job, n, token) then return 'lost' end
local jk, sk = jkey(job), skey(job, n)
local status = redis.call('HGET', jk, 'status')
if status ~= 'in_progress' and status ~= 'cancelling' then return 'closed' end
local indices = {}
for i = 5, #ARGV, 5 do table.insert(indices, ARGV[i]) end
local have = chunked('HMGET', sk .. ':results', indices, 1)
local costs = cjson.decode(redis.call('HGET', sk, 'costs') or '[]')
local out, new, counts, tokens, correction, seconds = {}, {}, {c = 0, f = 0}, 0, 0, 0
for k, index in ipairs(indices) do
  if have[k] then
    table.insert(out, 'dup')
  else
    local i = 5 * k
    table.insert(out, 'ok')
    table.insert(new, index)
    table.insert(new, ARGV[i + 4])
    counts[ARGV[i + 1]] = counts[ARGV[i + 1]] + 1
    tokens = tokens + tonumber(ARGV[i + 2])
    seconds = seconds + tonumber(ARGV[i + 3])
    correction = correction + tonumber(ARGV[i + 2]) - (costs[tonumber(index) + 1] or 0)
  end
end
if #new > 0 then
  chunked('HSET', sk .. ':results', new, 2)
  chunked('HDEL', sk .. ':progress', indices, 1)
  local tenant = tenant_of(job)
  redis.call('HINCRBY', P .. ':served', tenant, correction)
  redis.call('HINCRBY', P .. ':harvested', tenant, tokens)
  redis.call('HINCRBY', jk, 'tokens', tokens)
  if seconds > 0 then
    local s = string.format('%.6f', seconds)
    redis.call('HINCRBYFLOAT', P .. ':device_seconds', tenant, s)
    redis.call('HINCRBYFLOAT', jk, 'device_seconds', s)
  end
  local class = class_of(job)
  if redis.call('ZSCORE', P .. ':class:' .. class, tenant) then
    redis.call('ZINCRBY', P .. ':class:' .. class, correction, tenant)
  end
  local bucket = P .. ':rate:' .. math.floor(now_ms() / RATE_BUCKET_MS)
  redis.call('HINCRBY', bucket, 'r', #new / 2)
  redis.call('HINCRBY', bucket, 't', tokens)
  redis.call('PEXPIRE', bucket, RATE_TTL_MS)
end
if counts.c > 0 then redis.call('HINCRBY', jk, 'completed', counts.c) end
if counts.f > 0 then redis.call('HINCRBY', jk, 'failed', counts.f) end
return out
"""

# ARGV: prefix, job, n, token, then (index, progress JSON) pairs -> ok | lost | closed
SAVE_PROGRESS = r"""
local job, n, token = ARGV[2], ARGV[3], ARGV[4]
if not holds(job, n, token) then return 'lost' end
local status = redis.call('HGET', jkey(job), 'status')
if status ~= 'in_progress' and status ~= 'cancelling' then return 'closed' end
local sk = skey(job, n)
for i = 5, #ARGV, 2 do
  if redis.call('HEXISTS', sk .. ':results', ARGV[i]) == 0 then
    redis.call('HSET', sk .. ':progress', ARGV[i], ARGV[i + 1])
  end
end
return 'ok'
"""

# ARGV: prefix, job, n, token -> ok | last (ok, and the job's last shard) | lost | incomplete
ACK = r"""
local job, n, token = ARGV[2], ARGV[3], ARGV[4]
if not holds(job, n, token) then return 'lost' end
local sk = skey(job, n)
if redis.call('HLEN', sk .. ':results') < tonumber(redis.call('HGET', sk, 'size')) then
  return 'incomplete'
end
local now = now_ms()
redis.call('HSET', sk, 'state', 'done')
redis.call('DEL', sk .. ':progress')
unlease(job, n, now)
return shard_finished(job, now) and 'last' or 'ok'
"""

# ARGV: prefix, job, n, token, error, crashed ('1': the worker's engine died: charge the
# admitted requests, as an expiry would) -> requeued | dead | closed | lost
FAIL = r"""
local job, n, token = ARGV[2], ARGV[3], ARGV[4]
if not holds(job, n, token) then return 'lost' end
local now = now_ms()
if ARGV[6] == '1' then charge_crashes(job, n, now, ARGV[5]) end
unlease(job, n, now)
return retry_or_dead(job, n, ARGV[5], now)
"""

# give a shard back without using up an attempt (graceful shutdown, job cancelled/expired)
# ARGV: prefix, job, n, token -> requeued | closed | lost
RELEASE = r"""
local job, n, token = ARGV[2], ARGV[3], ARGV[4]
if not holds(job, n, token) then return 'lost' end
unlease(job, n, now_ms())
redis.call('HDEL', skey(job, n), 'admitted')  -- a graceful stop charges no crash
if redis.call('HGET', jkey(job), 'status') ~= 'in_progress' then
  redis.call('HSET', skey(job, n), 'state', 'cancelled')
  return 'closed'
end
redis.call('HINCRBY', skey(job, n), 'attempts', -1)
make_ready(job, n)
return 'requeued'
"""

# ARGV: prefix, limit -> {reclaimed leases, jobs waiting in finalizing}
SWEEP = r"""
local reclaimed = sweep(now_ms(), tonumber(ARGV[2]))
return {reclaimed, redis.call('SMEMBERS', P .. ':finalizing')}
"""

# ARGV: prefix, job -> status after the call
FINALIZE = r"""
local job = ARGV[2]
local jk = jkey(job)
redis.call('SREM', P .. ':finalizing', job)
if redis.call('HGET', jk, 'status') == 'finalizing' then
  local now = now_ms()
  redis.call('HSET', jk, 'status', 'completed', 'completed_ms', now)
  retire(job, now)
end
return redis.call('HGET', jk, 'status')
"""

# ARGV: prefix, job -> status after the call (false: no such job)
CANCEL = r"""
local job = ARGV[2]
local jk = jkey(job)
local status = redis.call('HGET', jk, 'status')
if status ~= 'in_progress' and status ~= 'validating' then return status end
local now = now_ms()
dequeue(job)
redis.call('DEL', jk .. ':ready')
redis.call('ZREM', P .. ':deadlines', job)
if tonumber(redis.call('HGET', jk, 'leased') or '0') > 0 then
  redis.call('HSET', jk, 'status', 'cancelling', 'cancelling_ms', now)
else
  redis.call('HSET', jk, 'status', 'cancelled', 'cancelling_ms', now, 'cancelled_ms', now)
  retire(job, now)
end
if status == 'validating' then  -- cancelled mid-submission: its submitter writes no more shards
  redis.call('ZREM', P .. ':validating', job)
  discard_shards(job)
end
return redis.call('HGET', jk, 'status')
"""

# ARGV: prefix, job, errors JSON, num_errors -> status after the call
# A job still validating fails with these errors; one that was never queued (failed or
# cancelled meanwhile) loses whatever shards were written for it.
REJECT = r"""
local job = ARGV[2]
local jk = jkey(job)
redis.call('ZREM', P .. ':validating', job)
if redis.call('HGET', jk, 'status') == 'validating' then
  redis.call('HSET', jk, 'status', 'failed', 'failed_ms', now_ms(), 'errors', ARGV[3], 'num_errors', ARGV[4])
  retire(ARGV[2], now_ms())
end
local status = redis.call('HGET', jk, 'status')
if status == 'failed' or status == 'cancelled' then discard_shards(job) end
return status
"""

# ARGV: prefix, job, n, token, then request indices -> ok | lost
# Called before those requests go into the engine: if the lease then ends in a crash, they
# are the ones charged (`charge_crashes`).
ADMIT = r"""
local job, n, token = ARGV[2], ARGV[3], ARGV[4]
if not holds(job, n, token) then return 'lost' end
local sk = skey(job, n)
local admitted = cjson.decode(redis.call('HGET', sk, 'admitted') or '[]')
for i = 5, #ARGV do table.insert(admitted, tonumber(ARGV[i])) end
redis.call('HSET', sk, 'admitted', cjson.encode(admitted))
return 'ok'
"""

# ARGV: prefix, job, force ('1': cancel a job that is not finished, then purge it)
# -> {'purged', keys deleted} | {'refused', status} | false (no such job)
PURGE = r"""
local job, force = ARGV[2], ARGV[3] == '1'
local jk = jkey(job)
local status = redis.call('HGET', jk, 'status')
if not status then return false end
if not TERMINAL[status] and not force then return {'refused', status} end
dequeue(job)
local keys = {jk, jk .. ':ready', jk .. ':dead'}
for n = 0, tonumber(redis.call('HGET', jk, 'num_shards') or '0') - 1 do
  local sk = skey(job, n)
  redis.call('ZREM', P .. ':leases', job .. '/' .. n)  -- a holder's next write answers 'lost'
  for _, key in ipairs({sk, sk .. ':results', sk .. ':progress'}) do table.insert(keys, key) end
end
local deleted = 0
for s = 1, #keys, 1000 do deleted = deleted + redis.call('DEL', unpack(keys, s, math.min(#keys, s + 999))) end
for _, set in ipairs({':jobs', ':retired', ':deadlines', ':validating'}) do
  redis.call('ZREM', P .. set, job)
end
redis.call('SREM', P .. ':finalizing', job)
return {'purged', deleted}
"""
