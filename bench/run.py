"""Benchmark runner: ``python -m bench`` (or ``python bench/run.py``); see bench/README.md.

For each chosen server and scenario: a fresh redis-server and a fresh server (pinned to core 0),
the load generator and the publisher (pinned to core 1), a warm-up, then a measuring window
between two marks. Everything is killed after each scenario, and on any exit.

The load generator is bench/loadgen.c (built into bench/.build/ on first use) when a C compiler
is on PATH, else bench/loadgen.py; ``--loadgen`` picks one. The c-floor peer
(bench/peers/floor.c) is built the same way, by its ``start``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from bench import cpuquota, procs, pubwatch, report
from bench.loadgen import make_token
from bench.procs import LOAD_CORE, Redis, free_port, kill, spawn
from bench.pubwatch import PublishWatch
from bench.servers import (
    BUILD,
    C_FLAGS,
    DEFAULT_SERVERS,
    JWT_SECRET,
    QUICK_SERVERS,
    REPO,
    SERVERS,
    Server,
    bench_symbols,
    build_c,
    c_compiler,
    ensure_node_modules,
)
from bench.takes import DISTURBED_OTHER_PCT, DISTURBED_STEAL_PCT, disturbance, least_disturbed

RESULTS = REPO / "bench" / "results"
LOADGEN_C = REPO / "bench" / "loadgen.c"
LOADGEN_BIN = BUILD / "loadgen"
JWT_AUDIENCE = "pricefeed"  # loadgen.py's --audience default


def resolve_loadgen(opts: argparse.Namespace) -> str | None:
    """Settle ``opts.loadgen`` (c or py), building the C one; a note when it falls back."""
    if opts.loadgen == "py":
        return None
    if opts.loadgen is None and c_compiler() is None:
        opts.loadgen = "py"
        return "no C compiler (gcc or cc) on PATH: using the Python load generator"
    try:
        build_c(LOADGEN_C, LOADGEN_BIN)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        if opts.loadgen == "c":
            raise
        opts.loadgen = "py"
        return f"could not build bench/loadgen.c ({exc}): using the Python load generator"
    opts.loadgen = "c"
    return None


def c_build_about() -> str:
    """The compiler and flags C programs are built with here."""
    cc = c_compiler() or "cc"
    return f"{report._cmd_version([cc, '--version'])}, {' '.join(C_FLAGS)}"


def loadgen_about(kind: str) -> str:
    if kind == "c":
        return f"C (bench/loadgen.c, {c_build_about()}), epoll, one process"
    return f"Python (bench/loadgen.py), uvloop {report._version('uvloop')}, one process"


@dataclass
class Scenario:
    name: str
    clients: int
    rate: float | None  # delivered msg/s asked; None = idle
    duration: float
    publish: str = "burst"  # how the publisher sends its ticks (bench/producer.py)


class Ctl:
    """A child driven by one-line commands on stdin, each answered by one JSON line."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    async def cmd(self, line: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise RuntimeError(f"{self.name} is gone: {_tail(self.log)}") from exc
        try:
            out = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        except TimeoutError as exc:
            kill(self.proc)  # the reader thread gets EOF; this child is done for
            raise RuntimeError(f"{self.name}: no answer to {line!r} in {timeout:.0f}s") from exc
        if not out:
            raise RuntimeError(f"{self.name} exited ({self.proc.poll()}): {_tail(self.log)}")
        return orjson.loads(out)

    async def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                await self.cmd("quit", 5)
            except (RuntimeError, OSError):
                pass
        kill(self.proc)


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])[-600:]


