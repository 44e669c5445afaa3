"""The benchmark's retake rule: which windows count as disturbed, and which take is kept.

Standard library only, so that the tests that hold this rule run without the benchmark's
extra packages (bench/requirements.txt) installed, as in CI.
"""

from __future__ import annotations

from typing import Any

DISTURBED_STEAL_PCT = 5.0  # % of a core the host took from this VM during a window
DISTURBED_OTHER_PCT = 20.0  # % of a core used by processes outside the benchmark


def disturbance(row: dict[str, Any]) -> str | None:
    """Why a take's window is not the server's alone (None: it is)."""
    steal, other = row.get("steal_pct") or 0.0, row.get("other_cpu_pct") or 0.0
    why = []
    if steal > DISTURBED_STEAL_PCT:
        why.append(f"steal {steal:.0f}%")
    if other > DISTURBED_OTHER_PCT:
        why.append(f"other processes {other:.0f}%")
    return ", ".join(why) or None


def least_disturbed(kept: dict[str, Any], new: dict[str, Any], take: int) -> dict[str, Any]:
    """Keep the take whose window lost less of the machine; the other is named in its notes."""

    def lost(row: dict[str, Any]) -> float:
        return (row.get("steal_pct") or 0.0) + (row.get("other_cpu_pct") or 0.0)

    better, worse = (new, kept) if lost(new) < lost(kept) else (kept, new)
    takes = better.setdefault("takes", [])
    takes += worse.get("takes", [])  # with more than one retake: every take set aside so far
    takes.append(
        {k: worse.get(k) for k in ("cpu_us_per_msg", "delivered_rate", "p99_ms", "steal_pct")}
    )
    better["notes"] += [n for n in worse["notes"] if n.startswith("measured ")]
    summary = ", ".join(
        f"{k} {worse[k]:,.1f}"
        for k in ("cpu_us_per_msg", "delivered_rate", "p99_ms")
        if worse.get(k) is not None
    )
    better["notes"].append(
        f"measured {take} times: a take that lost {lost(worse):.0f}% of a core "
        f"(steal {worse.get('steal_pct') or 0:.0f}%, "
        f"other processes {worse.get('other_cpu_pct') or 0:.0f}%) was set aside ({summary}); "
        f"this row's take lost {lost(better):.0f}%"
    )
    return better
