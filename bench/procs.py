"""Child processes of the benchmark: spawn pinned to a core, sample CPU and memory, kill.

Every child is started in its own session (process group) and registered in ``CHILDREN``;
``kill_all()`` ends them (TERM, then KILL) and runs from ``finally``/``atexit``/signals, so no
server, Redis or load generator outlives the run.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import psutil

SERVER_CORE = 0
LOAD_CORE = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")

CHILDREN: list[subprocess.Popen[bytes]] = []
PIN = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
# What every process the bench starts runs at (`--nice`): below 0 (root only) the scheduler
# lets other sessions' work on a shared machine disturb the windows less; all rows alike.
NICE = 0


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on uvloop when it is installed (it is the load generator's loop)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    cmd: list[str],
    *,
    core: int | None,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    log: Path | None = None,
    pipe: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session, pinned to ``core`` with taskset (which execs it)."""
    if core is not None and PIN:
        cmd = ["taskset", "-c", str(core), *cmd]
    if NICE:
        cmd = ["nice", "-n", str(NICE), *cmd]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the child
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
        stdout=subprocess.PIPE if pipe else out,
        stderr=out,
        start_new_session=True,
    )
    if log:
        out.close()  # the child holds its own copy
    CHILDREN.append(proc)
    return proc


def kill(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """TERM the child's process group (its workers too), KILL what is left after ``timeout``."""
    if proc.poll() is None:
        try:
            tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            tree = [proc.pid]
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:  # a worker that left the group, or ignored TERM
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
    for f in (proc.stdin, proc.stdout):
        if f:
            try:
                f.close()
            except OSError:
                pass
    if proc in CHILDREN:
        CHILDREN.remove(proc)


def kill_all() -> None:
    for proc in list(reversed(CHILDREN)):
        try:
            kill(proc, timeout=3)
        except Exception:  # noqa: BLE001 - best effort at exit, keep killing the rest
            pass


def install_cleanup() -> None:
    atexit.register(kill_all)

    def on_signal(signum: int, _frame: object) -> None:
        # Kill first: the runner may be blocked on a child's answer, which then ends in EOF.
        kill_all()
        raise SystemExit(128 + signum)

    # SIGINT too (Ctrl-C), also when started in the background with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def tree_pids(pid: int) -> list[int]:
    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime (from /proc/<pid>/stat) of ``pid`` and its live descendants."""
    total = 0
    for p in tree_pids(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def feed_pids(pid: int) -> list[int]:
    """The product's own producer processes (`python -m app.feed`) under server `pid`."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            if "app.feed" in child.cmdline():
                out.append(child.pid)
        except psutil.Error:
            continue
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of exactly `pids` (not their descendants)."""
    total = 0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def worker_pids(pid: int, workers: int) -> list[int]:
    """The processes that serve: `pid` itself with one worker; with several, uvicorn's
    multiprocessing workers under it (not its resource tracker)."""
    if workers <= 1:
        return [pid]
    children = psutil.Process(pid).children()
    return [c.pid for c in children if "multiprocessing.spawn" in " ".join(c.cmdline())]


def established_by_pid(pids: list[int], port: int) -> list[int]:
    """How many client connections to `port` each of `pids` holds."""
    counts = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            counts.append(0)
            continue
        counts.append(
            sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
        )
    return counts


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            total += psutil.Process(p).memory_info().rss
        except psutil.Error:
            pass
    return total


def core_busy() -> dict[int, tuple[int, int]]:
    """Per-core (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def system_cpu() -> tuple[float, float, float]:
    """(user+nice+system, irq+softirq, steal) seconds over all cores, from /proc/stat. Steal is
    time the hypervisor ran something else while this VM had work: on a shared host, the
    noise no process here can see."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            return (v[0] + v[1] + v[2]) / CLK_TCK, (v[5] + v[6]) / CLK_TCK, v[7] / CLK_TCK
    return 0.0, 0.0, 0.0


async def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (at most ``max_wait`` s) until the machine's task CPU drops under ``threshold``
    cores over one second; the last measured load, in cores."""
    deadline = time.monotonic() + max_wait
    while True:
        a = system_cpu()[0]
        await asyncio.sleep(1.0)
        load = system_cpu()[0] - a
        if load < threshold or time.monotonic() >= deadline:
            return load


def core_util(a: dict[int, tuple[int, int]], b: dict[int, tuple[int, int]]) -> dict[int, float]:
    return {c: 100.0 * (b[c][0] - a[c][0]) / max(1, b[c][1] - a[c][1]) for c in b if c in a}


async def wait_http_ok(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll ``GET http://127.0.0.1:port/path`` until it answers 200."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            status = await asyncio.wait_for(reader.readline(), 2.0)
            writer.close()
            parts = status.split()
            if len(parts) >= 2 and parts[1] == b"200":
                return
            last = status.decode(errors="replace").strip()
        except (TimeoutError, OSError) as exc:
            last = repr(exc)
        await asyncio.sleep(0.1)
    raise RuntimeError(f"GET {path} not 200 after {timeout:.0f}s: {last}")


async def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if b"chunked" in head.lower():
        body = _unchunk(body)
    return status, body


def _unchunk(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        nl = body.find(b"\r\n", pos)
        if nl < 0:
            break
        size = int(body[pos:nl].split(b";")[0], 16)
        if size == 0:
            break
        out += body[nl + 2 : nl + 2 + size]
        pos = nl + 2 + size + 2
    return bytes(out)


class Redis:
    """A throw-away redis-server on a free loopback port (no persistence)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.proc = spawn(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--maxclients",
                "10000",
            ],
            core=LOAD_CORE,
            log=workdir / f"redis-{self.port}.log",
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"PING\r\n")
                if (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG"):
                    writer.close()
                    return
                writer.close()
            except (TimeoutError, OSError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        kill(self.proc)


def run_main(main: Coroutine[Any, Any, int], name: str) -> int:
    """Run a benchmark's `main()` coroutine from core 1 (the runner stays off the server core),
    and kill every child process however it ends."""
    install_cleanup()
    if PIN:
        os.sched_setaffinity(0, {LOAD_CORE})
    try:
        return asyncio.run(main)
    except (KeyboardInterrupt, SystemExit) as exc:
        print(f"\n{name} interrupted ({exc!r}); every child process killed", file=sys.stderr)
        return 130
    finally:
        kill_all()
