"""Machine info, percentiles and the results table."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def _cmd_version(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]):
        return "-"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0] if out else "?"


def machine_info() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    import os

    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem_kb = int(line.split()[1])
    node_ver = _cmd_version(["node", "--version"])
    sio_node = "-"
    pkg = Path(__file__).parent / "peers/node/node_modules/socket.io/package.json"
    if pkg.exists():
        import json

        sio_node = json.loads(pkg.read_text()).get("version", "?")
    repo = Path(__file__).resolve().parent.parent
    commit = _cmd_version(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_version(["git", "-C", str(repo), "status", "--porcelain", "--", "app"])
    if dirty not in ("?", "-", ""):
        commit += " + uncommitted changes in app/"
    return {
        "pricefeed": commit,
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "uvicorn": _version("uvicorn"),
        "uvloop": _version("uvloop"),
        "websockets": _version("websockets"),
        "fastapi": _version("fastapi"),
        "starlette": _version("starlette"),
        "broadcaster": _version("broadcaster"),
        "redis-py": _version("redis"),
        "python-socketio": _version("python-socketio"),
        "node": node_ver,
        "socket.io (node)": sio_node,
        "redis-server": _cmd_version(["redis-server", "--version"]).split(" sha=")[0],
    }


def percentile(hist: dict[int, int], q: float) -> float | None:
    """q-quantile (0..1) in ms of a load generator histogram: the bucket's upper edge."""
    from bench.loadgen import bucket_upper_ms

    total = sum(hist.values())
    if not total:
        return None
    want = q * total
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= want:
            return bucket_upper_ms(b)
    return bucket_upper_ms(max(hist))


def merge_hist(a: dict[Any, int], b: dict[Any, int]) -> dict[int, int]:
    out: dict[int, int] = {int(k): v for k, v in a.items()}
    for k, v in b.items():
        out[int(k)] = out.get(int(k), 0) + v
    return out


def _n(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


COLUMNS = [
    ("server", "server"),
    ("scen", "scenario"),
    ("conns ok/asked", "conns"),
    ("conn fail", "conn_failed"),
    ("conn/s", "conn_rate"),
    ("drops", "drops"),
    ("silent", "silent"),
    ("asked msg/s", "asked_rate"),
    ("delivered msg/s", "delivered_rate"),
    ("srv CPU %", "srv_cpu_pct"),
    ("CPU µs/msg", "cpu_us_per_msg"),
    ("p50 ms", "p50_ms"),
    ("p99 ms", "p99_ms"),
    ("max ms", "max_ms"),
    ("gaps (missed)", "gaps"),
    ("confl.", "conflations"),
    ("dups", "dups"),
    ("ticks/s done/asked", "producer"),
    ("load CPU %", "load_cpu_pct"),
    ("other CPU %", "other_cpu_pct"),
    ("steal %", "steal_pct"),
    ("srv RSS MB", "rss_mb"),
    ("KB/idle conn", "kb_per_conn"),
]


def row_cells(r: dict[str, Any]) -> list[str]:
    if r.get("error"):
        return [r["server"], r["scenario"], "ERROR: " + r["error"][:120]] + [""] * (
            len(COLUMNS) - 3
        )
    cells = {
        "server": r["server"],
        "scenario": r["scenario"],
        "conns": f"{r.get('conns_ok', 0):,}/{r.get('conns_asked', 0):,}",
        "conn_failed": _n(r.get("conn_failed")),
        "conn_rate": _n(r["conns_ok"] / r["connect_s"] if r.get("connect_s") else None),
        "drops": _n(r.get("drops")),
        "silent": _n(r.get("silent")),
        "asked_rate": _n(r.get("asked_rate")),
        "delivered_rate": _n(r.get("delivered_rate")),
        "srv_cpu_pct": _n(r.get("srv_cpu_pct")),
        "cpu_us_per_msg": _n(r.get("cpu_us_per_msg"), "{:.1f}"),
        "p50_ms": _n(r.get("p50_ms"), "{:.1f}"),
        "p99_ms": _n(r.get("p99_ms"), "{:.1f}"),
        "max_ms": _n(r.get("max_ms"), "{:,.0f}"),
        "gaps": "-" if r.get("gaps") is None else f"{r['gaps']:,} ({r['missed']:,})",
        "conflations": _n(r.get("conflations")),
        "dups": _n(r.get("dups")),
        "producer": "-"
        if r.get("producer_asked") is None
        else f"{r['producer_done']:,.0f}/{r['producer_asked']:,.0f}",
        "load_cpu_pct": _n(r.get("load_cpu_pct")),
        "other_cpu_pct": _n(r.get("other_cpu_pct")),
        "steal_pct": _n(r.get("steal_pct")),
        "rss_mb": _n(r.get("rss_mb"), "{:,.1f}"),
        "kb_per_conn": _n(r.get("kb_per_conn"), "{:.1f}"),
    }
    return [cells[key] for _, key in COLUMNS]


def table(rows: list[dict[str, Any]]) -> str:
    head = [h for h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(row_cells(r)) + " |")
    return "\n".join(lines)


def notes(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        for n in r.get("notes", []):
            out.append(f"- {r['server']} {r['scenario']}: {n}")
    return "\n".join(out)


def worker_scaling(rows: list[dict[str, Any]]) -> str | None:
    """`WORKERS=2` over `WORKERS=1`, each worker given the same CPU (the scale scenario)."""
    rates = {
        r["server"]: r.get("delivered_rate")
        for r in rows
        if r["scenario"] == "scale" and not r.get("error")
    }
    one, two = rates.get("pricefeed-1q"), rates.get("pricefeed-w2q")
    if not one or not two:
        return None
    return (
        "worker scaling (scale scenario: each worker capped at the same share of a core, "
        f"capacity carried in full): WORKERS=2 {two:,.0f} msg/s, WORKERS=1 {one:,.0f}: "
        f"{two / one:.2f}x"
    )
