//! The Lua scripts of the Redis coordinator. Each runs atomically in Redis; the keys
//! they use are described in the parent module. Their rule is the one of
//! [`crate::schedule`], and `subscriber/tests/redis_plan.rs` checks that `PLAN` plans
//! what the in-process plan does.

pub(super) const CHECK: &str = r#"
local init = redis.call('GET', KEYS[1])
if not init then return -1 end
local complete = init == '1'
local w = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) <= w or redis.call('ZSCORE', KEYS[4], ARGV[2]) then return 0 end
if ARGV[1] == 's' then
  if w + 1 >= tonumber(ARGV[2]) then return 0 else return 1 end
end
local n = (#ARGV - 2) / 4
for i = 0, n - 1 do
  local b = 3 + i * 4
  local after = tonumber(ARGV[b + 3])
  if w < after then
    local c = redis.call('HGET', KEYS[3], ARGV[b])
    if c then c = tonumber(c) elseif complete then c = 0 end
    local v = tonumber(ARGV[b + 1])
    local ok = false
    if c then
      if ARGV[b + 2] == 'w' then ok = c + 1 >= v else ok = c >= v end
    end
    if not ok then return i + 1 end
  end
end
return 0
"#;

pub(super) const APPLIED: &str = r#"
local init = redis.call('GET', KEYS[1])
if not init then return -1 end
local complete = init == '1'
local seq = tonumber(ARGV[1])
local w = tonumber(redis.call('GET', KEYS[2]) or '0')
if seq <= w or redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[3], seq, ARGV[1])
while redis.call('ZSCORE', KEYS[3], tostring(w + 1)) do
  redis.call('ZREM', KEYS[3], tostring(w + 1))
  w = w + 1
