"""A tick published on `prices:X` by someone other than the producer, with a seq far ahead of
the store (anyone who may PUBLISH on Redis), is dropped and counted; X keeps streaming on
every instance. Before, `seq: 10**15` froze X until a restart: every real tick after it
looked like a redelivery. And the Redis ACL docs/operations.md suggests, to keep such
publishers out, is enough to run the service."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest

from app.broker import price_channel
from app.redis_client import create_redis
from tests.prices.fanout_support import tick
from tests.support import LiveApp, RedisServer, free_port, open_stream, scrape_sample, token

pytestmark = pytest.mark.redis

LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]


async def dropped_implausible(server: LiveApp) -> float:
    return await scrape_sample(server, 'pricefeed_broker_dropped_total{reason="implausible_seq"}')


async def test_a_forged_seq_on_redis_does_not_freeze_the_symbol(
    live: LiveFactory, redis: RedisServer
) -> None:
    settings = {"broadcast_url": redis.url, "feed_ticks_per_second": 20}
    client = create_redis(redis.url)
    async with (
        live(**settings) as server,
        open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={token()}") as stream,
    ):
        before = (await stream.recv())["seq"]
        counted = await dropped_implausible(server)
        forged = tick("AAPL", 10**15)
        assert await client.publish(price_channel("AAPL"), forged.frame) >= 1
        seqs = [(await stream.recv())["seq"] for _ in range(10)]
        dropped = await dropped_implausible(server)
    await client.aclose()

    assert seqs == list(range(before + 1, before + 11)), "real ticks go on, none forged"
    assert dropped == counted + 1


async def test_the_acl_operations_suggests_runs_the_service(
    live: LiveFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """docs/operations.md's `ACL SETUSER pricefeed …` (default user off) is enough to serve:
    the producer publishes and stores, a stream gets ticks, history reads the store."""
    acl = ("pricefeed", "on", ">s3cret", "~pricefeed:*", "&prices:*", "+@all", "-@admin")
    server = RedisServer(
        port=free_port(),
        directory=str(tmp_path_factory.mktemp("redis")),
        args=("--user", *acl, "-@dangerous", "--user", "default", "off"),
        password="pricefeed s3cret",  # AUTH pricefeed s3cret, to see it up
    )
    server.start()
    url = f"redis://pricefeed:s3cret@127.0.0.1:{server.port}/0"
    try:
        async with live(broadcast_url=url, feed_ticks_per_second=20) as app:
            async with open_stream(f"{app.ws}/v1/ws/prices/AAPL?token={token()}") as stream:
                seqs = [(await stream.recv())["seq"] for _ in range(3)]
            async with httpx.AsyncClient(base_url=app.http) as http:
                ready = await http.get("/readyz")
                history = await http.get(
                    "/v1/prices/AAPL/history?since=0&limit=3",
                    headers={"Authorization": f"Bearer {token()}"},
                )
    finally:
        server.kill()

    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    assert ready.status_code == 200
    assert [t["seq"] for t in history.json()] == [1, 2, 3]
