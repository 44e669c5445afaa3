"""Both WebSocket routes against a real uvicorn server (memory broker, simulated feed)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.errors import CloseCode
from tests.support import SERVER_VARIANTS, open_stream, signer, token


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _bad_tokens() -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "mallory", "aud": "pricefeed", "exp": now + 300, "symbols": ["*"]}
    return {
        "garbage": "not-a-jwt",
        "wrong-signature": signer(secret="another-secret-another-secret-00").issue(
            subject="mallory", symbols=["*"]
        ),
        "alg-none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        "wrong-aud": signer(audience="elsewhere").issue(subject="mallory", symbols=["*"]),
        "expired": signer().issue(subject="mallory", symbols=["*"], ttl_seconds=-60),
    }


# Every test on every server variant: pricefeed's protocol with and without direct writes, and
# uvicorn's stock protocol (what the version guard falls back to).
pytestmark = SERVER_VARIANTS

BAD_TOKENS = _bad_tokens()
ROUTES = ["/v1/ws/prices/AAPL", "/v1/ws"]


class TestAuthentication:
    @pytest.mark.parametrize("route", ROUTES)
    async def test_no_token_closes_4401(self, live, route: str) -> None:
        async with live() as server, open_stream(f"{server.ws}{route}") as stream:
            code, frames = await stream.closed_with()
        assert code == CloseCode.BAD_TOKEN
        assert frames == []

    @pytest.mark.parametrize("route", ROUTES)
    @pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
    async def test_bad_token_closes_4401_before_any_tick(self, live, route: str, kind: str) -> None:
        async with (
            live() as server,
            open_stream(f"{server.ws}{route}?token={BAD_TOKENS[kind]}") as stream,
        ):
            code, frames = await stream.closed_with()
        assert code == CloseCode.BAD_TOKEN
        assert frames == []

    async def test_header_token_is_accepted(self, live) -> None:
        headers = {"Authorization": f"Bearer {token()}"}
        async with (
            live() as server,
            open_stream(f"{server.ws}/v1/ws/prices/AAPL", additional_headers=headers) as stream,
        ):
            assert (await stream.recv())["type"] == "snapshot"

    async def test_not_entitled_symbol_closes_4403(self, live) -> None:
        only_msft = token(symbols=["MSFT"])
        async with live() as server:
            async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={only_msft}") as stream:
                code, frames = await stream.closed_with()
            assert (code, frames) == (CloseCode.NOT_ENTITLED, [])
            async with open_stream(f"{server.ws}/v1/ws?token={only_msft}") as stream:
                await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
                code, frames = await stream.closed_with()
            assert code == CloseCode.NOT_ENTITLED
            assert not [f for f in frames if f["type"] in ("tick", "snapshot")]

    async def test_token_expiry_closes_4408(self, live) -> None:
        async with live() as server:
            for route in ROUTES:
                async with open_stream(f"{server.ws}{route}?token={token(ttl=2)}") as stream:
                    await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
                    started = time.monotonic()
                    code, frames = await stream.closed_with(timeout=6)
                assert code == CloseCode.TOKEN_EXPIRED, route
                assert time.monotonic() - started < 4
                assert frames, "ticks flowed until the token expired"

    async def test_auth_op_extends_the_stream(self, live) -> None:
        async with (
            live() as server,
            open_stream(f"{server.ws}/v1/ws?token={token(ttl=2)}") as stream,
        ):
            await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
            await stream.send({"op": "auth", "token": token(ttl=60)})
            ack = await stream.recv_type("authenticated")
            assert ack["expires"] > (time.time() + 50) * 1000
            await asyncio.sleep(2.5)  # past the first token's expiry
            assert (await stream.recv_type("tick"))["symbol"] == "AAPL"

    async def test_auth_op_with_bad_token_closes_4401(self, live) -> None:
        async with live() as server, open_stream(f"{server.ws}/v1/ws?token={token()}") as stream:
            await stream.send({"op": "auth", "token": BAD_TOKENS["wrong-signature"]})
            code, _ = await stream.closed_with()
        assert code == CloseCode.BAD_TOKEN

    async def test_auth_op_for_another_subject_is_refused(self, live) -> None:
        async with (
            live() as server,
            open_stream(f"{server.ws}/v1/ws?token={token('alice')}") as stream,
        ):
            await stream.send({"op": "auth", "token": token("bob")})
            error = await stream.recv_type("error")
            assert error["code"] == "subject_mismatch"
            await stream.send({"op": "ping"})
            assert (await stream.recv_type("pong"))["type"] == "pong"

    async def test_disallowed_origin_is_refused_at_handshake(self, live) -> None:
        async with live(allowed_origins=["https://desk.example"]) as server:
            with pytest.raises(InvalidStatus) as refused:
                async with open_stream(
                    f"{server.ws}/v1/ws?token={token()}", origin="https://evil.example"
                ):
                    pass
            assert refused.value.response.status_code == 403
            async with open_stream(
                f"{server.ws}/v1/ws?token={token()}", origin="https://desk.example"
            ) as stream:
                await stream.send({"op": "ping"})
                assert (await stream.recv_type("pong"))["type"] == "pong"


class TestOneSymbol:
    async def test_snapshot_then_ticks_in_seq_order(self, live) -> None:
        async with (
            live() as server,
            open_stream(f"{server.ws}/v1/ws/prices/aapl?token={token()}") as stream,
        ):
            snapshot = await stream.recv()
            assert snapshot["type"] == "snapshot"
            assert snapshot["symbol"] == "AAPL"
            assert isinstance(snapshot["price"], str) and "." in snapshot["price"]
            seqs = [snapshot["seq"]]
            for _ in range(10):
                tick = await stream.recv()
                assert tick["type"] == "tick" and tick["symbol"] == "AAPL"
                seqs.append(tick["seq"])
        assert seqs == list(range(seqs[0], seqs[0] + 11))

    async def test_since_resumes_without_gap_or_duplicate(self, live) -> None:
        async with live() as server:
            async with open_stream(f"{server.ws}/v1/ws/prices/MSFT?token={token()}") as stream:
                seen = [(await stream.recv())["seq"] for _ in range(3)]
            await asyncio.sleep(0.5)  # ticks go on while the client is away
            async with open_stream(
                f"{server.ws}/v1/ws/prices/MSFT?token={token()}&since={seen[-1]}"
            ) as stream:
                resumed = [await stream.recv() for _ in range(15)]
        assert all(f["type"] == "tick" for f in resumed)
        assert [f["seq"] for f in resumed] == list(range(seen[-1] + 1, seen[-1] + 16))

    async def test_unknown_symbol_closes_4404(self, live) -> None:
        async with live() as server:
            for symbol in ("NOPE", "bad$symbol"):
                async with open_stream(
                    f"{server.ws}/v1/ws/prices/{symbol}?token={token()}"
                ) as stream:
                    code, frames = await stream.closed_with()
                assert (code, frames) == (CloseCode.UNKNOWN_SYMBOL, [])

    async def test_bad_since_closes_1008(self, live) -> None:
        async with (
            live() as server,
            open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={token()}&since=abc") as stream,
        ):
            code, frames = await stream.closed_with()
        assert (code, frames) == (CloseCode.POLICY, [])


class TestMultiplexed:
    async def test_subscribe_snapshots_ticks_unsubscribe(self, live) -> None:
        async with live() as server, open_stream(f"{server.ws}/v1/ws?token={token()}") as stream:
            await stream.send({"op": "subscribe", "symbols": ["AAPL", "btc-usd"]})
            assert await stream.recv() == {"type": "subscribed", "symbols": ["AAPL", "BTC-USD"]}
            snapshots = {}
            last: dict[str, int] = {}
            while (
                len(last) < 2 or min(last.values()) - min(s["seq"] for s in snapshots.values()) < 3
            ):
                frame = await stream.recv()
                if frame["type"] == "snapshot":
                    assert frame["symbol"] not in snapshots, "one snapshot per symbol"
                    snapshots[frame["symbol"]] = frame
                    last[frame["symbol"]] = frame["seq"]
                elif frame["type"] == "tick":
                    assert frame["symbol"] in snapshots, "snapshot comes first"
                    assert frame["seq"] == last[frame["symbol"]] + 1
                    last[frame["symbol"]] = frame["seq"]
            await stream.send({"op": "unsubscribe", "symbols": ["AAPL"]})
            await stream.recv_type("unsubscribed")
            for _ in range(8):
                frame = await stream.recv()
                assert frame.get("symbol") != "AAPL"

    async def test_subscribe_with_since_replays_retained_ticks(self, live) -> None:
        async with live() as server, open_stream(f"{server.ws}/v1/ws?token={token()}") as stream:
            await stream.send({"op": "subscribe", "symbols": ["ETH-USD"]})
            snapshot = await stream.recv_type("snapshot")
            await stream.send({"op": "unsubscribe", "symbols": ["ETH-USD"]})
            await stream.recv_type("unsubscribed")
            await asyncio.sleep(0.4)
            await stream.send(
                {"op": "subscribe", "symbols": ["ETH-USD"], "since": {"eth-usd": snapshot["seq"]}}
            )
            await stream.recv_type("subscribed")
            frames = [await stream.recv_type("tick", "snapshot") for _ in range(12)]
        assert all(f["type"] == "tick" for f in frames)
        assert [f["seq"] for f in frames] == list(range(snapshot["seq"] + 1, snapshot["seq"] + 13))

    async def test_ping_pong(self, live) -> None:
        async with live() as server, open_stream(f"{server.ws}/v1/ws?token={token()}") as stream:
            await stream.send({"op": "ping"})
            assert await stream.recv() == {"type": "pong"}

    async def test_heartbeat_when_idle(self, live) -> None:
        async with (
            live(producer="off", ws_heartbeat_seconds=0.3) as server,
            open_stream(f"{server.ws}/v1/ws?token={token()}") as stream,
        ):
            frame = await stream.recv(timeout=2)
        assert frame["type"] == "heartbeat"
        assert abs(frame["ts"] - time.time() * 1000) < 5000

    @pytest.mark.parametrize(
        ("request_text", "code"),
        [
            ("{not json", "invalid_json"),
            ("", "invalid_json"),
            ('["subscribe"]', "invalid_message"),
            ('{"symbols": ["AAPL"]}', "invalid_message"),
            ('{"op": 7}', "invalid_message"),
            ('{"op": "dance"}', "unknown_op"),
            ('{"op": "subscribe", "symbols": "AAPL"}', "invalid_message"),
            ('{"op": "subscribe", "symbols": []}', "invalid_message"),
            ('{"op": "subscribe", "symbols": [42]}', "invalid_message"),
            ('{"op": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": "x"}}', "invalid_message"),
            ('{"op": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": -1}}', "invalid_message"),
            ('{"op": "subscribe", "symbols": ["AAPL"], "batch": "yes"}', "invalid_message"),
            ('{"op": "subscribe", "symbols": ["NOPE"]}', "unknown_symbol"),
            ('{"op": "subscribe", "symbols": ["b@d"]}', "unknown_symbol"),
            ('{"op": "unsubscribe", "symbols": ["NOPE"]}', "unknown_symbol"),
            ('{"op": "auth", "token": 5}', "invalid_message"),
        ],
    )
    async def test_bad_request_gets_error_and_connection_stays(
        self, live, request_text: str, code: str
    ) -> None:
        async with (
            live(producer="off") as server,
            open_stream(f"{server.ws}/v1/ws?token={token()}") as stream,
        ):
            await stream.send(request_text)
            error = await stream.recv_type("error")
            assert error["code"] == code
            assert error["message"]
            await stream.send({"op": "ping"})
            assert (await stream.recv_type("pong"))["type"] == "pong"

    async def test_binary_frame_gets_error(self, live) -> None:
        async with (
            live(producer="off") as server,
            open_stream(f"{server.ws}/v1/ws?token={token()}") as stream,
        ):
            await stream.conn.send(b'{"op": "ping"}')
            assert (await stream.recv_type("error"))["code"] == "invalid_message"

    async def test_one_subscription_too_many_gets_error(self, live) -> None:
        async with (
            live(ws_max_subscriptions=2) as server,
            open_stream(f"{server.ws}/v1/ws?token={token()}") as stream,
        ):
            await stream.send({"op": "subscribe", "symbols": ["AAPL", "MSFT"]})
            await stream.recv_type("subscribed")
            await stream.send({"op": "subscribe", "symbols": ["TSLA"]})
            error = await stream.recv_type("error")
            assert error["code"] == "too_many_subscriptions"
            for _ in range(10):
                frame = await stream.recv()
                assert frame.get("symbol") != "TSLA"

    async def test_batch_frames_carry_ticks_in_seq_order(self, live) -> None:
        async with (
            live(feed_ticks_per_second=200) as server,
            open_stream(f"{server.ws}/v1/ws?token={token()}") as stream,
        ):
            await stream.send({"op": "subscribe", "symbols": ["AAPL", "MSFT"], "batch": True})
            await stream.recv_type("subscribed")
            arrays = 0
            last: dict[str, int] = {}
            deadline = time.monotonic() + 5
            while arrays < 3 and time.monotonic() < deadline:
                raw = json.loads(await asyncio.wait_for(stream.conn.recv(), 2))
                frames = raw if isinstance(raw, list) else [raw]
                if isinstance(raw, list):
                    arrays += 1
                    assert len(raw) > 1
                for frame in frames:
                    if frame["type"] in ("tick", "snapshot"):
                        if frame["symbol"] in last:
                            assert frame["seq"] == last[frame["symbol"]] + 1
                        last[frame["symbol"]] = frame["seq"]
            assert arrays >= 3, "a fast feed gets batch frames"


class TestLimits:
    async def test_frame_too_large_closes_1009(self, live) -> None:
        async with (
            live(ws_max_message_bytes=1024) as server,
            open_stream(f"{server.ws}/v1/ws?token={token()}") as stream,
        ):
            await stream.send('{"op": "ping", "pad": "' + "x" * 2000 + '"}')
            code, _ = await stream.closed_with()
        assert code == CloseCode.TOO_BIG

    async def test_too_many_messages_closes_1008(self, live) -> None:
        async with (
            live(ws_max_messages_per_second=5, producer="off") as server,
            open_stream(f"{server.ws}/v1/ws?token={token()}") as stream,
        ):
            try:
                for _ in range(50):
                    await stream.send({"op": "ping"})
            except ConnectionClosed:
                pass
            code, _ = await stream.closed_with()
        assert code == CloseCode.POLICY

    async def test_too_many_connections_for_one_subject_closes_1008(self, live) -> None:
        async with live(ws_max_connections_per_subject=2) as server:
            url = f"{server.ws}/v1/ws?token={token('greedy')}"
            async with open_stream(url) as one, open_stream(url) as two:
                for stream in (one, two):
                    await stream.send({"op": "ping"})
                    await stream.recv_type("pong")
                async with open_stream(url) as three:
                    code, _ = await three.closed_with()
                assert code == CloseCode.POLICY
                async with open_stream(f"{server.ws}/v1/ws?token={token('someone-else')}") as other:
                    await other.send({"op": "ping"})
                    await other.recv_type("pong")

    async def test_instance_at_capacity_closes_1013(self, live) -> None:
        async with live(ws_max_connections=1) as server:
            async with open_stream(f"{server.ws}/v1/ws?token={token('a')}") as first:
                await first.send({"op": "ping"})
                await first.recv_type("pong")
                async with open_stream(f"{server.ws}/v1/ws?token={token('b')}") as second:
                    code, _ = await second.closed_with()
        assert code == CloseCode.TRY_LATER


class TestResume:
    async def test_resume_longer_than_the_outbox_has_no_gap(self, live) -> None:
        """A `since` resume owes every retained tick, even more than the outbox bound."""
        async with live(feed_ticks_per_second=400, ws_outbox_frames=64) as server:
            async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={token()}") as stream:
                latest = (await stream.recv())["seq"]
                while latest < 300:
                    latest = (await stream.recv())["seq"]
            since = latest - 250
            async with open_stream(
                f"{server.ws}/v1/ws/prices/AAPL?token={token()}&since={since}"
            ) as stream:
                seqs = [(await stream.recv())["seq"] for _ in range(300)]
        assert seqs == list(range(since + 1, since + 301))
