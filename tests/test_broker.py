"""The broker on a real redis-server of the test's own: delivery with the pinned redis-py,
recovery from a Redis restart, bad payloads, concurrent subscribers, a reader that stalls;
and the memory:// broker's bound."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest
import redis as redis_py
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from app.broker import Broker
from tests.support import free_port, redis_server

pytestmark = pytest.mark.redis


@contextlib.asynccontextmanager
async def connected_with(url: str, **options: float) -> AsyncIterator[Broker]:
    broker = Broker(url, **options)  # type: ignore[arg-type]
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.disconnect()


def connected(url: str) -> contextlib.AbstractAsyncContextManager[Broker]:
    return connected_with(url)


async def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


class Bursts:
    """A burst sink that records what it got, and can be told to fail once."""

    def __init__(self) -> None:
        self.bursts: list[list[tuple[str, str]]] = []
        self.fail_next = False

    def __call__(self, messages: list[tuple[str, str]]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("sink bug")
        self.bursts.append(messages)

    @property
    def messages(self) -> list[tuple[str, str]]:
        return [m for burst in self.bursts for m in burst]

    @property
    def texts(self) -> list[str]:
        return [message for _, message in self.messages]


def reconnects() -> float:
    return REGISTRY.get_sample_value("pricefeed_broker_reconnects_total") or 0.0


async def test_a_published_message_arrives(redis) -> None:
    assert int(redis_py.__version__.split(".")[0]) >= 5
    sink = Bursts()
    async with connected(redis.url) as broker, broker.subscribe_bursts(["prices:AAPL"], sink):
        await wait_until(lambda: broker.connected)
        await broker.publish("prices:AAPL", '{"hello": 1}')
        await wait_until(lambda: sink.messages == [("prices:AAPL", '{"hello": 1}')])


async def test_messages_from_another_process_arrive(redis) -> None:
    sink = Bursts()
    async with connected(redis.url) as broker, broker.subscribe_bursts(["prices:MSFT"], sink):
        await wait_until(lambda: broker.connected)
        other = Redis.from_url(redis.url)
        await other.publish("prices:MSFT", "from elsewhere")
        await other.aclose()
        await wait_until(lambda: sink.texts == ["from elsewhere"])


async def test_two_concurrent_subscribers_to_a_new_channel_both_receive_once(redis) -> None:
    first, second = Bursts(), Bursts()
    async with connected(redis.url) as broker:
        async with contextlib.AsyncExitStack() as stack:
            await asyncio.gather(
                stack.enter_async_context(broker.subscribe_bursts(["prices:NEW"], first)),
                stack.enter_async_context(broker.subscribe_bursts(["prices:NEW"], second)),
            )
            await wait_until(lambda: broker.connected)
            await broker.publish("prices:NEW", "both")
            await broker.publish("prices:NEW", "then")
            await wait_until(lambda: first.texts[-1:] == second.texts[-1:] == ["then"])
            assert first.texts == second.texts == ["both", "then"]


async def test_a_non_utf8_payload_is_dropped_and_delivery_goes_on(redis, caplog) -> None:
    sink = Bursts()
    async with connected(redis.url) as broker, broker.subscribe_bursts(["prices:AAPL"], sink):
        await wait_until(lambda: broker.connected)
        raw = Redis.from_url(redis.url)
        await raw.publish("prices:AAPL", b"\xff\xfe not utf-8")
        await raw.publish("prices:AAPL", "still here")
        await raw.aclose()
        await wait_until(lambda: sink.texts == ["still here"])
    assert "dropped a non-UTF-8 message" in caplog.text


async def test_delivery_resumes_after_redis_restarts(redis) -> None:
    sink = Bursts()
    async with connected(redis.url) as broker, broker.subscribe_bursts(["prices:AAPL"], sink):
        await wait_until(lambda: broker.connected)
        before = reconnects()
        await broker.publish("prices:AAPL", "before")
        await wait_until(lambda: sink.texts == ["before"])

        redis.kill()
        await wait_until(lambda: not broker.connected)
        redis.start()
        await wait_until(lambda: broker.connected and reconnects() == before + 1, timeout=15)

        await broker.publish("prices:AAPL", "after")
        await wait_until(lambda: sink.texts == ["before", "after"])


async def test_broker_down_at_start_connects_when_redis_comes_up(redis) -> None:
    redis.kill()
    sink = Bursts()
    async with connected(redis.url) as broker, broker.subscribe_bursts(["prices:AAPL"], sink):
        await asyncio.sleep(0.3)
        assert not broker.connected
        redis.start()
        await wait_until(lambda: broker.connected, timeout=15)
        await broker.publish("prices:AAPL", "late")
        await wait_until(lambda: sink.texts == ["late"])


async def test_a_silent_redis_is_dropped_and_the_broker_reconnects(redis) -> None:
    """A Redis that stops answering without closing the socket (hung, or a network that
    drops packets): the broker pings, gives up, and resubscribes when Redis answers again."""
    sink = Bursts()
    async with (
        connected_with(redis.url, ping_after=0.2, dead_after=0.8) as broker,
        broker.subscribe_bursts(["prices:AAPL"], sink),
    ):
        await wait_until(lambda: broker.connected)
        redis.freeze()
        try:
            await wait_until(lambda: not broker.connected, timeout=5)
        finally:
            redis.thaw()
        await wait_until(lambda: broker.connected, timeout=10)
        await broker.publish("prices:AAPL", "awake")
        await wait_until(lambda: sink.texts == ["awake"])


async def test_a_password_in_the_url_authenticates_the_subscriber() -> None:
    sink = Bursts()
    with redis_server(password="s3cret") as server:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        async with connected(url) as broker, broker.subscribe_bursts(["prices:AAPL"], sink):
            await wait_until(lambda: broker.connected)
            await broker.publish("prices:AAPL", "signed in")
            await wait_until(lambda: sink.texts == ["signed in"])


async def test_a_wrong_password_keeps_the_broker_down_and_says_why(caplog) -> None:
    with redis_server(password="s3cret") as server:
        url = f"redis://:wrong@127.0.0.1:{server.port}/0"
        async with connected(url) as broker, broker.subscribe_bursts(["prices:AAPL"], Bursts()):
            await wait_until(lambda: "Redis refused AUTH" in caplog.text)
            assert not broker.connected
            assert "wrong" not in caplog.text  # the password itself is never logged


async def test_a_reader_that_stalls_loses_nothing_and_redis_holds_the_rest(redis) -> None:
    """The process stops reading (its loop is busy) while 200 messages arrive: none is lost,
    they come out in order, and a read at a time: they waited in Redis and the socket, not in
    a queue of ours (nothing sits between the read and the sink)."""
    sink = Bursts()
    async with connected(redis.url) as broker, broker.subscribe_bursts(["prices:AAPL"], sink):
        await wait_until(lambda: broker.connected)
        blocking = redis_py.Redis.from_url(redis.url)
        try:
            for i in range(200):  # blocking calls: the loop cannot read meanwhile
                blocking.publish("prices:AAPL", str(i))
        finally:
            blocking.close()
        await wait_until(lambda: len(sink.messages) == 200)
        assert sink.texts == [str(i) for i in range(200)]
        assert len(sink.bursts) < 10  # read together, handed over together


async def test_a_memory_broker_holds_at_most_its_queue_size_and_loses_nothing() -> None:
    """A publisher faster than delivery: it waits once 8 messages wait (so no burst is
    larger), and every message comes out once, in order."""
    sink = Bursts()
    async with (
        connected_with("memory://", queue_size=8) as broker,
        broker.subscribe_bursts(["prices:AAPL"], sink),
    ):
        for i in range(200):
            await broker.publish("prices:AAPL", str(i))
        await wait_until(lambda: len(sink.messages) == 200)
        assert sink.texts == [str(i) for i in range(200)]
        assert max(len(burst) for burst in sink.bursts) <= 8
        assert len(sink.bursts) >= 200 // 8


async def test_a_rediss_url_subscribes_over_tls_and_checks_the_certificate(
    tmp_path, caplog
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    tls_port = free_port()
    tls = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key))
    with redis_server(args=(*tls, "--tls-auth-clients", "no")):
        trusted = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        sink = Bursts()
        async with connected(trusted) as broker, broker.subscribe_bursts(["prices:AAPL"], sink):
            await wait_until(lambda: broker.connected)
            await broker.publish("prices:AAPL", "encrypted")
            await wait_until(lambda: sink.texts == ["encrypted"])

        untrusted = f"rediss://127.0.0.1:{tls_port}/0"  # self-signed, and no CA given
        async with connected(untrusted) as broker, broker.subscribe_bursts(["prices:A"], Bursts()):
            await wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in caplog.text)
            assert not broker.connected


async def test_a_burst_subscriber_gets_every_message_in_order_a_read_at_a_time(redis) -> None:
    sink = Bursts()
    async with (
        connected(redis.url) as broker,
        broker.subscribe_bursts(["prices:AAPL", "prices:MSFT"], sink),
    ):
        await wait_until(lambda: broker.connected)
        raw = Redis.from_url(redis.url)
        async with raw.pipeline(transaction=False) as pipe:  # one write: arrives in few reads
            for i in range(300):
                pipe.publish("prices:AAPL" if i % 2 else "prices:MSFT", str(i))
            await pipe.execute()
        await raw.publish("prices:OTHER", "not subscribed")
        await raw.aclose()
        await wait_until(lambda: len(sink.messages) == 300)
        expected = [("prices:AAPL" if i % 2 else "prices:MSFT", str(i)) for i in range(300)]
        assert sink.messages == expected
        assert len(sink.bursts) < 300  # messages read together are handed over together


async def test_a_sink_cannot_take_a_channel_twice(redis) -> None:
    sink = Bursts()
    async with connected(redis.url) as broker, broker.subscribe_bursts(["prices:A"], sink):
        with pytest.raises(ValueError, match="already takes prices:A"):
            async with broker.subscribe_bursts(["prices:A"], sink):
                pass
        await wait_until(lambda: broker.connected)
        await broker.publish("prices:A", "once")
        await broker.publish("prices:A", "then")
        await wait_until(lambda: sink.texts[-1:] == ["then"])  # still subscribed
        assert sink.texts == ["once", "then"]  # and not twice


async def test_burst_subscribers_share_a_channel_until_the_last_one_leaves(redis) -> None:
    first, second, third = Bursts(), Bursts(), Bursts()
    raw = Redis.from_url(redis.url)

    async def redis_subscribers() -> int:
        return int((await raw.pubsub_numsub("prices:AAPL"))[0][1])

    async with connected(redis.url) as broker:
        async with broker.subscribe_bursts(["prices:AAPL"], first):
            async with broker.subscribe_bursts(["prices:AAPL"], second):
                await wait_until(lambda: broker.connected)
                assert await redis_subscribers() == 1  # one subscription for both
                await broker.publish("prices:AAPL", "both")
                await wait_until(lambda: first.texts == second.texts == ["both"])
            # the second left; the channel stays subscribed for the first
            await broker.publish("prices:AAPL", "first only")
            await wait_until(lambda: first.texts == ["both", "first only"])
            assert second.texts == ["both"]  # same read: it would have it by now
        # the last one left: Redis sends this process nothing more on the channel
        for _ in range(250):
            if await redis_subscribers() == 0:
                break
            await asyncio.sleep(0.02)
        assert await redis_subscribers() == 0
        async with broker.subscribe_bursts(["prices:AAPL"], third):  # and back again
            await broker.publish("prices:AAPL", "third")
            await wait_until(lambda: third.texts == ["third"])
        assert first.texts == ["both", "first only"]
    await raw.aclose()


async def test_a_burst_subscriber_survives_bad_payloads_its_own_failure_and_a_restart(
    redis, caplog
) -> None:
    sink = Bursts()
    async with connected(redis.url) as broker, broker.subscribe_bursts(["prices:AAPL"], sink):
        await wait_until(lambda: broker.connected)
        raw = Redis.from_url(redis.url)
        await raw.publish("prices:AAPL", b"\xff\xfe not UTF-8")
        sink.fail_next = True
        await raw.publish("prices:AAPL", "lost to the sink's bug")
        await wait_until(lambda: "a burst subscriber failed" in caplog.text)
        await raw.publish("prices:AAPL", "next")
        await wait_until(lambda: sink.messages == [("prices:AAPL", "next")])
        await raw.aclose()

        redis.kill()
        await wait_until(lambda: not broker.connected)
        redis.start()
        await wait_until(lambda: broker.connected, timeout=15)
        await broker.publish("prices:AAPL", "after a restart")
        await wait_until(lambda: sink.messages[-1] == ("prices:AAPL", "after a restart"))
    assert "dropped a non-UTF-8 message" in caplog.text


async def test_burst_subscribers_on_the_memory_backend(caplog) -> None:
    sink = Bursts()
    async with connected("memory://") as broker, broker.subscribe_bursts(["prices:A"], sink):
        for i in range(50):
            await broker.publish("prices:A", str(i))
        await broker.publish("prices:B", "not subscribed")
        await wait_until(lambda: len(sink.messages) == 50)
        assert sink.messages == [("prices:A", str(i)) for i in range(50)]
        sink.fail_next = True
        await broker.publish("prices:A", "lost to the sink's bug")
        await wait_until(lambda: "a burst subscriber failed" in caplog.text)
        await broker.publish("prices:A", "next")
        await wait_until(lambda: sink.messages[-1] == ("prices:A", "next"))
        assert len(sink.messages) == 51


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_a_subscription_takes_channels_on_and_off_while_the_others_flow(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """An instrument added, then disabled, while ticks of another flow: the new channel is
    delivered from `add` until `remove`, and the other one loses nothing and doubles nothing."""
    url = request.getfixturevalue("redis").url if backend == "redis" else "memory://"
    sink = Bursts()
    async with connected(url) as broker, broker.subscribe_bursts(["prices:A"], sink) as sub:
        await wait_until(lambda: broker.connected)
        sent = 0

        async def publish_a(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                await broker.publish("prices:A", str(sent))
                sent += 1
                await asyncio.sleep(0)

        await publish_a(20)
        adding = asyncio.create_task(sub.add(["prices:B"]))
        await publish_a(20)  # while B is subscribed
        await adding
        assert sub.channels == ["prices:A", "prices:B"]
        await broker.publish("prices:B", "b1")
        await publish_a(20)
        await wait_until(lambda: ("prices:B", "b1") in sink.messages)

        await sub.remove(["prices:B"])
        assert sub.channels == ["prices:A"]
        await broker.publish("prices:B", "after remove")
        await publish_a(20)
        await wait_until(lambda: sink.texts.count(str(sent - 1)) == 1)
        if backend == "redis":
            raw = Redis.from_url(url)
            assert await raw.pubsub_numsub("prices:A", "prices:B") == [
                (b"prices:A", 1),
                (b"prices:B", 0),
            ]
            await raw.aclose()

    assert [m for c, m in sink.messages if c == "prices:A"] == [str(i) for i in range(sent)]
    assert [m for c, m in sink.messages if c == "prices:B"] == ["b1"]


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_publish_many_delivers_each_message_once_in_order(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Runs of one channel, channels interleaved, an empty message, messages with newlines
    of their own (Redis: a run of one channel travels joined by newlines)."""
    url = request.getfixturevalue("redis").url if backend == "redis" else "memory://"
    sink = Bursts()
    channels = ["prices:AAPL", "prices:MSFT"]
    sent = [("prices:AAPL", f"a{i}") for i in range(5)]
    sent += [("prices:MSFT", "m0"), ("prices:AAPL", ""), ("prices:AAPL", "two\nlines")]
    sent += [("prices:AAPL", "\n"), ("prices:MSFT", "m1"), ("prices:MSFT", "m2\n")]
    sent += [("prices:MSFT", f"m{i}") for i in range(3, 8)]
    async with connected(url) as broker, broker.subscribe_bursts(channels, sink):
        await wait_until(lambda: broker.connected)
        await broker.publish_many(sent)
        await broker.publish_many([])
        await wait_until(lambda: len(sink.messages) >= len(sent))
        await asyncio.sleep(0.1)  # room for a duplicate to show
    assert sink.messages == sent
