"""permessage-deflate on or off? Measures what it costs pricefeed, side by side in one run.

    python -m bench.deflate [--clients 1000] [--rate 20] [--seconds 10]

For each setting of WS_PER_MESSAGE_DEFLATE, starts pricefeed (memory broker, simulated feed at
`--rate` ticks/s per symbol) pinned to CPU 0, opens `--clients` WebSocket connections from CPU 1
that offer compression as browsers always do, and prints:
  KB/conn idle     server RSS growth per open, idle connection
  KB/conn live     RSS growth per connection once all stream 2 symbols
  CPU µs/msg       server CPU (user+sys) per delivered message while streaming
  negotiated       whether the server accepted the extension
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-bench-secret-bench-secret"


def _token() -> str:
    from app.security import TokenSigner

    signer = TokenSigner(secret=SECRET, audience="pricefeed", ttl_seconds=3600, leeway_seconds=5)
    return signer.issue(subject="bench", symbols=["*"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_stat(pid: int) -> tuple[float, int]:
    """(cpu seconds, rss bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


async def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError("server exited")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError("server not ready")


async def measure(deflate: bool, clients: int, rate: float, seconds: float) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="pf-deflate-"))
    db = f"sqlite+aiosqlite:///{tmp}/bench.db"
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db,
        "JWT_SECRET": SECRET,
        "PORT": str(port),
        "LOG_LEVEL": "warning",
        "FEED_TICKS_PER_SECOND": str(rate),
        "WS_PER_MESSAGE_DEFLATE": "true" if deflate else "false",
        "WS_MAX_CONNECTIONS_PER_SUBJECT": str(clients + 10),
        "WS_HEARTBEAT_SECONDS": "3600",
    }
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={db}", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    taskset = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    proc = subprocess.Popen(
        [*taskset, sys.executable, "-m", "app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    conns = []
    try:
        await _wait_ready(f"http://127.0.0.1:{port}", proc)
        await asyncio.sleep(0.5)
        _, rss0 = _proc_stat(proc.pid)
        url = f"ws://127.0.0.1:{port}/v1/ws?token={_token()}"
        for i in range(0, clients, 100):
            batch = [
                connect(url, compression="deflate", max_queue=None, ping_interval=None)
                for _ in range(min(100, clients - i))
            ]
            conns += await asyncio.gather(*batch)
        await asyncio.sleep(1.0)
        _, rss_idle = _proc_stat(proc.pid)
        negotiated = any(
            "permessage-deflate" in (c.response.headers.get("Sec-WebSocket-Extensions") or "")
            for c in conns[:1]
        )
        received = 0

        async def reader(conn) -> None:  # type: ignore[no-untyped-def]
            nonlocal received
            async for raw in conn:
                body = orjson.loads(raw)
                received += len(body) if isinstance(body, list) else 1

        request = orjson.dumps({"op": "subscribe", "symbols": ["AAPL", "BTC-USD"]}).decode()
        await asyncio.gather(*(c.send(request) for c in conns))
        readers = [asyncio.create_task(reader(c)) for c in conns]
        await asyncio.sleep(2.0)  # warm up
        cpu_a, _ = _proc_stat(proc.pid)
        got_a, t_a = received, time.monotonic()
        await asyncio.sleep(seconds)
        cpu_b, rss_live = _proc_stat(proc.pid)
        got_b, t_b = received, time.monotonic()
        for task in readers:
            task.cancel()
        delivered = got_b - got_a
        return {
            "deflate": deflate,
            "negotiated": negotiated,
            "clients": clients,
            "kb_per_conn_idle": (rss_idle - rss0) / clients / 1024,
            "kb_per_conn_live": (rss_live - rss0) / clients / 1024,
            "msg_per_s": delivered / (t_b - t_a),
            "cpu_us_per_msg": (cpu_b - cpu_a) / max(delivered, 1) * 1e6,
        }
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="ticks/s per symbol")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if shutil.which("taskset"):
        os.sched_setaffinity(0, {1})
    rows = [await measure(d, args.clients, args.rate, args.seconds) for d in (False, True)]
    print(
        f"\npermessage-deflate, {args.clients} clients offering it, "
        f"2 symbols x {args.rate:g} ticks/s"
    )
    print(
        "| WS_PER_MESSAGE_DEFLATE | negotiated | KB/conn idle | KB/conn live | msg/s | CPU µs/msg |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {str(r['deflate']).lower()} | {r['negotiated']} | {r['kb_per_conn_idle']:.1f} | "
            f"{r['kb_per_conn_live']:.1f} | {r['msg_per_s']:.0f} | {r['cpu_us_per_msg']:.1f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