def _log_problems(path: Path) -> list[str]:
    """Tracebacks / errors a server wrote to its log during the scenario (first few)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    hits = [
        ln.strip()
        for ln in text.splitlines()
        if any(w in ln for w in ("Traceback", "ERROR", "Error:", "CRITICAL", "exception"))
    ]
    return hits[:3]


def merge_marks(marks: list[dict[str, Any]]) -> dict[str, Any]:
    """Load generator marks taken one after another, as one."""
    out = dict(marks[-1])
    for key in (
        "elapsed",
        "cpu",
        "frames",
        "ticks",
        "snapshots",
        "gaps",
        "missed",
        "dups",
        "errors",
        "resubscribes",
    ):
        out[key] = sum(m[key] for m in marks)
    out["lat_max"] = max(m["lat_max"] for m in marks)
    out["error_sample"] = next((m["error_sample"] for m in marks if m["error_sample"]), "")
    hist: dict[int, int] = {}
    closed: dict[str, int] = {}
    for m in marks:
        hist = report.merge_hist(hist, m["hist"])
        for k, v in m["closed"].items():
            closed[k] = closed.get(k, 0) + v
    out["hist"], out["closed"] = hist, closed
    return out


class FeedWatch:
    """Stands in for the publisher where the product's own producer publishes (producer
    "own"): answers `mark` with the ticks it stored since the last one, counted from the
    store's latest seqs in Redis (bench/feedcost.py), as the publisher counts what it sent."""

    def __init__(self, redis_url: str) -> None:
        from redis.asyncio import Redis as RedisClient

        self._client = RedisClient.from_url(redis_url)
        self._last: tuple[int, float] | None = None
        # The producer's part of each tick's latency (bench/pubwatch.py), from the warm-up on.
        self._published = PublishWatch()
        self._watching = asyncio.get_running_loop().create_task(self._published.start(redis_url))

    async def cmd(self, line: str, timeout: float) -> dict[str, Any]:
        from bench.feedcost import seq_total

        if line != "mark":
            return {}
        _, ticks = await asyncio.wait_for(seq_total(self._client), timeout)
        now = time.monotonic()
        last, self._last = self._last, (ticks, now)
        published = self._published.mark() if self._watching.done() else {}
        if last is None:
            return {"ticks": 0, "elapsed": 0.0, "published_hist": {}}
        return {"ticks": ticks - last[0], "elapsed": now - last[1], "published_hist": published}

    async def quit(self) -> None:
        self._published.close()
        await self._client.aclose()


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.symbols = bench_symbols(opts.symbols)

    def write_tokens(self, path: Path) -> None:
        """JWTs for the C load generator, line i for client i: enough for the largest scenario
        (the idle one connects 20 warm-up clients first; connects number clients on from the
        previous one)."""
        opts = self.opts
        n = max(opts.s1_clients, opts.s2_clients, opts.scale_clients, opts.idle_conns + 20) + 100
        path.write_text("".join(make_token(i, JWT_SECRET, JWT_AUDIENCE) + "\n" for i in range(n)))

    def loadgen_cmd(self, spec: Server, port: int, workdir: Path) -> list[str]:
        opts = self.opts
        args = [
            "--kind",
            spec.client_kind,
            "--port",
            str(port),
            "--symbols",
            ",".join(self.symbols),
            "--per-client",
            str(opts.symbols_per_client),
            "--concurrency",
            str(opts.concurrency),
        ]
        if spec.batch:
            args.append("--batch")
        if opts.loadgen == "py":
            return [sys.executable, "-m", "bench.loadgen", *args]
        if spec.client_kind == "pricefeed":
            tokens = workdir / "tokens.txt"
            self.write_tokens(tokens)
            args += ["--tokens", str(tokens)]
        return [str(LOADGEN_BIN), *args]

    async def run_scenario(self, spec: Server, scen: Scenario) -> dict[str, Any]:
        opts = self.opts
        row: dict[str, Any] = {"server": spec.name, "scenario": scen.name, "notes": []}
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{spec.name}-{scen.name}-"))
        server_log = workdir / "server.log"
        redis = server = lg = prod = None
        t0 = time.monotonic()
        quota = contextlib.ExitStack()
        try:
            redis = Redis(workdir)
            await redis.ready()
            port = free_port()
            await spec.prepare(
                port=port,
                redis_url=redis.url,
                workdir=workdir,
                log=server_log,
                symbols=self.symbols,
            )
            used, ticks_for = self._publishing(scen)
            server = spec.start(
                port=port,
                redis_url=redis.url,
                workdir=workdir,
                log=server_log,
                ticks_per_symbol=ticks_for(scen.rate) / len(used) if scen.rate else None,
            )
            await procs.wait_http_ok(port, spec.health_path, server, timeout=60)
            await asyncio.sleep(0.5)
            if server.poll() is not None:  # a worker that failed after the first answered
                raise RuntimeError(f"server exited ({server.returncode}): {_tail(server_log)}")
            await procs.wait_http_ok(port, spec.health_path, server, timeout=10)
            row["startup_s"] = round(time.monotonic() - t0, 2)
            workers: list[int] = []
            groups: list[Path] = []
            if spec.worker_cores is not None:
                workers = procs.worker_pids(server.pid, spec.workers)
                if len(workers) != spec.workers:
                    raise RuntimeError(f"found {len(workers)} workers, not {spec.workers}")
                groups = quota.enter_context(
                    cpuquota.capped(workers, spec.worker_cores, f"{spec.name}-{scen.name}")
                )

            lg_log = workdir / "loadgen.log"
            lg_cmd = self.loadgen_cmd(spec, port, workdir)
            lg = Ctl(
                "loadgen", spawn(lg_cmd, core=LOAD_CORE, cwd=REPO, log=lg_log, pipe=True), lg_log
            )
            if scen.rate is None:
                await self._idle(row, spec, scen, server, lg)
            elif scen.name == "scale":
                prod = await self._ladder(row, spec, scen, server, lg, redis.url, workdir)
            else:
                prod = await self._load(
                    row, spec, scen, server, lg, port, redis.url, redis.proc.pid, workdir
                )
            if workers:
                row["worker_conns"] = procs.established_by_pid(workers, port)
                row["throttled_s"] = [round(cpuquota.throttled_seconds(g), 1) for g in groups]
                row["notes"].append(
                    f"{spec.workers} worker(s) at {spec.worker_cores:g} core each; connections "
                    f"per worker {row['worker_conns']}; held back by the quota "
                    f"{row['throttled_s']} s (saturated workers)"
                )
            if server.poll() is not None:
                row["notes"].append(f"server exited ({server.returncode}): {_tail(server_log)}")
            row["notes"] += [f"server log: {p}" for p in _log_problems(server_log)]
        except Exception as exc:  # noqa: BLE001 - one failed scenario must not end the run
            row["error"] = f"{type(exc).__name__}: {exc}"
            if server is not None:
                row["notes"].append(f"server log tail: {_tail(server_log)}")
        finally:
            t_down = time.monotonic()
            quota.close()
            for ctl in (prod, lg):
                if ctl is not None:
                    await ctl.quit()
            if server is not None:
                kill(server, timeout=2)
            if redis is not None:
                redis.stop()
            row["teardown_s"] = round(time.monotonic() - t_down, 2)
            if opts.keep_logs:
                row["logs"] = str(workdir)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        return row

    async def _connect(self, row: dict[str, Any], lg: Ctl, n: int) -> dict[str, Any]:
        res = await lg.cmd(f"connect {n}", timeout=60 + n * 0.05)
        row["conns_asked"] = row.get("conns_asked", 0) + n
        row["conns_ok"] = row.get("conns_ok", 0) + res["ok"]
        row["conn_failed"] = row.get("conn_failed", 0) + res["failed"]
        row["connect_s"] = round(row.get("connect_s", 0) + res["elapsed"], 2)
        if res["fail_reasons"]:
            row["notes"].append(f"connect failures: {res['fail_reasons']}")
        return res

    @staticmethod
    def _series(row: dict[str, Any], marks: list[dict[str, Any]]) -> None:
        """Per-second delivered rate and latency; a note when latency keeps growing."""
        series, t = [], 0.0
        for m in marks:
            t += m["elapsed"]
            hist = {int(k): v for k, v in m["hist"].items()}
            series.append(
                {
                    "t_s": round(t, 2),
                    "msg_s": round(m["ticks"] / m["elapsed"]) if m["elapsed"] else 0,
                    "p50_ms": report.percentile(hist, 0.5),
                    "gaps": m["gaps"],
                }
            )
        row["series"] = series
        p50s = [x["p50_ms"] for x in series if x["p50_ms"] is not None]
        third = len(p50s) // 3
        if third:
            first = sum(p50s[:third]) / third
            last = sum(p50s[-third:]) / third
            if last > 100 and last > 1.5 * first:
                row["notes"].append(
                    f"p50 latency grew from {first:,.0f} ms (first third of the window) to "
                    f"{last:,.0f} ms (last third): a backlog is building up"
                )
        rates = [x["msg_s"] for x in series[:-1]]  # the last one may be a short second
        if len(rates) >= 3 and max(rates) > 3 * max(1, min(rates)):
            row["notes"].append(
                f"bursty delivery: per-second msg/s between {min(rates):,} and {max(rates):,}"
            )

    async def _idle(
        self,
        row: dict[str, Any],
        spec: Server,
        scen: Scenario,
        server: subprocess.Popen[bytes],
        lg: Ctl,
    ) -> None:
        warm = 20  # first connections import/allocate once per process: not per connection
        await self._connect(row, lg, warm)
        await asyncio.sleep(1.0)
        rss0 = procs.tree_rss_bytes(server.pid)
        res = await self._connect(row, lg, scen.clients)
        cpu0, t0 = procs.tree_cpu_seconds(server.pid), time.monotonic()
        await asyncio.sleep(self.opts.idle_settle)
        rss1 = procs.tree_rss_bytes(server.pid)
        row["srv_cpu_pct"] = (
            100 * (procs.tree_cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
        )
        mark = await lg.cmd("mark", 30)
        row["conns_asked"] -= warm
        row["conns_ok"] = max(0, row["conns_ok"] - warm)  # the warm-up ones are not part of N
        row["drops"] = sum(mark["closed"].values())
        if mark["closed"]:
            row["notes"].append(f"closed while idle: {mark['closed']}")
        row["rss_mb"] = rss1 / 2**20
        row["rss_base_mb"] = rss0 / 2**20
        if res["ok"]:
            row["kb_per_conn"] = (rss1 - rss0) / 1024 / res["ok"]

    def _publishing(self, scen: Scenario) -> tuple[list[str], Callable[[float], float]]:
        """The symbols the scenario's clients use, and the publisher's ticks/s (all symbols)
        for a delivered msg/s asked: ticks/s per symbol × subscribers per symbol = asked."""
        k = min(self.opts.symbols_per_client, len(self.symbols))
        used = self.symbols[: min(len(self.symbols), scen.clients * k)]

        def ticks_for(asked: float) -> float:
            return asked / (scen.clients * k) * len(used)

        return used, ticks_for

    @staticmethod
    def _publisher(
        spec: Server,
        redis_url: str,
        symbols: list[str],
        rate: float,
        workdir: Path,
        publish: str = "burst",
    ) -> Ctl | FeedWatch:
        if spec.producer == "own":
            return FeedWatch(redis_url)
        cmd, cwd = spec.producer_cmd(
            redis_url=redis_url, symbols=symbols, rate=rate, publish=publish
        )
        log = workdir / "producer.log"
        return Ctl("producer", spawn(cmd, core=LOAD_CORE, cwd=cwd, log=log, pipe=True), log)

    async def _load(
        self,
        row: dict[str, Any],
        spec: Server,
        scen: Scenario,
        server: subprocess.Popen[bytes],
        lg: Ctl,
        port: int,
        redis_url: str,
        redis_pid: int,
        workdir: Path,
    ) -> Ctl | FeedWatch:
        opts = self.opts
        await self._connect(row, lg, scen.clients)
        used, ticks_for = self._publishing(scen)
        prod_rate = ticks_for(scen.rate)
        row["asked_rate"] = scen.rate
        row["ticks_per_symbol"] = prod_rate / len(used)
        # pricefeed's conflation counter, read before the first tick and after the last one
        # is through (a saturated server answers /metrics seconds late, so not at the marks)
        confl0 = await spec.conflations(port)
        prod = self._publisher(spec, redis_url, used, prod_rate, workdir, scen.publish)
        row["publish"] = scen.publish
        await asyncio.sleep(opts.warmup)

        load_pids = [lg.proc.pid, redis_pid] + ([prod.proc.pid] if isinstance(prod, Ctl) else [])
        # The product's own producer, inside the server's tree: its share is shown apart.
        feed = procs.feed_pids(server.pid) if spec.producer == "own" else []

        async def mark() -> dict[str, Any]:
            lm = await lg.cmd("mark", 30)
            out = {
                "lg": lm,
                "cpu": procs.tree_cpu_seconds(server.pid),
                "feed_cpu": procs.cpu_seconds(feed),
                "load_cpu": sum(procs.tree_cpu_seconds(p) for p in load_pids),
                "cores": procs.core_busy(),
                "sys": procs.system_cpu(),
                "t": time.monotonic(),
            }
            out["prod"] = await prod.cmd("mark", 10)
            return out

        a = await mark()
        rss_a = procs.tree_rss_bytes(server.pid)
        subs: list[dict[str, Any]] = []  # one load generator mark a second: the time series
        end = time.monotonic() + scen.duration
        while end - time.monotonic() > 1.0:
            await asyncio.sleep(1.0)
            subs.append(await lg.cmd("mark sub", 30))
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        b = await mark()
        row["rss_mb"] = procs.tree_rss_bytes(server.pid) / 2**20
        row["rss_growth_mb"] = row["rss_mb"] - rss_a / 2**20

        lm = merge_marks([*subs, b["lg"]])
        self._series(row, [*subs, b["lg"]])
        window = lm["elapsed"]
        row["window_s"] = round(window, 2)
        row["delivered_rate"] = lm["ticks"] / window
        row["frames_rate"] = lm["frames"] / window
        cpu = b["cpu"] - a["cpu"]
        row["srv_cpu_pct"] = 100 * cpu / (b["t"] - a["t"])
        row["cpu_us_per_msg"] = cpu * 1e6 / lm["ticks"] if lm["ticks"] else None
        if feed and lm["ticks"]:
            feed_cpu = b["feed_cpu"] - a["feed_cpu"]
            row["feed_cpu_us_per_msg"] = feed_cpu * 1e6 / lm["ticks"]
            row["notes"].append(
                f"of the CPU µs/msg, the producer (python -m app.feed) "
                f"{row['feed_cpu_us_per_msg']:.1f}, the server "
                f"{row['cpu_us_per_msg'] - row['feed_cpu_us_per_msg']:.1f}"
            )
        hist = {int(k): v for k, v in lm["hist"].items()}
        row["p50_ms"] = report.percentile(hist, 0.50)
        row["p99_ms"] = report.percentile(hist, 0.99)
        row["p999_ms"] = report.percentile(hist, 0.999)
        row["max_ms"] = lm["lat_max"] if lm["ticks"] else None
        row["hist"] = hist  # bucket -> count, see loadgen.bucket_upper_ms
        row["gaps"], row["missed"], row["dups"] = lm["gaps"], lm["missed"], lm["dups"]
        row["snapshots"] = a["lg"]["snapshots"] + lm["snapshots"]
        closed = dict(a["lg"]["closed"])
        for key, v in lm["closed"].items():
            closed[key] = closed.get(key, 0) + v
        row["drops"] = sum(closed.values())
        if closed:
            row["notes"].append(f"closed during warm-up+window: {closed}")
        if lm["errors"] or a["lg"]["errors"]:
            row["notes"].append(
                f"error frames: {lm['errors'] + a['lg']['errors']}, "
                f"e.g. {lm['error_sample'] or a['lg']['error_sample']}"
            )
        row["open_at_end"] = lm["open"]
        row["silent"] = lm["silent"]
        if lm["silent"]:
            row["notes"].append(f"{lm['silent']} open connections got no tick in the window")
        await prod.quit()
        confl1 = await spec.conflations(port)
        if confl0 is not None and confl1 is not None:
            row["conflations"] = confl1 - confl0
        row["producer_asked"] = prod_rate
        row["producer_done"] = b["prod"]["ticks"] / b["prod"]["elapsed"]
        if published := b["prod"].get("published_hist"):
            # The producer's part (ts -> published), the rest is the fan-out's (pubwatch.py).
            row["published"] = pubwatch.summary(published)
            row["notes"].append(
                "tick ts -> published on Redis (the producer's part of the latency): "
                "p50 {p50_ms} / p99 {p99_ms} ms".format(**row["published"])
            )
        util = procs.core_util(a["cores"], b["cores"])
        row["server_core_pct"] = util.get(procs.SERVER_CORE)  # includes softirq work
        row["load_core_pct"] = util.get(LOAD_CORE)
        row["loadgen_cpu_pct"] = 100 * lm["cpu"] / window
        row["load_cpu_pct"] = 100 * (b["load_cpu"] - a["load_cpu"]) / (b["t"] - a["t"])
        if row["load_cpu_pct"] > 85 or row["loadgen_cpu_pct"] > 75:
            row["notes"].append(
                f"load generator + publisher + redis at {row['load_cpu_pct']:.0f}%"
                " of their core: the load side may be the bottleneck"
            )
        span = b["t"] - a["t"]
        tasks = b["sys"][0] - a["sys"][0]
        other = tasks - cpu - (b["load_cpu"] - a["load_cpu"])
        row["other_cpu_pct"] = max(0.0, 100 * other / span)
        row["softirq_pct"] = 100 * (b["sys"][1] - a["sys"][1]) / span
        row["steal_pct"] = 100 * (b["sys"][2] - a["sys"][2]) / span
        if why := disturbance(row):
            row["notes"].append(
                f"numbers are disturbed: {why} of a core during the window (steal: what the "
                "host took from this VM)"
            )
        if lm["resubscribes"] or a["lg"]["resubscribes"]:
            row["notes"].append(
                f"resubscribed after an 'unavailable' error: "
                f"{lm['resubscribes'] + a['lg']['resubscribes']} times"
            )
        return prod

    async def _ladder(
        self,
        row: dict[str, Any],
        spec: Server,
        scen: Scenario,
        server: subprocess.Popen[bytes],
        lg: Ctl,
        redis_url: str,
        workdir: Path,
    ) -> Ctl | FeedWatch:
        """The scale scenario: the asked rate climbs in steps (`--scale-from`, x`--scale-step`,
        up to the scenario's rate) until a step is not carried in full; the row is the last
        step that was. "In full": >= 97 % of the asked rate delivered, at most 1 % of it
        skipped, no connection lost, p99 latency within `--scale-p99-ms` (S2's target). That
        is capacity at the service level we promise, the same measure for one worker and for
        two, whatever batching and conflation do past it."""
        opts = self.opts
        await self._connect(row, lg, scen.clients)
        used, ticks_for = self._publishing(scen)
        asked = opts.scale_from
        prod = self._publisher(spec, redis_url, used, ticks_for(asked), workdir)
        steps: list[str] = []
        best: dict[str, Any] | None = None
        while asked <= scen.rate:
            await prod.cmd(f"rate {ticks_for(asked)}", 10)
            await asyncio.sleep(opts.warmup)
            await lg.cmd("mark", 30)
            await prod.cmd("mark", 10)
            cpu0, t0 = procs.tree_cpu_seconds(server.pid), time.monotonic()
            await asyncio.sleep(opts.scale_window)
            m = await lg.cmd("mark", 30)
            pm = await prod.cmd("mark", 10)
            cpu, span = procs.tree_cpu_seconds(server.pid) - cpu0, time.monotonic() - t0
            delivered = m["ticks"] / m["elapsed"]
            hist = {int(key): v for key, v in m["hist"].items()}
            step = {
                "asked_rate": asked,
                "delivered_rate": delivered,
                "srv_cpu_pct": 100 * cpu / span,
                "cpu_us_per_msg": cpu * 1e6 / m["ticks"] if m["ticks"] else None,
                "p50_ms": report.percentile(hist, 0.50),
                "p99_ms": report.percentile(hist, 0.99),
                "max_ms": m["lat_max"] if m["ticks"] else None,
                "gaps": m["gaps"],
                "missed": m["missed"],
                "dups": m["dups"],
                "drops": sum(m["closed"].values()),
                "silent": m["silent"],
                "producer_asked": ticks_for(asked),
                "producer_done": pm["ticks"] / pm["elapsed"],
                "loadgen_cpu_pct": 100 * m["cpu"] / m["elapsed"],
            }
            p99 = step["p99_ms"]
            carried = (
                delivered >= 0.97 * asked
                and m["missed"] <= 0.01 * asked * m["elapsed"]
                and not m["closed"]
                and p99 is not None
                and p99 <= opts.scale_p99_ms
            )
            steps.append(
                f"{asked:,.0f} asked: {delivered:,.0f} delivered, {m['missed']:,} skipped, "
                f"p99 {step['p99_ms']} ms{'' if carried else ' (not carried: stop)'}"
            )
            if not carried:
                break
            best = step
            asked *= opts.scale_step
        row["ladder"] = steps
        row["notes"].append("ladder: " + "; ".join(steps))
        if best is None:
            row["notes"].append("not even the first step was carried in full")
            best = {"asked_rate": opts.scale_from, "delivered_rate": 0.0}
        row.update(best)
        row["rss_mb"] = procs.tree_rss_bytes(server.pid) / 2**20
        return prod


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--servers",
        default=None,
        help=f"comma list or 'all'; known: {', '.join(SERVERS)}; default "
        f"{','.join(DEFAULT_SERVERS)} ({','.join(QUICK_SERVERS)} with --quick)",
    )
    ap.add_argument(
        "--scenarios",
        default="s1,s2,idle,scale",
        help="comma list of s1, s2, idle, scale (scale: only the pricefeed-1q/-w2q pair, "
        "which run nothing else)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="short windows (about 2 minutes for the default servers)",
    )
    ap.add_argument(
        "--publish",
        default="burst",
        help="how the publisher sends ticks in S1 and S2, a comma list run side by side: "
        "burst (what is due every 5 ms in one write) and/or even (one tick per write, each "
        "at its own time slot: scenarios S1-even, S2-even); default burst",
    )
    ap.add_argument("--warmup", type=float, help="seconds of load before the window")
    ap.add_argument("--duration", type=float, help="measuring window, seconds (S1 and S2)")
    ap.add_argument("--s1-clients", type=int, default=1000)
    ap.add_argument("--s1-rate", type=float, default=20_000, help="delivered msg/s asked")
    ap.add_argument("--s2-clients", type=int, default=5000)
    ap.add_argument("--s2-rate", type=float, default=100_000, help="delivered msg/s asked")
    ap.add_argument("--scale-clients", type=int, default=2000)
    ap.add_argument(
        "--scale-from", type=float, default=10_000, help="scale: first step, msg/s asked"
    )
    ap.add_argument("--scale-step", type=float, default=1.1, help="scale: each step x this")
    ap.add_argument(
        "--scale-p99-ms", type=float, default=100.0, help="scale: a step's p99 must be within"
    )
    ap.add_argument(
        "--scale-window", type=float, default=4.0, help="scale: seconds measured per step"
    )
    ap.add_argument("--scale-rate", type=float, default=200_000, help="scale: last step")
    ap.add_argument("--idle-conns", type=int, default=2000)
    ap.add_argument("--idle-settle", type=float, help="seconds after connecting before RSS")
    ap.add_argument(
        "--symbols",
        type=int,
        default=10,
        help="how many symbols: the 10 seeded ones first, then X10-USD… added to pricefeed's "
        "database (at most 64, the load generator's limit)",
    )
    ap.add_argument("--symbols-per-client", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=100, help="handshakes in flight")
    ap.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run every process the bench starts (servers, Redis, load generator, publisher) "
        "at this nice value; below 0 (root only) other work on a shared machine disturbs "
        "the windows less, every row alike (default 0)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        help="before each scenario, wait up to this many seconds for other processes "
        "to go quiet (default 20, quick 1)",
    )
    ap.add_argument(
        "--retakes",
        type=int,
        default=1,
        help="measure a scenario again, up to this many times, when the host stole more than "
        f"{DISTURBED_STEAL_PCT:g}%% of a core or other processes used more than "
        f"{DISTURBED_OTHER_PCT:g}%% during its window; the least disturbed take is kept and "
        "the others are named in the notes (default 1)",
    )
    ap.add_argument("--keep-logs", action="store_true", help="keep each scenario's temp dir")
    ap.add_argument(
        "--loadgen",
        choices=["c", "py"],
        default=None,
        help="load generator: c (bench/loadgen.c, compiled into bench/.build/ when the source "
        "is newer) or py (bench/loadgen.py); default c when gcc or cc is on PATH, else py",
    )
    opts = ap.parse_args(argv)
    quick = opts.quick
    opts.warmup = opts.warmup if opts.warmup is not None else (1.5 if quick else 3.0)
    opts.idle_settle = opts.idle_settle if opts.idle_settle is not None else (1.5 if quick else 3.0)
    if opts.duration is None:
        opts.s1_duration, opts.s2_duration = (4.0, 4.0) if quick else (15.0, 20.0)
    else:
        opts.s1_duration = opts.s2_duration = opts.duration
    if opts.servers is None:
        opts.servers = ",".join(QUICK_SERVERS if quick else DEFAULT_SERVERS)
    if opts.quiet_wait is None:
        opts.quiet_wait = 1.0 if quick else 20.0
    if not 1 <= opts.symbols <= 64:
        ap.error("--symbols must be between 1 and 64 (the load generator tracks 64)")
    if quick and opts.idle_conns == 2000:
        opts.idle_conns = 1000
    return opts


