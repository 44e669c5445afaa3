from __future__ import annotations

from tests.support import open_stream, token


async def test_rest_and_ws_smoke(api, live) -> None:  # type: ignore[no-untyped-def]
    async with api() as client:
        response = await client.get("/healthz")
        assert response.status_code == 200
    async with live() as server:
        async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={token()}") as stream:
            first = await stream.recv()
            assert first["type"] == "snapshot"
