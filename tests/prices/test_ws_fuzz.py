"""Property-based fuzzing of the multiplexed route's client frames (app/prices/protocol.md).

Hypothesis generates frames — arbitrary JSON values, objects with random `op`s, wrong types for
`symbols`/`since`/`batch`/`token`, huge numbers, nested junk, non-JSON text, invalid UTF-8,
binary, oversized frames — and sends each over a real WebSocket to a real in-process server.
Every bad frame gets an `error` frame, or the documented close code; never a server error (no
1011, no ERROR log line), and the server still serves a fresh subscriber afterwards.

Hypothesis runs in a worker thread (its test function is synchronous); each example is sent
from the event loop that also runs the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.errors import CloseCode
from tests.prices.test_ws_invalid_utf8 import watching_uvicorn
from tests.support import SEED_SYMBOLS, LiveApp, open_stream, token

LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]

MAX_BYTES = 1024  # small, so that hypothesis reaches the 1009 close too
KNOWN_OPS = ("subscribe", "unsubscribe", "auth")  # "ping" answers the sentinel below
ANSWERS = {"error", "subscribed", "unsubscribed", "snapshot", "tick", "heartbeat", "authenticated"}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(SEED_SYMBOLS),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(KNOWN_OPS) | st.text(max_size=10).filter(lambda op: op != "ping")},
    optional={
        "symbols": json_values | st.lists(st.sampled_from(SEED_SYMBOLS), max_size=3),
        "since": json_values
        | st.dictionaries(st.sampled_from(SEED_SYMBOLS), st.integers(-(2**65), 2**65)),
        "batch": json_values,
        "token": json_values,
    },
)
# A valid request with one field replaced by anything: each field's type checks are reached.
VALID = {
    "subscribe": {"symbols": ["AAPL"], "since": {"AAPL": 0}, "batch": False},
    "unsubscribe": {"symbols": ["AAPL"]},
    "auth": {"token": "x"},
}
one_field_wrong = st.sampled_from(sorted(VALID)).flatmap(
    lambda op: st.tuples(st.just(op), st.sampled_from(sorted(VALID[op])), json_values).map(
        lambda t: {"op": t[0], **VALID[t[0]], t[1]: t[2]}
    )
)
# Encoded with json (orjson refuses integers past 64 bits; the server's orjson must not crash on
# them). A frame: ("text", str), ("bytes", bytes) sent as binary, or ("raw", bytes) sent as text.
frames = st.one_of(
    requests.map(lambda r: ("text", json.dumps(r))),
    one_field_wrong.map(lambda r: ("text", json.dumps(r))),
    json_values.filter(lambda v: not (isinstance(v, dict) and v.get("op") == "ping")).map(
        lambda v: ("text", json.dumps(v))
    ),
    st.text(max_size=64).map(lambda t: ("text", t)),
    st.integers(min_value=10**20, max_value=10**40).map(lambda n: ("text", f'{{"op":{n}}}')),
    st.binary(max_size=64).map(lambda b: ("bytes", b)),
    st.binary(min_size=1, max_size=16).map(lambda b: ("raw", b + b"\xff")),
    st.integers(MAX_BYTES + 1, 4 * MAX_BYTES).map(lambda n: ("text", " " * n)),
)


def expected_close(kind: str, payload: str | bytes) -> set[int] | None:
    """The close codes the contract gives this frame, or None if it leaves the connection open."""
    if kind == "raw":
        return {CloseCode.INVALID_DATA}
    size = len(payload if isinstance(payload, bytes) else payload.encode())
    if size > MAX_BYTES:
        return {CloseCode.TOO_BIG}
    return None


def must_error(kind: str, payload: str | bytes) -> bool:
    """Frames the protocol has no request for: they get an `error` frame."""
    if kind == "bytes":
        return True
    try:
        request = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return True
    if not isinstance(request, dict) or request.get("op") not in KNOWN_OPS:
        return True
    symbols = request.get("symbols")
    if request["op"] in ("subscribe", "unsubscribe") and not (
        isinstance(symbols, list) and symbols and all(isinstance(s, str) for s in symbols)
    ):
        return True
    return request["op"] == "auth" and not isinstance(request.get("token"), str)


class Fuzzer:
    """One connection, reused until a frame closes it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: ClientConnection | None = None
        self.sent = self.errors = self.closes = 0

    async def send(self, kind: str, payload: str | bytes) -> None:
        if self.conn is None:
            self.conn = await connect(self.url, open_timeout=10, max_queue=None)
        conn = self.conn
        if kind == "raw":
            assert isinstance(payload, bytes)
            await conn.send(payload, text=True)
        else:
            await conn.send(payload)
        self.sent += 1
        await conn.send('{"op": "ping"}')  # the sentinel: the only frame answered with a pong
        answers: list[dict[str, Any]] = []
        try:
            while True:
                raw = await asyncio.wait_for(conn.recv(), 10)
                body = orjson.loads(raw)
                batch = body if isinstance(body, list) else [body]
                if any(frame["type"] == "pong" for frame in batch):
                    break
                answers.extend(batch)
        except ConnectionClosed:
            self.conn, self.closes = None, self.closes + 1
            code = conn.close_code
            expected = expected_close(kind, payload)
            if expected is None:
                # Only a bad token in an auth request closes (4401).
                assert code == CloseCode.BAD_TOKEN and "auth" in str(payload), (code, payload)
            else:
                assert code in expected, (code, payload)
            return
        assert expected_close(kind, payload) is None, ("left open", payload)
        assert {frame["type"] for frame in answers} <= ANSWERS, answers
        if must_error(kind, payload):
            assert any(frame["type"] == "error" for frame in answers), (payload, answers)
            self.errors += 1

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def test_fuzzed_frames_get_an_error_or_a_documented_close(
    live: LiveFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with live(
        feed_ticks_per_second=2,
        ws_max_messages_per_second=100_000,
        ws_max_message_bytes=MAX_BYTES,
        ws_subscribe_timeout_seconds=3600,
    ) as server:
        with watching_uvicorn(caplog):
            fuzzer = Fuzzer(f"{server.ws}/v1/ws?token={token()}")
            loop = asyncio.get_running_loop()

            @settings(
                max_examples=200,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(frame=frames)
            def every_frame(frame: tuple[str, str | bytes]) -> None:
                asyncio.run_coroutine_threadsafe(fuzzer.send(*frame), loop).result(30)

            try:
                await asyncio.to_thread(every_frame)
            finally:
                await fuzzer.close()
            print(f"fuzz: {fuzzer.sent} frames, {fuzzer.errors} errors, {fuzzer.closes} closes")
            assert fuzzer.sent >= 100, "hypothesis ran its examples"

            async with open_stream(f"{server.ws}/v1/ws?token={token()}") as fresh:
                await fresh.send({"op": "subscribe", "symbols": ["AAPL"]})
                assert (await fresh.recv_type("subscribed"))["symbols"] == ["AAPL"]
                assert (await fresh.recv_type("snapshot", "tick"))["symbol"] == "AAPL"

    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