async def _take(
    bench: Bench, spec: Server, scen: Scenario, opts: argparse.Namespace
) -> dict[str, Any]:
    busy = await procs.wait_quiet(opts.quiet_wait)
    t_row = time.monotonic()
    row = await bench.run_scenario(spec, scen)
    row["wall_s"] = round(time.monotonic() - t_row, 1)
    if busy >= 0.15:
        row["notes"].append(
            f"started while other processes used {100 * busy:.0f}% of a core "
            f"(waited {opts.quiet_wait:g} s for quiet)"
        )
    return row


async def amain(opts: argparse.Namespace) -> int:
    names = list(SERVERS) if opts.servers == "all" else [s for s in opts.servers.split(",") if s]
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        print(f"unknown servers: {unknown}; known: {list(SERVERS)}", file=sys.stderr)
        return 2
    scen_all = {
        "s1": Scenario("S1", opts.s1_clients, opts.s1_rate, opts.s1_duration),
        "s2": Scenario("S2", opts.s2_clients, opts.s2_rate, opts.s2_duration),
        "idle": Scenario("idle", opts.idle_conns, None, 0),
        "scale": Scenario("scale", opts.scale_clients, opts.scale_rate, opts.scale_window),
    }
    publish = [p.strip() for p in opts.publish.split(",") if p.strip()]
    if not publish or any(p not in ("burst", "even") for p in publish):
        print(f"--publish takes burst and/or even, not {opts.publish!r}", file=sys.stderr)
        return 2
    scens = []
    for name in (s.strip().lower() for s in opts.scenarios.split(",") if s.strip()):
        scen = scen_all[name]
        if name not in ("s1", "s2"):
            scens.append(scen)
            continue
        for mode in publish:  # side by side: each server runs each mode in turn
            suffix = "" if mode == "burst" else f"-{mode}"
            scens.append(replace(scen, name=scen.name + suffix, publish=mode))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    try:
        lg_note = resolve_loadgen(opts)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"--loadgen c: {exc}", file=sys.stderr)
        return 2
    if lg_note:
        print(f"note: {lg_note}", flush=True)
    # Before the machine's versions are read: a first run installs the Node peer's packages.
    specs: list[Server] = []
    skipped: list[str] = [lg_note] if lg_note else []
    for name in names:
        spec = SERVERS[name]
        why = spec.unavailable()
        if why is None and spec.producer == "node":
            why = ensure_node_modules(RESULTS / f"npm-install-{stamp}.log")
        if why:
            skipped.append(f"{name}: skipped ({why})")
            print(f"skip {name}: {why}", flush=True)
        else:
            specs.append(spec)
    info = report.machine_info()
    info["load generator"] = loadgen_about(opts.loadgen)
    for name in names:
        source = SERVERS[name].c_source
        if source is not None and c_compiler() is not None:
            info[name] = f"bench/{source}, {c_build_about()}"
    print("## Machine\n")
    for key, val in info.items():
        print(f"- {key}: {val}")
    pin = (
        "server on core 0, load generator + publisher + redis on core 1"
        if procs.PIN
        else "NOT pinned"
    )
    print(f"- pinning: {pin}")
    if procs.NICE:
        print(f"- priority: every process the bench starts at nice {procs.NICE}")
    print(f"- fd limit: {procs.raise_fd_limit()}\n", flush=True)

    bench = Bench(opts)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for spec in specs:
        for scen in scens:
            if (spec.worker_cores is None) == (scen.name == "scale"):
                continue  # the scale scenario is the capped pair's, and only theirs
            if spec.producer == "own" and scen.publish != "burst":
                continue  # its own feed publishes as it does (the simulated source's slots)
            print(
                f"… {spec.name} {scen.name} ({scen.clients:,} clients"
                + (f", {scen.rate:,.0f} msg/s" if scen.rate else ", idle")
                + ")",
                flush=True,
            )
            row = await _take(bench, spec, scen, opts)
            for retake in range(opts.retakes):
                if disturbance(row) is None:
                    break
                print(f"  disturbed ({disturbance(row)}): measuring again", flush=True)
                row = least_disturbed(row, await _take(bench, spec, scen, opts), retake + 2)
            rows.append(row)
            print("  " + " | ".join(report.row_cells(row)), flush=True)
    elapsed = time.monotonic() - t0

    settings = (
        f"S1 {opts.s1_clients:,} clients / {opts.s1_rate:,.0f} msg/s, "
        f"S2 {opts.s2_clients:,} / {opts.s2_rate:,.0f}, windows {opts.s1_duration:g}/"
        f"{opts.s2_duration:g} s after {opts.warmup:g} s warm-up, idle "
        f"{opts.idle_conns:,} conns, {len(bench.symbols)} symbols, "
        f"{opts.symbols_per_client} per client, publisher {opts.publish}"
        f"{' (quick)' if opts.quick else ''}"
    )
    md = [f"# pricefeed benchmark {stamp}", "", "## Machine", ""]
    md += [f"- {k}: {v}" for k, v in info.items()] + [f"- pinning: {pin}", ""]
    md += ["## Results", "", settings, "", report.table(rows), ""]
    scaling = report.worker_scaling(rows)
    if scaling:
        skipped.append(scaling)
        print(scaling, flush=True)
    extra = report.notes(rows)
    if extra or skipped:
        md += ["## Notes", ""] + [f"- {s}" for s in skipped] + ([extra] if extra else []) + [""]
    md.append(f"total {elapsed:.0f} s")
    text = "\n".join(md)
    print("\n" + "\n".join(md[md.index("## Results") :]))
    (RESULTS / f"bench-{stamp}.md").write_text(text + "\n")
    raw = {
        "stamp": stamp,
        "machine": info,
        "options": vars(opts),
        "skipped": skipped,
        "elapsed_s": elapsed,
        "rows": rows,
    }
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"\nwrote {RESULTS / f'bench-{stamp}.md'} and .json")
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    procs.PIN = procs.PIN and not opts.no_pin
    procs.NICE = opts.nice
    if opts.nice:
        os.nice(opts.nice)  # the runner too: its marks and bench/pubwatch.py
    procs.raise_fd_limit()
    return procs.run_main(amain(opts), "bench")


if __name__ == "__main__":
    sys.exit(main())
