"""Load generator: many lean WebSocket clients in one uvloop process (pinned to the load core).

The WebSocket client is a bare ``asyncio.Protocol``: an HTTP/1.1 upgrade, then unmasked
server frames parsed in place, no extensions, no per-message task. Each text frame is parsed
with orjson only to read ``symbol``, ``seq`` and ``ts`` of every tick (an object frame, an
array-of-ticks batch frame, or a socket.io ``42["tick",{...}]`` event).

Per tick: count, latency = receive time - ``ts`` into a 0.1 ms histogram, and per client and
symbol the last ``seq``: a jump is a gap (``missed`` adds up the skipped ticks), a ``seq`` not
above the last one a duplicate.

Control on stdin, one command a line, each answered by one JSON line on stdout:
  ``connect N``  open N more clients, answer once each is ready (subscribed) or failed
  ``mark``       counters since the previous mark (then reset); ``mark sub``: the same, but
                 which connections stayed silent is only judged between plain marks
  ``quit``       close every socket and exit
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import resource
import sys
import time
from collections import Counter
from typing import Any

import orjson

# Latency histogram: 0.1 ms buckets below 1 s, 10 ms buckets from 1 s to 120 s, the last
# bucket catches everything above.
FINE_BUCKETS = 10_000
LAT_BUCKETS = FINE_BUCKETS + 11_900


def bucket_upper_ms(b: int) -> float:
    """Upper edge, in ms, of histogram bucket ``b``."""
    if b < FINE_BUCKETS:
        return (b + 1) / 10.0
    return 1000.0 + (b - FINE_BUCKETS + 1) * 10.0


_loads = orjson.loads


def make_token(idx: int, secret: str, audience: str) -> str:
    """Client ``idx``'s JWT (the runner writes these for the C load generator too)."""
    from jose import jwt

    claims = {
        "sub": f"bench-{idx}",  # one subject per client: per-subject connection caps
        "aud": audience,
        "exp": int(time.time()) + 3600,
        "symbols": ["*"],
    }
    return jwt.encode(claims, secret, algorithm="HS256")


