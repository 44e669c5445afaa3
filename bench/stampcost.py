"""In-process Python per tick of the producer's path, for callgrind: the simulated quote (q), the
stamp (s), the store's write arguments (w), the witness's decoding (t), over N batches of 10.

    PYTHONPATH=<tree> valgrind --tool=callgrind .venv/bin/python bench/stampcost.py 600 qswt
"""

import sys
import time
from decimal import Decimal

from app.broker import price_channel
from app.feed.resume import FeedState
from app.feed.sources.simulated import SimulatedSource
from app.feed.stamping import Stamper
from app.feed.witness import PublishedTicks
from app.instruments.repository import InstrumentInfo
from app.prices.store import Chain, RedisTickStore


class FakeRedis:
    def register_script(self, s):
        return None


N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
parts = sys.argv[2] if len(sys.argv) > 2 else "qswt"
kinds = [("equity", 2, "189.23"), ("crypto", 2, "64000.12"), ("fx", 5, "1.08345")]
insts = [
    InstrumentInfo(f"S{i}", "n", kinds[i % 3][0], kinds[i % 3][1], Decimal(kinds[i % 3][2]))
    for i in range(50)
]
src = SimulatedSource(ticks_per_second=20, seed=7)
state = FeedState()
stamper = Stamper(state)
store = RedisTickStore(FakeRedis(), prefix="p", retention=1000, candles_kept=100)
w = PublishedTicks(None, None, keep=100)
last = {i.symbol: i.reference_price for i in insts}
t0 = time.perf_counter()
for n in range(N):
    part = insts[(n % 5) * 10 : (n % 5) * 10 + 10]
    batch = [src.quote(i, last[i.symbol]) for i in part]
    for q in batch:
        last[q.symbol] = q.price
    if "s" in parts:
        runs = [stamper.stamp(q.symbol, [(q, None)]) for q in batch]
        for r in runs:
            state.take_run(r, r.candles and last[r.symbol])
        if "w" in parts:
            store._write(runs, fence="f", chain=Chain("a", "b"))
        if "t" in parts:
            w._on_burst([(price_channel(r.symbol), t.frame) for r in runs for t in r.ticks])
dt = time.perf_counter() - t0
print(f"{parts}: {dt / (N * 10) * 1e6:.2f} us/tick")
