"""Abuse benchmark: hostile clients at once against one `python -m app`, while a well-behaved
subscriber on the same instance measures what it gets.

    .venv/bin/python -m bench.abuse [--seconds 20] [--scale 1.0]

Attackers (each a loop that reconnects when the server closes it):
  ping flooder      WebSocket ping frames as fast as the socket takes them
  replay looper     one token subject's connections: subscribe every symbol `since: 0`, then
                    unsubscribe, as fast as the message rate limit lets through
  churner           open /v1/ws and close it at once
  token hammer      POST /v1/auth/token with wrong secrets, for random and real client ids

The well-behaved subscriber (its own subject) subscribes to every symbol and checks each tick:
gaps and out-of-order `seq`s, latency from the tick's `ts` (p50/p99), and the ticks per second
it sees (the producer's rate: it reads every symbol). A quiet phase first, then the attack;
the table shows both. tests/test_abuse.py runs a short attack and asserts delivery and order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

from app.security import TokenSigner

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Victim:
    """What the well-behaved subscriber saw."""

    ticks: int = 0
    gaps: int = 0  # a seq jump: ticks it never got
    out_of_order: int = 0  # a seq at or below the last one of its symbol
    latencies_ms: list[float] = field(default_factory=list)
    last_seq: dict[str, int] = field(default_factory=dict)
    closed: int | None = None  # the close code, if the server closed it

    def see(self, tick: dict[str, Any]) -> None:
        symbol, seq = tick["symbol"], tick["seq"]
        last = self.last_seq.get(symbol)
        if tick["type"] == "tick":
            self.ticks += 1
            self.latencies_ms.append(time.time() * 1000 - tick["ts"])
            if last is not None and seq <= last:
                self.out_of_order += 1
            elif last is not None and seq > last + 1:
                self.gaps += seq - last - 1
        if last is None or seq > last:
            self.last_seq[symbol] = seq

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Attack:
    """How many of each attacker, and counts of what they did and how the server answered."""

    pingers: int = 4
    loopers: int = 40  # of one token subject, under WS_MAX_CONNECTIONS_PER_SUBJECT (50)
    churners: int = 4
    hammers: int = 16
    sent: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)


def _frames(raw: str | bytes) -> list[dict[str, Any]]:
    body = orjson.loads(raw)
    return body if isinstance(body, list) else [body]


async def subscriber(ws: str, token: str, symbols: list[str], victim: Victim) -> None:
    """Subscribe to `symbols` and record every tick until cancelled."""
    async with connect(f"{ws}/v1/ws?token={token}", max_queue=None, open_timeout=10) as conn:
        await conn.send(orjson.dumps({"op": "subscribe", "symbols": symbols}).decode())
        try:
            async for raw in conn:
                for frame in _frames(raw):
                    if frame.get("type") in ("tick", "snapshot"):
                        victim.see(frame)
        finally:
            victim.closed = conn.close_code


async def _forever(name: str, attack: Attack, once: Callable[[], Awaitable[None]]) -> None:
    """Run `once` again and again; a refused or closed connection is an answer, not an end."""
    while True:
        try:
            await once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - counted: the server's answer to the attack
            code = getattr(getattr(exc, "rcvd", None), "code", None)
            attack.answers[f"{name}: {code or type(exc).__name__}"] += 1
            await asyncio.sleep(0.01)


def ping_flooder(ws: str, token: str, attack: Attack) -> Callable[[], Awaitable[None]]:
    async def once() -> None:
        async with connect(f"{ws}/v1/ws?token={token}", open_timeout=10) as conn:
            while True:
                await conn.ping()
                attack.sent["ping"] += 1
                await asyncio.sleep(0)

    return once


def replay_looper(
    ws: str, token: str, symbols: list[str], attack: Attack
) -> Callable[[], Awaitable[None]]:
    subscribe = orjson.dumps(
        {"op": "subscribe", "symbols": symbols, "since": dict.fromkeys(symbols, 0)}
    ).decode()
    unsubscribe = orjson.dumps({"op": "unsubscribe", "symbols": symbols}).decode()

    async def drain(conn: ClientConnection) -> None:
        async for _ in conn:
            pass

    async def once() -> None:
        async with connect(f"{ws}/v1/ws?token={token}", max_queue=None, open_timeout=10) as conn:
            reader = asyncio.create_task(drain(conn))
            try:
                while True:  # 2 frames per round, under the default 20 a second
                    await conn.send(subscribe)
                    await conn.send(unsubscribe)
                    attack.sent["replay"] += 1
                    await asyncio.sleep(0.11)
            finally:
                reader.cancel()

    return once


def churner(ws: str, token: str, attack: Attack) -> Callable[[], Awaitable[None]]:
    async def once() -> None:
        async with connect(f"{ws}/v1/ws?token={token}", open_timeout=10):
            attack.sent["connection"] += 1

    return once


def token_hammer(http: httpx.AsyncClient, attack: Attack) -> Callable[[], Awaitable[None]]:
    async def once() -> None:
        client_id = secrets.choice(["demo", secrets.token_hex(4)])
        response = await http.post(
            "/v1/auth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": secrets.token_hex(8),
            },
        )
        attack.sent["token request"] += 1
        attack.answers[f"token: {response.status_code}"] += 1

    return once


async def _symbols(http: httpx.AsyncClient, token: str) -> list[str]:
    response = await http.get("/v1/symbols", headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return [row["symbol"] for row in response.json()]


async def _run_for(seconds: float, tasks: list[asyncio.Task[None]]) -> None:
    try:
        await asyncio.sleep(seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def measure(http_url: str, ws_url: str, signer: TokenSigner, seconds: float) -> Victim:
    """The well-behaved subscriber: every symbol, for `seconds`."""
    token = signer.issue(subject="victim", symbols=["*"], ttl_seconds=3600)
    async with httpx.AsyncClient(base_url=http_url, timeout=10) as http:
        symbols = await _symbols(http, token)
    victim = Victim()
    await _run_for(seconds, [asyncio.create_task(subscriber(ws_url, token, symbols, victim))])
    return victim


async def attack(
    http_url: str, ws_url: str, signer: TokenSigner, seconds: float, attack: Attack
) -> None:
    """Every attacker of `attack` at once, for `seconds`."""
    looper = signer.issue(subject="looper", symbols=["*"], ttl_seconds=3600)
    other = signer.issue(subject="stranger", symbols=["*"], ttl_seconds=3600)
    async with httpx.AsyncClient(base_url=http_url, timeout=10) as http:
        symbols = await _symbols(http, looper)
        loops = (
            [("ping", ping_flooder(ws_url, other, attack))] * attack.pingers
            + [("replay", replay_looper(ws_url, looper, symbols, attack))] * attack.loopers
            + [("churn", churner(ws_url, other, attack))] * attack.churners
            + [("token", token_hammer(http, attack))] * attack.hammers
        )
        await _run_for(
            seconds, [asyncio.create_task(_forever(name, attack, f)) for name, f in loops]
        )


def spawn_attackers(
    port: int, secret: str, seconds: float, attack: Attack
) -> subprocess.Popen[bytes]:
    """`attack`'s attackers in a process of their own (`--attack`), so that their load is not
    the measuring subscriber's; read_attackers() adds what they report to `attack`."""
    counts = f"{attack.pingers},{attack.loopers},{attack.churners},{attack.hammers}"
    return subprocess.Popen(
        [sys.executable, "-m", "bench.abuse", "--attack", str(port), secret, str(seconds), counts],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )


