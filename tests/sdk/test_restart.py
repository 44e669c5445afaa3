"""The SDK's watch across a restart of the server process itself (SIGKILL, then the same
port again): it reconnects with backoff, resumes with `since`, and what the restarted
service cannot replay is reported, never skipped silently."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from pricefeed_client import Connected, Disconnected, PricefeedClient, Tick

from tests.sdk.support import Seen, unexplained_jumps
from tests.support import running, server_process

pytestmark = pytest.mark.slow


async def test_a_server_restart_mid_stream_is_reconnected_and_reported(
    tmp_path: Path, database_url: str
) -> None:
    server = server_process(tmp_path, "restarted", database_url)
    seen = Seen()
    with running(server):
        await server.wait_ready()
        async with PricefeedClient(server.http) as feed:
            restarted = False
            async with asyncio.timeout(60):
                async for item in feed.watch_events(["AAPL", "BTC-USD"]):
                    seen.add(item)
                    if not restarted and len(seen.ticks()) == 20:
                        server.stop(signal.SIGKILL)  # no goodbye: the connection just drops
                        server.start()
                        restarted = True
                    connects = seen.events(Connected)
                    if len(connects) == 2:
                        after = seen.items[seen.items.index(connects[1]) :]
                        ticks = [i.symbol for i in after if isinstance(i, Tick)]
                        if min(ticks.count("AAPL"), ticks.count("BTC-USD")) >= 5:
                            break  # both stream again

    (dropped, *_) = seen.events(Disconnected)
    assert dropped.code is None, "dropped, not closed"  # type: ignore[union-attr]
    first, second = seen.events(Connected)
    assert set(second.resumed) == {"AAPL", "BTC-USD"}  # type: ignore[union-attr]
    assert unexplained_jumps(seen) == [], "every seq jump or restart is reported"
