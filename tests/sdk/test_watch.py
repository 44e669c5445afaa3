"""`PricefeedClient.watch` against a real uvicorn: every tick once and in order across
reconnects, token renewal on the open connection and after a 4408, conflation reported and
refilled, and the closes reconnecting cannot fix raised as their own exceptions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest
from pricefeed_client import (
    Connected,
    Disconnected,
    Dropped,
    Gap,
    NotEntitled,
    PricefeedClient,
    Unauthorized,
    UnknownSymbol,
)
from pricefeed_client.events import StreamEvent

from app.errors import CloseCode
from tests.instruments.admin_support import add_instrument, disable_instrument
from tests.sdk.support import Seen, Tokens, unexplained_jumps
from tests.support import SEED_SYMBOLS, LiveApp

SYMBOLS = SEED_SYMBOLS[:3]
LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]


def contiguous(seqs: list[int]) -> bool:
    return seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_each_reconnect_after_a_working_connection_waits_the_first_step(
    live: LiveFactory,
) -> None:
    """Without the reset, the third reconnect would wait 1 to 2 s; and no tick is lost or
    repeated across the three."""
    seen = Seen()
    async with live() as server, PricefeedClient(server.http) as feed:
        since_connect = 0
        async for item in feed.watch_events(["AAPL"]):
            seen.add(item)
            if isinstance(item, Connected):
                since_connect = 0
            elif not isinstance(item, Disconnected):
                since_connect += 1
                if since_connect == 3:  # this connection worked: now drop it
                    if len(seen.events(Disconnected)) == 3:
                        break
                    await server.app.state.streams.close_all(CloseCode.GOING_AWAY, "test")

    drops = seen.events(Disconnected)
    assert [d.code for d in drops] == [1001] * 3  # type: ignore[union-attr]
    assert all(0.25 <= d.retry_in <= 0.5 for d in drops), drops  # type: ignore[union-attr]
    assert contiguous([t.seq for t in seen.ticks()]), "resumed without gap or repeat"
    assert all(c.resumed for c in seen.events(Connected)[1:])  # type: ignore[union-attr]


async def test_a_token_is_renewed_on_the_open_connection_before_it_expires(
    live: LiveFactory,
) -> None:
    tokens = Tokens(ttl=3)
    seen = Seen()
    async with live() as server, PricefeedClient(server.http, token_provider=tokens) as feed:
        async with asyncio.timeout(20):
            async for item in feed.watch_events(["AAPL"]):
                seen.add(item)
                if tokens.issued == 4:  # three renewals: past the first token's expiry
                    break
    assert seen.events(Disconnected) == [], "renewed in-band, never closed 4408"
    assert len(seen.events(Connected)) == 1
    assert contiguous([t.seq for t in seen.ticks()])


async def test_a_4408_renews_the_token_and_resumes_without_a_gap(live: LiveFactory) -> None:
    tokens = Tokens(ttl=2, lie_first=True)  # the first token is not renewed in time
    seen = Seen()
    async with live() as server, PricefeedClient(server.http, token_provider=tokens) as feed:
        async with asyncio.timeout(20):
            async for item in feed.watch_events(["AAPL", "MSFT"]):
                seen.add(item)
                if len(seen.events(Connected)) == 2 and len(seen.ticks("AAPL")) >= 60:
                    break
    (dropped,) = seen.events(Disconnected)
    assert dropped.code == CloseCode.TOKEN_EXPIRED  # type: ignore[union-attr]
    assert set(seen.events(Connected)[1].resumed) == {"AAPL", "MSFT"}  # type: ignore[union-attr]
    for symbol in ("AAPL", "MSFT"):
        assert contiguous([t.seq for t in seen.ticks(symbol)]), symbol


async def test_a_slow_consumer_is_told_of_conflation_and_gets_the_skipped_ticks(
    live: LiveFactory,
) -> None:
    """The service conflates a reader that falls behind (latest price wins: a seq jump); the
    client reports each jump as a Gap and fills it from /history, so the consumer still sees
    every tick, in order."""
    seen = Seen()
    async with (
        live(feed_ticks_per_second=400, ws_outbox_frames=64, ws_send_buffer_bytes=8192) as server,
        PricefeedClient(server.http, receive_buffer=4096) as feed,
    ):
        async with asyncio.timeout(30):
            async for item in feed.watch_events(SYMBOLS):
                seen.add(item)
                if len(seen.ticks()) == 50:  # stop reading until the service conflates
                    while not any(s.outbox.conflated for s in server.app.state.streams):
                        await asyncio.sleep(0.05)
                gaps = seen.events(Gap)
                if gaps and len(seen.items) - seen.items.index(gaps[0]) > 300:
                    break
    gaps = seen.events(Gap)
    assert sum(g.refilled for g in gaps) > 0  # type: ignore[union-attr]
    assert all(g.missing == 0 for g in gaps), gaps  # type: ignore[union-attr]
    for symbol in SYMBOLS:
        assert contiguous([t.seq for t in seen.ticks(symbol)]), f"{symbol}: refilled in order"
    assert unexplained_jumps(seen) == []


async def test_a_symbol_not_entitled_raises_not_entitled(live: LiveFactory) -> None:
    tokens = Tokens(symbols=["AAPL"])
    async with live() as server, PricefeedClient(server.http, token_provider=tokens) as feed:
        with pytest.raises(NotEntitled) as refused:
            async for _ in feed.watch(["AAPL", "MSFT"]):
                pass
    assert refused.value.code == 4403
    assert "MSFT" in refused.value.reason


async def test_an_unknown_symbol_raises_unknown_symbol(live: LiveFactory) -> None:
    async with live() as server, PricefeedClient(server.http) as feed:
        with pytest.raises(UnknownSymbol) as refused:
            async for _ in feed.watch(["NOPE"]):
                pass
    assert refused.value.code == 4404


async def test_a_token_refused_twice_raises_unauthorized(live: LiveFactory) -> None:
    async def forged() -> object:
        from pricefeed_client import AccessToken

        return AccessToken("not-a-jwt", 2e9)

    async with (
        live() as server,
        PricefeedClient(server.http, token_provider=forged) as feed,  # type: ignore[arg-type]
    ):
        with pytest.raises(Unauthorized) as refused:
            async for _ in feed.watch(["AAPL"]):
                pass
    assert refused.value.code == 4401


async def test_an_instrument_disabled_while_watched_is_dropped_and_the_rest_watched(
    live: LiveFactory, database_url: str
) -> None:
    await asyncio.to_thread(add_instrument, database_url, "XRP-USD")
    seen = Seen()
    async with (
        live(instrument_poll_seconds=0.2) as server,
        PricefeedClient(server.http) as feed,
    ):
        disabling: asyncio.Task[str] | None = None
        async with asyncio.timeout(15):
            async for item in feed.watch_events(["AAPL", "XRP-USD"]):
                seen.add(item)
                if disabling is None and seen.ticks("XRP-USD"):
                    disabling = asyncio.create_task(
                        asyncio.to_thread(disable_instrument, database_url, "XRP-USD")
                    )
                dropped = seen.events(Dropped)
                if dropped and len(seen.items) - seen.items.index(dropped[0]) > 10:
                    break
        assert disabling is not None and await disabling == "disabled XRP-USD"
    (dropped_event,) = seen.events(Dropped)
    assert dropped_event.symbols == ("XRP-USD",)  # type: ignore[union-attr]
    after = seen.items[seen.items.index(dropped_event) + 1 :]
    assert {t.symbol for t in after if not isinstance(t, StreamEvent.__args__)} == {"AAPL"}  # type: ignore[attr-defined]