class Stats:
    def __init__(self) -> None:
        self.reset()
        self.closed: Counter[str] = Counter()

    def reset(self) -> None:
        self.frames = 0
        self.ticks = 0
        self.snapshots = 0
        self.gaps = 0
        self.missed = 0
        self.dups = 0
        self.errors = 0
        self.error_sample = ""
        self.resubscribes = 0
        self.hist = [0] * LAT_BUCKETS
        self.lat_max = 0.0


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    k = (key * (n // 4 + 1))[:n]
    return key + (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + _mask(payload)


class Conn(asyncio.Protocol):
    """One WebSocket client. Subclasses say what to send once open and how to read text."""

    def __init__(self, lg: LoadGen, idx: int, symbols: list[str]) -> None:
        self.lg = lg
        self.st = lg.stats
        self.idx = idx
        self.symbols = symbols
        self.buf = b""
        self.open = False
        self.closing = False
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last: dict[str, int] = {}
        self.frag: list[bytes] = []
        self.got = 0  # ticks since the last mark

    # --- subclass hooks
    def path(self) -> str:
        raise NotImplementedError

    def on_open(self) -> None:
        pass

    def on_text(self, payload: bytes, now: float) -> None:
        raise NotImplementedError

    # --- helpers
    def send_text(self, data: bytes) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.write(client_frame(data))

    def set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        elif not self.closing:
            self.st.closed[reason] += 1
        self.closing = True
        if self.transport:
            self.transport.abort()

    def tick(self, t: dict[str, Any], now: float) -> None:
        st = self.st
        st.ticks += 1
        self.got += 1
        sym = t["symbol"]
        seq = t["seq"]
        last = self.last.get(sym)
        if last is not None:
            d = seq - last
            if d != 1:
                if d > 1:
                    st.gaps += 1
                    st.missed += d - 1
                else:
                    st.dups += 1
                    return
        self.last[sym] = seq
        lat = now - t["ts"]
        if lat > st.lat_max:
            st.lat_max = lat
        b = int(lat * 10)
        if b >= FINE_BUCKETS:
            b = min(FINE_BUCKETS + int((lat - 1000.0) / 10.0), LAT_BUCKETS - 1)
        elif b < 0:
            b = 0
        st.hist[b] += 1

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET {self.path()} HTTP/1.1\r\nHost: 127.0.0.1:{self.lg.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.transport.write(req.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.fail("eof" if self.open else f"eof before upgrade ({exc!r})")
        self.lg.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.buf[:end], self.buf[end + 4 :]
            self.buf = b""
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self.fail("http " + status.decode(errors="replace")[9:].strip())
                return
            self.open = True
            self.on_open()
            if not data:
                return
        buf = self.buf + data if self.buf else data
        now = time.time() * 1000.0
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            ln = buf[pos + 1] & 0x7F
            hdr = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hdr = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hdr = 10
            end = pos + hdr + ln
            if end > n:
                break
            payload = buf[pos + hdr : end]
            pos = end
            op = b0 & 0x0F
            if b0 & 0x80 and op == 1:
                self.st.frames += 1
                self.on_text(payload, now)
            elif op == 9:  # ping
                if self.transport:
                    self.transport.write(client_frame(payload, 0xA))
            elif op == 8:  # close
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.fail(f"close {code}")
                return
            elif op in (0, 1):  # fragmented text
                self.frag.append(payload)
                if b0 & 0x80:
                    whole = b"".join(self.frag)
                    self.frag = []
                    self.st.frames += 1
                    self.on_text(whole, now)
        self.buf = buf[pos:] if pos < n else b""


class PricefeedConn(Conn):
    """pricefeed ``/v1/ws``: subscribe op, ``subscribed`` ack, snapshot, tick or [tick, ...]."""

    retries = 0

    def path(self) -> str:
        return "/v1/ws?token=" + self.lg.token(self.idx)

    def on_open(self) -> None:
        msg: dict[str, Any] = {"op": "subscribe", "symbols": self.symbols}
        if self.lg.args.batch:
            msg["batch"] = True
        self.send_text(orjson.dumps(msg))

    def on_text(self, payload: bytes, now: float) -> None:
        obj = _loads(payload)
        if type(obj) is list:
            for t in obj:
                if t.get("type", "tick") == "tick":
                    self.tick(t, now)
                else:
                    self.other(t)
            return
        typ = obj.get("type")
        if typ == "tick":
            self.tick(obj, now)
        else:
            self.other(obj)

    def other(self, obj: dict[str, Any]) -> None:
        typ = obj.get("type")
        if typ == "snapshot":
            self.st.snapshots += 1
            seq = obj.get("seq")
            if isinstance(seq, int):
                self.last[obj["symbol"]] = max(seq, self.last.get(obj["symbol"], 0))
        elif typ == "subscribed":
            self.set_ready()
        elif typ == "error":
            self.st.errors += 1
            self.st.error_sample = str(obj)[:200]
            if obj.get("code") == "unavailable" and self.retries < 5:
                # "retry later": what a real client does, after a jittered pause
                self.retries += 1
                self.st.resubscribes += 1
                asyncio.get_running_loop().call_later(
                    random.uniform(0.2, 1.0) * self.retries, self.on_open
                )
            elif not self.ready.done():
                self.fail(f"error {obj.get('code')}")


class BroadcasterConn(Conn):
    """broadcaster-readme ``/ws/{symbols}``: raw tick frames, no ack (ready once upgraded)."""

    def path(self) -> str:
        return "/ws/" + ",".join(self.symbols)

    def on_open(self) -> None:
        self.set_ready()

    def on_text(self, payload: bytes, now: float) -> None:
        obj = _loads(payload)
        if obj.get("type") == "tick":
            self.tick(obj, now)


class SocketIOConn(Conn):
    """socket.io v5 over engine.io v4, websocket transport only (no polling handshake)."""

    def path(self) -> str:
        return "/socket.io/?EIO=4&transport=websocket"

    def on_text(self, payload: bytes, now: float) -> None:
        if payload[:3] == b"42[":
            ev = _loads(payload[2:])
            if ev[0] == "tick":
                t = ev[1]
                if type(t) is str:
                    t = _loads(t)
                self.tick(t, now)
        elif payload == b"2":  # engine.io ping -> pong
            self.send_text(b"3")
        elif payload[:1] == b"0":  # engine.io open -> socket.io connect to "/"
            self.send_text(b"40")
        elif payload[:2] == b"40":  # namespace connected -> subscribe, ack id 1
            self.send_text(b'421["subscribe",' + orjson.dumps(self.symbols) + b"]")
        elif payload[:3] == b"431":
            self.set_ready()
        elif payload[:2] == b"44":
            self.fail("connect_error")


KINDS: dict[str, type[Conn]] = {
    "pricefeed": PricefeedConn,
    "broadcaster": BroadcasterConn,
    "sio": SocketIOConn,
}


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = args.port
        self.symbols = args.symbols.split(",")
        self.stats = Stats()
        self.conns: set[Conn] = set()
        self.next_idx = 0
        self.mark_at = time.monotonic()
        self.mark_cpu = self._cpu()
        self._tokens: dict[int, str] = {}

    @staticmethod
    def _cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def token(self, idx: int) -> str:
        return make_token(idx, self.args.jwt_secret, self.args.audience)

    def client_symbols(self, idx: int) -> list[str]:
        m, k = len(self.symbols), self.args.per_client
        return [self.symbols[(idx * k + j) % m] for j in range(min(k, m))]

    async def connect(self, n: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        cls = KINDS[self.args.kind]
        sem = asyncio.Semaphore(self.args.concurrency)
        reasons: Counter[str] = Counter()
        ok = 0
        t0 = time.monotonic()

        async def one(idx: int) -> None:
            nonlocal ok
            async with sem:
                conn = cls(self, idx, self.client_symbols(idx))
                try:
                    await asyncio.wait_for(
                        loop.create_connection(lambda: conn, "127.0.0.1", self.port),
                        self.args.ready_timeout,
                    )
                    self.conns.add(conn)
                    await asyncio.wait_for(asyncio.shield(conn.ready), self.args.ready_timeout)
                    ok += 1
                except (TimeoutError, OSError, ConnectionError) as exc:
                    reason = (
                        str(exc)
                        if isinstance(exc, ConnectionError) and str(exc)
                        else type(exc).__name__
                    )
                    reasons[reason[:80]] += 1
                    conn.closing = True
                    if conn.transport:
                        conn.transport.abort()
                    self.conns.discard(conn)

        idxs = range(self.next_idx, self.next_idx + n)
        self.next_idx += n
        if idxs.start == 0 and self.args.kind == "broadcaster":
            # broadcaster 0.3.1's Broadcast.subscribe() loses a subscriber that joins a channel
            # while the channel's first SUBSCRIBE is in flight (both see no subscribers, the
            # second overwrites the first's set). Open one client per symbol alone first and
            # give the server time to subscribe, so the comparison measures throughput, not
            # that race (which a real deployment would hit on every cold start).
            prime = min(n, len(self.symbols))
            for i in idxs[:prime]:
                await one(i)
            await asyncio.sleep(0.5)
            idxs = idxs[prime:]
        await asyncio.gather(*(one(i) for i in idxs))
        return {
            "event": "connected",
            "ok": ok,
            "failed": n - ok,
            "fail_reasons": dict(reasons),
            "open": len(self.conns),
            "elapsed": time.monotonic() - t0,
        }

    def mark(self, sub: bool = False) -> dict[str, Any]:
        """Counters since the last mark. A ``sub`` mark leaves the per-connection "got a tick"
        flags alone: silence is judged between full marks."""
        st = self.stats
        silent = 0
        if not sub:
            for c in self.conns:
                if not c.got and c.open:
                    silent += 1
                c.got = 0
        now, cpu = time.monotonic(), self._cpu()
        out = {
            "event": "mark",
            "elapsed": now - self.mark_at,
            "cpu": cpu - self.mark_cpu,
            "frames": st.frames,
            "ticks": st.ticks,
            "snapshots": st.snapshots,
            "gaps": st.gaps,
            "missed": st.missed,
            "dups": st.dups,
            "errors": st.errors,
            "error_sample": st.error_sample,
            "resubscribes": st.resubscribes,
            "lat_max": st.lat_max,
            "hist": {i: c for i, c in enumerate(st.hist) if c},
            "closed": dict(st.closed),
            "open": len(self.conns),
            "silent": silent,
        }
        st.reset()
        st.closed.clear()
        self.mark_at, self.mark_cpu = now, cpu
        return out

    def close_all(self) -> None:
        for c in list(self.conns):
            c.closing = True
            if c.transport:
                c.transport.abort()


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
    sys.stdout.flush()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=sorted(KINDS), required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--symbols", required=True)
    ap.add_argument("--per-client", type=int, default=1)
    ap.add_argument("--batch", action="store_true", help="pricefeed: ask for batch frames")
    ap.add_argument("--jwt-secret", default="bench-secret-bench-secret-bench-secret")
    ap.add_argument("--audience", default="pricefeed")
    ap.add_argument("--concurrency", type=int, default=100, help="handshakes in flight")
    ap.add_argument("--ready-timeout", type=float, default=30.0)
    args = ap.parse_args()

    from bench.procs import raise_fd_limit

    raise_fd_limit()
    random.seed(os.getpid())
    lg = LoadGen(args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            lg.close_all()
            await asyncio.sleep(0.1)
            _reply({"event": "bye"})
            return
        cmd, *rest = line.split()
        if cmd == "connect":
            _reply(await lg.connect(int(rest[0])))
        elif cmd == "mark":
            _reply(lg.mark(sub=rest == ["sub"]))
        else:
            _reply({"event": "error", "message": f"unknown command {cmd!r}"})


if __name__ == "__main__":
    from bench.procs import run_async

    run_async(main())
