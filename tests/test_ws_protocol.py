"""The WebSocket protocol pricefeed runs under uvicorn (app/ws_protocol.py), against a real
server: what it changes must not change what a client sees."""

from __future__ import annotations

import gc

from app.ws_protocol import PricefeedWebSocketProtocol
from tests.support import open_stream, token


def server_protocols() -> list[PricefeedWebSocketProtocol]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, PricefeedWebSocketProtocol)]


async def test_the_handshake_request_is_not_kept_for_the_life_of_the_connection(live) -> None:
    """The request (headers, and the path with `?token=`) is dropped once the handshake is
    done, and frames from the client still parse: subscribe, ping, unsubscribe."""
    async with (
        live() as server,
        open_stream(f"{server.ws}/v1/ws?token={token('keeper')}") as stream,
    ):
        await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
        await stream.recv_type("subscribed")
        protocols = [p for p in server_protocols() if not p.disconnected]
        assert protocols, "the connection is served by pricefeed's protocol"
        for protocol in protocols:
            assert protocol.request is None
            frame = protocol.conn.parser.gi_frame
            assert frame is None or "request" not in frame.f_locals, "request still held"
        await stream.send({"op": "ping"})
        assert (await stream.recv_type("pong"))["type"] == "pong"
        await stream.send({"op": "unsubscribe", "symbols": ["AAPL"]})
        assert (await stream.recv_type("unsubscribed"))["symbols"] == ["AAPL"]
