"""Operator endpoints: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import metrics
from app.db import ping_database
from app.deps import AppState, StateDep
from app.errors import ErrorOutDoc, Unauthenticated
from app.feed.leader import read_leader
from app.history.status import HistoryState

logger = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])

_CHECK_TIMEOUT_SECONDS = 2.0


@router.get("/healthz")
async def read_liveness() -> dict[str, str]:
    """Alive: the process answers. Restart it if this fails."""
    return {"status": "ok"}


async def _check(probe: Awaitable[object]) -> str:
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_SECONDS):
            await probe
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return f"down: {type(exc).__name__}"
    return "ok"


async def _producer_role(state: AppState) -> str:
    """Whether this instance's producer (in this process or its own) holds the lease."""
    if state.producer is not None:
        return "leader" if state.producer.is_leader else "standby"
    if state.redis is None:
        return "off"
    try:
        async with asyncio.timeout(1.0):
            holder = await read_leader(state.redis, state.store)
    except Exception:  # noqa: BLE001 - the store check reports Redis being down
        return "unknown"
    return "leader" if holder is not None and holder.startswith(f"{state.instance}:") else "standby"


async def _read_history(state: AppState) -> HistoryState | None:
    """The writer's last report, also handed to /metrics; None if there is none to read."""
    if state.history_report is None:
        return None
    try:
        async with asyncio.timeout(1.0):
            report = await state.history_report.read()
    except Exception as exc:  # noqa: BLE001 - the store check in /readyz reports Redis down
        logger.debug("history state unavailable (%s)", exc)
        return None
    if report is not None:
        metrics.HISTORY.lag_seconds, metrics.HISTORY.dropped = report.lag_seconds, report.dropped
    return report


async def _history_health(state: AppState) -> str:
    """`ok`; `degraded` (writes failing or behind, or a writer that stopped reporting, or a
    leader that does not report); or `off`: nothing writes history (HISTORY_DAYS=0, or no
    producer in this instance's cluster, so nothing is published either)."""
    if state.history_report is None:
        return "off"
    report = await _read_history(state)
    if report is not None:
        return report.health()
    return "degraded" if await _a_producer_leads(state) else "off"


async def _a_producer_leads(state: AppState) -> bool:
    """Whether a producer that could report history leads: this process's, or with Redis any
    instance's (a writer that reported once leaves its state behind, read above)."""
    if state.producer is not None:
        return True
    if state.redis is None:  # memory://: a producer elsewhere could not reach this instance
        return False
    try:
        async with asyncio.timeout(1.0):
            holder = await read_leader(state.redis, state.store)
    except Exception:  # noqa: BLE001 - the store check reports Redis being down
        return True  # unknown: as before, a writer not heard from is degraded
    return holder is not None


@router.get("/readyz", responses={503: {"description": "A dependency is down"}})
async def read_readiness(state: StateDep) -> JSONResponse:
    """Ready: database, price store and broker reachable, background tasks healthy."""
    database, store = await asyncio.gather(
        _check(ping_database(state.engine)), _check(state.store.ping())
    )
    checks: dict[str, str] = {
        "database": database,
        "store": store,
        "broker": "ok" if state.broker.connected else "down: not connected",
    }
    for task, reason in state.supervisor.unhealthy().items():
        checks[f"task:{task}"] = f"down: {reason}"
    checks["producer"] = await _producer_role(state)
    ready = all(not v.startswith("down") for v in checks.values())
    # A quiet feed is not a reason to take the instance out of rotation: it says so instead.
    age = state.hub.last_tick_age()
    fresh = age is not None and age <= state.settings.feed_stale_seconds
    checks["feed"] = "ok" if fresh else "stale"
    # Nor is history that lags (the database slow or down): ticks still flow, and it catches up.
    checks["history"] = await _history_health(state)
    return JSONResponse(
        {
            "status": "ready" if ready else "unavailable",
            "checks": checks,
            "feed": {
                "source": state.settings.feed_source,
                "status": checks["feed"],
                "last_tick_age_seconds": None if age is None else round(age, 3),
            },
        },
        status_code=200 if ready else 503,
    )


@router.get("/metrics", response_class=Response, responses={401: ErrorOutDoc})
async def read_metrics(request: Request, state: StateDep) -> Response:
    """Prometheus metrics (text format). With `METRICS_TOKEN` set, only for
    `Authorization: Bearer <METRICS_TOKEN>`."""
    expected = state.settings.metrics_token
    given = request.headers.get("authorization", "")  # not a parameter: nothing to 422
    if expected and not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        raise Unauthenticated("/metrics needs Authorization: Bearer <METRICS_TOKEN>")
    try:  # the producer's counts, from wherever it runs
        async with asyncio.timeout(1.0):
            metrics.FEED.counts = await state.feed_counts.read()
    except Exception as exc:  # noqa: BLE001 - the store check in /readyz reports Redis down
        logger.debug("feed counts unavailable (%s); /metrics shows the last ones", exc)
    await _read_history(state)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