def read_attackers(process: subprocess.Popen[bytes], attack: Attack) -> None:
    out, _ = process.communicate(timeout=60)
    report = orjson.loads(out)
    attack.sent.update(report["sent"])
    attack.answers.update(report["answers"])


async def _attacker_main(port: str, secret: str, seconds: str, counts: str) -> int:
    pingers, loopers, churners, hammers = (int(n) for n in counts.split(","))
    signer = TokenSigner(secret=secret, audience="pricefeed", ttl_seconds=3600, leeway_seconds=0)
    loud = Attack(pingers=pingers, loopers=loopers, churners=churners, hammers=hammers)
    url = f"127.0.0.1:{port}"
    await attack(f"http://{url}", f"ws://{url}", signer, float(seconds), loud)
    sys.stdout.write(orjson.dumps({"sent": loud.sent, "answers": loud.answers}).decode())
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_ready(http_url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("the server exited during startup")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{http_url}/readyz", timeout=2)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError("the server did not become ready")


HEADER = f"{'phase':<8} {'ticks/s':>8} {'ticks':>7} {'gaps':>5} {'order':>6} {'p50 ms':>8} " + (
    f"{'p99 ms':>8}"
)


def _row(phase: str, victim: Victim, seconds: float) -> str:
    p50, p99 = victim.percentile(0.50), victim.percentile(0.99)
    ms = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (
        f"{phase:<8} {victim.ticks / seconds:>8.1f} {victim.ticks:>7} {victim.gaps:>5} "
        f"{victim.out_of_order:>6} {ms(p50):>8} {ms(p99):>8}"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="each phase (default 20)")
    parser.add_argument("--ticks-per-second", default="2", help="FEED_TICKS_PER_SECOND per symbol")
    opts = parser.parse_args()
    secret = secrets.token_hex(32)
    port = _free_port()
    http_url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="pricefeed-abuse-") as tmp:
        database_url = f"sqlite+aiosqlite:///{tmp}/pricefeed.db"
        subprocess.run(
            [sys.executable, "-m", "alembic", "-x", f"url={database_url}", "upgrade", "head"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        env = {
            **os.environ,
            "ENV": "dev",
            "JWT_SECRET": secret,
            "DATABASE_URL": database_url,
            "BROADCAST_URL": "memory://",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "FEED_TICKS_PER_SECOND": opts.ticks_per_second,
            "LOG_LEVEL": "warning",
        }
        with open(Path(tmp) / "server.log", "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "app"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                await _wait_ready(http_url, server)
                signer = TokenSigner(
                    secret=secret, audience="pricefeed", ttl_seconds=3600, leeway_seconds=0
                )
                quiet = await measure(http_url, ws_url, signer, opts.seconds)
                loud_attack = Attack()
                attackers = spawn_attackers(port, secret, opts.seconds + 2, loud_attack)
                try:
                    await asyncio.sleep(1)  # the attackers under way
                    loud = await measure(http_url, ws_url, signer, opts.seconds)
                    read_attackers(attackers, loud_attack)
                finally:
                    attackers.kill()
                    attackers.wait(5)
            finally:
                server.terminate()
                server.wait(15)
    print(HEADER)
    print(_row("quiet", quiet, opts.seconds))
    print(_row("attacked", loud, opts.seconds))
    print()
    print("attackers sent:", ", ".join(f"{k} {v:,}" for k, v in sorted(loud_attack.sent.items())))
    print(
        "server answers:", ", ".join(f"{k} x{v:,}" for k, v in sorted(loud_attack.answers.items()))
    )
    return 0 if loud.gaps == loud.out_of_order == 0 else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--attack"]:
        sys.exit(asyncio.run(_attacker_main(*sys.argv[2:6])))
    sys.exit(asyncio.run(main()))