end
redis.call('SET', KEYS[2], tostring(w))
local n = (#ARGV - 1) / 3
for i = 0, n - 1 do
  local b = 2 + i * 3
  local k = ARGV[b]
  local v = tonumber(ARGV[b + 1])
  local c = redis.call('HGET', KEYS[4], k)
  if ARGV[b + 2] == 'w' then
    if (not c) or tonumber(c) < v then redis.call('HSET', KEYS[4], k, ARGV[b + 1]) end
  else
    if c then c = tonumber(c) elseif complete then c = 0 end
    if c and c >= v then redis.call('HSET', KEYS[4], k, tostring(c + 1)) end
  end
end
return 1
"#;

/// Seeds a stream's state from a store read taken after the epoch ARGV[3] was read
/// (KEYS[4]): -2, and nothing written, when the epoch changed since (the state the
/// read should replace may have recorded applies the read does not show).
pub(super) const INIT: &str = r#"
if redis.call('GET', KEYS[4]) ~= ARGV[3] then return -2 end
if redis.call('GET', KEYS[1]) then return 0 end
local w = tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if cur > w then w = cur end
for i = 4, #ARGV do
  local s = tonumber(ARGV[i])
  if s > w then redis.call('ZADD', KEYS[3], s, ARGV[i]) end
end
while redis.call('ZSCORE', KEYS[3], tostring(w + 1)) do
  redis.call('ZREM', KEYS[3], tostring(w + 1))
  w = w + 1
end
redis.call('SET', KEYS[2], tostring(w))
redis.call('SET', KEYS[1], ARGV[2])
return 1
"#;

/// The app's epoch: created (from Redis's clock, so a new incarnation gets a new one)
/// when missing.
pub(super) const EPOCH: &str = r#"
local e = redis.call('GET', KEYS[1])
if e then return e end
local t = redis.call('TIME')
e = t[1] .. '.' .. t[2]
redis.call('SET', KEYS[1], e)
return e
"#;

/// Marks what a store recorded as applied in existing state: ARGV the store's
/// watermark, then seqs applied above it. -1 without state; 1 when something changed
/// (then absent counters are unknown: the missed applies did not move them).
pub(super) const MERGE: &str = r#"
if not redis.call('GET', KEYS[1]) then return -1 end
local w = tonumber(redis.call('GET', KEYS[2]) or '0')
local changed = 0
local through = tonumber(ARGV[1])
if through > w then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', through)
  w = through
  changed = 1
end
for i = 2, #ARGV do
  local s = tonumber(ARGV[i])
  if s > w and not redis.call('ZSCORE', KEYS[3], ARGV[i]) then
    redis.call('ZADD', KEYS[3], s, ARGV[i])
    changed = 1
  end
end
while redis.call('ZSCORE', KEYS[3], tostring(w + 1)) do
  redis.call('ZREM', KEYS[3], tostring(w + 1))
  w = w + 1
end
redis.call('SET', KEYS[2], tostring(w))
if changed == 1 then redis.call('SET', KEYS[1], '0') end
return changed
"#;

pub(super) const JOIN: &str = r#"
if not redis.call('GET', KEYS[1]) then return -1 end
local w = tonumber(redis.call('GET', KEYS[2]) or '0')
local through = tonumber(ARGV[1])
if w ~= 0 or through <= w then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', through)
w = through
while redis.call('ZSCORE', KEYS[3], tostring(w + 1)) do
  redis.call('ZREM', KEYS[3], tostring(w + 1))
  w = w + 1
end
redis.call('SET', KEYS[2], tostring(w))
redis.call('SET', KEYS[1], '0')
return 1
"#;

/// Plans a chain over one stream's waiting transactions (sorted by sequence number),
/// atomically against the shared state: an overlay (watermark, applied set, counters)
/// takes each planned transaction as applied, exactly as the in-process plan does
/// ([`crate::schedule::Plan`]). Nothing in Redis changes. ARGV: mode, the room left in
/// the chain, then the transactions packed in one binary string (little-endian; see
/// `pack_plan`): per transaction its seq (u64) and number of deps (u32), then per dep
/// key (u32), version (u64), after (u64), kind (u8: 1 write) and whether it is relevant
/// to the mode (u8). One string rather than five arguments per dependency: a window of
/// a few hundred transactions with ~8 dependencies each made every call carry ~15,000
/// arguments, which both sides spent most of their time formatting and parsing.
/// Answers one code per transaction: 0 in the chain, -2 ready but the chain is full,
/// n > 0 waits for dep n; or `{-1}` when the stream has no state. Every dep moves the
/// overlay's counters; only those marked relevant to the mode are checked, as in
/// [`crate::schedule`].
pub(super) const PLAN: &str = r#"
local init = redis.call('GET', KEYS[1])
if not init then return {-1} end
local complete = init == '1'
local w = tonumber(redis.call('GET', KEYS[2]) or '0')
local mine = {}
local counters = {}
local function applied(s)
  return s <= w or mine[s] or redis.call('ZSCORE', KEYS[4], tostring(s))
end
local function counter(k)
  local c = counters[k]
  if c then return c end
  c = redis.call('HGET', KEYS[3], k)
  if c then return tonumber(c) end
  if complete then return 0 end
  return nil
end
local serial = ARGV[1] == 's'
local room = tonumber(ARGV[2])
local blob = ARGV[3]
local len = #blob
local pos = 1
local dk, dv, da, dw, don = {}, {}, {}, {}, {}
local out = {}
while pos <= len do
  local seq, n
  seq, n, pos = struct.unpack('<I8I4', blob, pos)
  for i = 1, n do
    local k
    k, dv[i], da[i], dw[i], don[i], pos = struct.unpack('<I4I8I8BB', blob, pos)
    dk[i] = tostring(k)
  end
  local code = 0
  if not applied(seq) then
    if serial then
      if w + 1 < seq then code = 1 end
    else
      for i = 1, n do
        if don[i] == 1 and w < da[i] then
          local c = counter(dk[i])
          local ok = false
          if c then
            if dw[i] == 1 then ok = c + 1 >= dv[i] else ok = c >= dv[i] end
          end
          if not ok then code = i; break end
        end
      end
    end
  end
  if code == 0 and room <= 0 then code = -2 end
  if code == 0 then
    room = room - 1
    if not applied(seq) then
      mine[seq] = true
      while applied(w + 1) do w = w + 1 end
      for i = 1, n do
        local k = dk[i]
        local c = counter(k)
        if dw[i] == 1 then
          if (not c) or c < dv[i] then counters[k] = dv[i] end
        elseif c and c >= dv[i] then
          counters[k] = c + 1
        end
      end
    end
  end
  out[#out + 1] = code
end
return out
"#;

pub(super) const MEMBERS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#;

pub(super) const HOLD: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#;
