"""A snapshot marked `"reset": true` (issue 14: ticks published but stored nowhere, a gap no
one can fill) is surfaced as a `Reset` event, not filled and not skipped. The service on this
branch never sends one yet, so a scripted peer plays the two connections: the only test of the
SDK that does not talk to the real server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from pricefeed_client import AccessToken, Connected, Disconnected, Gap, PricefeedClient, Reset
from websockets.asyncio.server import ServerConnection, serve

from tests.sdk.support import Seen


def frame(kind: str, seq: int, **more: Any) -> str:
    body = {"type": kind, "symbol": "AAPL", "price": "1.50", "ts": 1764300000000 + seq, "seq": seq}
    return json.dumps({**body, **more})


async def test_a_reset_snapshot_is_an_event_and_the_stream_goes_on() -> None:
    subscribes: list[dict[str, Any]] = []

    async def peer(ws: ServerConnection) -> None:
        subscribes.append(json.loads(await ws.recv()))
        if len(subscribes) == 1:
            await ws.send(frame("snapshot", 5))
            await ws.send(frame("tick", 6))
            await ws.close(1001, "deploy")
        else:
            await ws.send(frame("snapshot", 40, reset=True))
            await ws.send(frame("tick", 41))
            await ws.wait_closed()

    async def provider() -> AccessToken:
        return AccessToken("a-token", time.time() + 300)

    seen = Seen()
    async with serve(peer, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with PricefeedClient(f"http://127.0.0.1:{port}", token_provider=provider) as feed:
            async with asyncio.timeout(10):
                async for item in feed.watch_events(["AAPL"]):
                    seen.add(item)
                    if len(seen.ticks()) == 4:
                        break

    assert subscribes[1]["since"] == {"AAPL": 6}
    assert [t.seq for t in seen.ticks()] == [5, 6, 40, 41]
    assert seen.events(Reset) == [Reset("AAPL", 6, 40)]
    assert seen.events(Gap) == [], "a reset is not a gap to fill"
    assert [type(e) for e in seen.events()] == [Connected, Disconnected, Connected, Reset]
