"""The Redis tick store's one write: an atomic Lua script, and the arguments it takes for a
batch's runs (app/prices/store.py's `RedisTickStore` sends it, alone or as the first part of
the broker's store-and-publish script)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.prices.store import Chain, Run

# Atomic append of a burst: the fence check, the chain check (the write this one follows was
# kept: the name of the last write taken is kept beside the leader key), then per run its inbox
# mark (if any), its stream entries (each ID is the seq, so a replayed or stale seq is refused
# by Redis itself: those come first in a run, and are counted), the latest hash and the candle
# states; last, this write's name, so that a write that failed midway is never followed.
#
# Candles: each symbol's forming candle of every interval is a field of one hash, the closed
# ones a sorted set per interval scored by start, trimmed to `candles kept` - 1. A run's
# forming candles are one HSET; a candle goes to its sorted set only as it closes (a run
# carries the final state of each candle it closed, before the next one: app/feed/stamping.py).
# A sorted set that holds the forming candle as well, as this store wrote it before, is read
# the same: `read_candles` takes the hash's candle for that start.
#
# A run comes as one argument, its fields joined by newlines (none of them holds one: JSON
# escapes its own), so the script reads them in order with string.find: Redis's Lua spent
# more on decoding a batch's JSON and building tables from it than on the commands, and one
# argument per field cost the producer more than the JSON (docs/performance.md).
# KEYS: leader, latest, marks, last write; then per run its stream, its forming hash and the
# sorted set of each candle it closed.
# ARGV: fence, retention, candles kept, number of runs, this write's name, the name of the
# write it follows ('' for either: no chain); then one per run: symbol, mark or '', its
# numbers of ticks, closed candles and forming candles, then seq and frame per tick, start
# and candle per closed candle, interval and candle per forming one.
# It is also the first part of the broker's store-and-publish script (`ScriptedWrite`), as a
# function body: only `return` leaves it.
APPEND_LUA = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER')
end
if ARGV[6] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[6] then
  return redis.error_reply('EARLIERMISSING the write this one follows was not kept')
end
local retention, kept = ARGV[2], tonumber(ARGV[3])
local run, at = '', 1
local function field()
  local to = string.find(run, '\\n', at, true)
  local value = string.sub(run, at, (to or 0) - 1)
  at = (to or #run) + 1
  return value
end
local skipped = {}
local k = 5
for i = 1, tonumber(ARGV[4]) do
  run, at = ARGV[6 + i], 1
  local symbol, mark = field(), field()
  local ticks, closed, forming = tonumber(field()), tonumber(field()), tonumber(field())
  local stream = KEYS[k]
  if mark ~= '' then
    redis.call('HSET', KEYS[3], symbol, mark)
  end
  local refused, last = 0, nil
  for _ = 1, ticks do
    local seq, tick = field(), field()
    local ok = redis.pcall('XADD', stream, 'MAXLEN', '~', retention, seq .. '-0', 't', tick)
    if type(ok) == 'table' and ok.err then
      refused = refused + 1
    else
      last = tick
    end
  end
  if last ~= nil then
    redis.call('HSET', KEYS[2], symbol, last)
    for j = 0, closed - 1 do
      local set, start, candle = KEYS[k + 2 + j], field(), field()
      if redis.call('ZREMRANGEBYSCORE', set, start, start) == 0 then
        redis.call('ZADD', set, start, candle)
        redis.call('ZREMRANGEBYRANK', set, 0, -kept)
      else
        redis.call('ZADD', set, start, candle)
      end
    end
    if forming > 0 then
      local values = {}
      for j = 1, 2 * forming do
        values[j] = field()
      end
      redis.call('HSET', KEYS[k + 1], unpack(values))
    end
  end
  k = k + 2 + closed
  skipped[i] = refused
end
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[4], ARGV[5])
end
return skipped
"""


def arguments(
    runs: Sequence[Run],
    keys: list[str],
    *,
    prefix: str,
    retention: int,
    candles_kept: int,
    fence: str | None,
    chain: Chain | None,
) -> tuple[list[str], list[str | int | bytes]]:
    """`APPEND_LUA`'s keys and arguments for `runs`, after `keys` (leader, latest, marks,
    last write) under the store's key `prefix`."""
    args: list[str | int | bytes] = [
        fence or "",
        retention,
        candles_kept,
        len(runs),
        chain.name if chain is not None else "",
        (chain.follows or "") if chain is not None else "",
    ]
    for run in runs:
        # The keys spelt out, one loop over the candles: this runs for every tick stamped.
        symbol = run.symbol
        # The store's `_stream_key` and `_forming_key`, then a `_candle_key` per closed candle.
        keys += (f"{prefix}:ticks:{symbol}", f"{prefix}:candle:{symbol}")
        forming: dict[str, tuple[int, str]] = {}
        closed: list[str] = []
        for interval, candle in run.candles:
            earlier = forming.get(interval)
            if earlier is not None:  # closed by the state after it
                keys.append(f"{prefix}:candles:{symbol}:{interval}")
                closed += (str(earlier[0]), earlier[1])
            forming[interval] = (candle.start, candle.encode())
        ticks = run.ticks
        fields = [symbol, run.mark or "", str(len(ticks)), str(len(closed) // 2)]
        fields.append(str(len(forming)))
        for tick in ticks:
            fields += (str(tick.seq), tick.frame)
        fields += closed
        for interval, (_start, text) in forming.items():
            fields += (interval, text)
        joined = "\n".join(fields)
        if joined.count("\n") != len(fields) - 1:
            raise ValueError(f"a field of {symbol}'s run holds a newline")
        args.append(joined)
    return keys, args
