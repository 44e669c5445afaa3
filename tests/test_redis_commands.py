"""app/redis_commands.py against a real redis-server: commands answered in call order while
pipelined, a restart survived by reconnecting, NOSCRIPT after SCRIPT FLUSH answered by EVAL,
a silent Redis given up on, redis-py's exception types, and the store's fenced write on it;
and, on a wire of the test's own, the call order kept across a NOSCRIPT."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.prices.store import NotLeader, RedisTickStore, Run
from app.prices.ticks import encode_tick
from app.redis_commands import CommandConnection, Script, _CommandProtocol, _Waiting, pack
from tests.support import RedisServer, redis_server

pytestmark = pytest.mark.redis

COUNT = Script("return redis.call('INCR', KEYS[1])")


@pytest.fixture
async def commands(redis: RedisServer) -> AsyncIterator[CommandConnection]:
    commands = CommandConnection.from_url(redis.url, timeout=1.0)
    yield commands
    await commands.close()


class TestCommands:
    async def test_pipelined_commands_are_answered_in_call_order(
        self, commands: CommandConnection
    ) -> None:
        sent = [commands.send_script(COUNT, ["n"], []) for _ in range(200)]
        assert [await commands.answer(s) for s in sent] == list(range(1, 201))

    async def test_an_error_reply_is_redis_pys_response_error(
        self, commands: CommandConnection
    ) -> None:
        await commands.call("SET", "text", "x")
        with pytest.raises(ResponseError, match="not an integer"):
            await commands.call("INCR", "text")
        assert await commands.call("GET", "text") == b"x", "the connection goes on"

    async def test_a_flushed_script_is_sent_again_in_order(
        self, commands: CommandConnection, redis_client: Redis
    ) -> None:
        assert await commands.run_script(COUNT, ["n"], []) == 1
        await redis_client.script_flush()
        sent = [commands.send_script(COUNT, ["n"], []) for _ in range(5)]
        assert [await commands.answer(s) for s in sent] == [2, 3, 4, 5, 6]
        assert await redis_client.script_exists(COUNT.sha.decode()) == [True]


class TestFailures:
    async def test_a_restart_fails_what_was_in_flight_and_the_next_call_reconnects(
        self, redis: RedisServer, commands: CommandConnection
    ) -> None:
        assert await commands.call("PING") == b"PONG"
        redis.kill()
        with pytest.raises(RedisConnectionError):
            await commands.call("PING")
        redis.start()  # empty, and it never heard of the script
        assert await commands.run_script(COUNT, ["n"], []) == 1

    async def test_redis_down_at_the_first_call_is_a_connection_error(
        self, redis: RedisServer, commands: CommandConnection
    ) -> None:
        redis.kill()
        sent = [commands.send(("PING",)) for _ in range(3)]
        for s in sent:
            with pytest.raises(RedisConnectionError):
                await commands.answer(s)

    async def test_a_silent_redis_is_a_timeout_and_the_connection_is_dropped(
        self, redis: RedisServer, commands: CommandConnection
    ) -> None:
        assert await commands.call("PING") == b"PONG"
        redis.freeze()
        try:
            with pytest.raises(RedisTimeoutError):
                await commands.call("PING")
        finally:
            redis.thaw()
        assert await commands.call("PING") == b"PONG", "a new connection, not the stale answer"

    async def test_the_url_password_and_database_are_used(self) -> None:
        with redis_server(password="s3cret") as server:
            url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
            commands = CommandConnection.from_url(url)
            plain = Redis.from_url(url)
            try:
                await commands.call("SET", "where", "db3")
                assert await plain.get("where") == b"db3"
                wrong = CommandConnection.from_url(f"redis://:nope@127.0.0.1:{server.port}/0")
                with pytest.raises(AuthenticationError):
                    await wrong.call("GET", "where")
                await wrong.close()
            finally:
                await commands.close()
                await plain.aclose()


def _run(seq: int) -> Run:
    tick = encode_tick(symbol="AAPL", price=Decimal(100 + seq), ts=1_000 + seq, seq=seq)
    return Run("AAPL", [tick])


class TestStoreWrites:
    async def test_writes_sent_together_land_in_order_and_a_refused_fence_writes_nothing(
        self, redis: RedisServer, redis_client: Redis
    ) -> None:
        commands = CommandConnection.like(redis_client)
        store = RedisTickStore(
            redis_client, prefix="t", retention=100, candles_kept=10, commands=commands
        )
        try:
            assert store.ordered_writes
            await redis_client.set(store.leader_key, "me")
            writes = [
                asyncio.ensure_future(store.append_runs([_run(n)], fence="me")) for n in (1, 2, 3)
            ]
            assert await asyncio.gather(*writes) == [[0], [0], [0]]
            await redis_client.set(store.leader_key, "successor")
            with pytest.raises(NotLeader):
                await store.append_runs([_run(4)], fence="me")
            history = await store.read_history("AAPL", since=None, limit=10)
            assert [t.seq for t in history] == [1, 2, 3]
        finally:
            await store.close()


class Wire(asyncio.Transport):
    """What a protocol writes, command by command."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False


class TestCallOrderAfterNoscript:
    async def test_what_is_called_after_a_noscript_runs_after_every_eval(self) -> None:
        """SHA1 and SHA2 are in flight when Redis forgets the script: their EVALs go out as
        their NOSCRIPTs arrive, one at a time, and a call made between the two waits for the
        second, so Redis runs EVAL1, EVAL2, then it."""
        loop = asyncio.get_running_loop()
        proto, wire = _CommandProtocol(), Wire()
        proto.connection_made(wire)
        sent = []
        for n in (1, 2):
            future = loop.create_future()
            proto.send(pack(("EVALSHA", "sha", n)), _Waiting(future, ("EVAL", "body", n)))
            sent.append(future)
        proto.data_received(b"-NOSCRIPT No matching script\r\n")
        later = loop.create_future()
        proto.send(pack(("GET", "after")), _Waiting(later, None))
        assert wire.written[-1] == pack(("EVAL", "body", 1)), "held until SHA2 is answered"
        proto.data_received(b"-NOSCRIPT No matching script\r\n")
        assert wire.written[2:] == [
            pack(("EVAL", "body", 1)),
            pack(("EVAL", "body", 2)),
            pack(("GET", "after")),
        ]
        proto.data_received(b":1\r\n:2\r\n$1\r\nx\r\n")
        assert [await f for f in sent] == [1, 2]
        assert await later == b"x"
