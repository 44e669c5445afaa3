"""CPU quotas for the worker-scaling scenario: each server worker in a cgroup of its own,
capped at a fraction of one core (Linux CFS bandwidth control, cgroup v1 or v2).

Why: `WORKERS=2` must deliver >= 1.7x what one worker does, given one core per worker. This
machine has two cores, and one of them runs the load; so the scenario gives every worker the
same slice of the server core instead (half a core each, by default): one worker gets 0.5 of
core 0, two workers get 0.5 each of it. What does not scale with workers (one Redis
subscription per worker, connections spread unevenly between the workers, the master process)
shows up exactly as it would across real cores; what the quota cannot show (two caches
instead of one) would only help the real thing.

Needs write access to the cgroup filesystem (root in the sandbox, or a delegated subtree).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

PERIOD_US = 10_000  # a short period: throttling comes in small steps, not 100 ms stalls

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


def _root() -> tuple[Path, int] | None:
    """Where to make cgroups, and the cgroup version; None if this machine can't."""
    if (_V1 / "cpu.cfs_quota_us").exists() and os.access(_V1, os.W_OK):
        return _V1, 1
    for base in (_V2, _V2 / "unified"):
        controllers = base / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            if os.access(base, os.W_OK):
                return base, 2
    return None


def available() -> str | None:
    """None if quotas work here, else why not."""
    if _root() is None:
        return "no writable cgroup cpu controller (needs root or a delegated cgroup)"
    return None


@contextlib.contextmanager
def capped(pids: list[int], cores: float, tag: str) -> Iterator[list[Path]]:
    """Each of `pids` (with all its threads) in a cgroup of its own, capped at `cores` of one
    core, until the block ends."""
    found = _root()
    if found is None:
        raise RuntimeError(available())
    root, version = found
    made: list[Path] = []
    try:
        for i, pid in enumerate(pids):
            group = root / f"pricefeed-bench-{tag}-{os.getpid()}-{i}"
            group.mkdir()
            made.append(group)
            quota = max(1000, int(cores * PERIOD_US))
            if version == 1:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            (group / "cgroup.procs").write_text(str(pid))
        yield made
    finally:
        for group in made:
            _remove(group, root)


def _remove(group: Path, root: Path) -> None:
    """Move whatever is still in `group` back to the root, then remove it."""
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(pid)
    with contextlib.suppress(OSError):
        group.rmdir()


def throttled_seconds(group: Path) -> float:
    """How long the group's tasks were held back by the quota, in all."""
    with contextlib.suppress(OSError):
        for line in (group / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "throttled_time":  # v1, ns
                return int(value) / 1e9
            if key == "throttled_usec":  # v2
                return int(value) / 1e6
    return 0.0
