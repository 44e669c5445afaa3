"""With the Redis tick store unreachable, REST and SSE answer 503 (retry), never 500."""

from __future__ import annotations

import pytest

from tests.support import free_port, token

pytestmark = pytest.mark.redis


def auth() -> dict[str, str]:
    """A fresh token: one minted at import would expire in a suite that runs past its TTL."""
    return {"Authorization": f"Bearer {token()}"}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/prices/AAPL",
        "/v1/prices?symbols=AAPL,MSFT",
        "/v1/prices/AAPL/history",
        "/v1/prices/AAPL/candles",
        "/v1/stream?symbols=AAPL",
    ],
)
async def test_store_down_is_503(api, path: str) -> None:
    async with api(broadcast_url=f"redis://127.0.0.1:{free_port()}/0") as client:
        response = await client.get(path, headers=auth())
        assert response.status_code == 503
        assert response.json()["code"] == "unavailable"
        assert (await client.get("/readyz")).status_code == 503
