"""app/ops.py: liveness, readiness and metrics, as an operator's probes and scraper see them."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app.deps import AppState
from app.main import create_app
from tests.support import RedisServer, make_settings, token

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@asynccontextmanager
async def serve_with_state(app: FastAPI) -> AsyncIterator[tuple[httpx.AsyncClient, AppState]]:
    """Like the `api` fixture, but also hands over the lifespan's state (to break things)."""
    async with app.router.lifespan_context(app) as lifespan_state:
        state: dict[str, Any] = dict(lifespan_state or {})

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client, state["app"]


def scraped(response: httpx.Response, name: str) -> float:
    """The value of the sample `name` in a /metrics answer."""
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} missing")


async def poll(
    client: httpx.AsyncClient,
    path: str,
    until: Callable[[httpx.Response], bool],
    timeout: float = 5.0,
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(path)
        if until(response) or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.02)


class TestLiveness:
    async def test_alive(self, api: ApiFactory) -> None:
        async with api() as client:
            response = await client.get("/healthz")

        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


class TestReadiness:
    async def test_ready_with_checks(self, api: ApiFactory) -> None:
        async with api() as client:
            response = await client.get("/readyz")

        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ready"
        checks = body["checks"]
        assert checks["database"] == "ok"
        assert checks["broker"] == "ok"
        assert checks["store"] == "ok"
        assert not any(str(v).startswith("down") for v in checks.values())

    async def test_producer_role_is_reported(self, api: ApiFactory) -> None:
        async with api() as client:
            response = await poll(
                client, "/readyz", lambda r: r.json()["checks"].get("producer") == "leader"
            )

        assert response.json()["checks"]["producer"] == "leader"

    async def test_503_while_the_database_is_unreachable(
        self, tmp_path: Path, database_url: str
    ) -> None:
        # The database lives in a directory of its own, so it can be made to vanish.
        source = Path(database_url.removeprefix("sqlite+aiosqlite:///"))
        directory = tmp_path / "dbdir"
        directory.mkdir()
        shutil.copy(source, directory / "pricefeed.db")
        app = create_app(make_settings(f"sqlite+aiosqlite:///{directory / 'pricefeed.db'}"))

        async with serve_with_state(app) as (client, state):
            assert (await client.get("/readyz")).status_code == 200
            kept = tmp_path / "kept.db"
            shutil.move(directory / "pricefeed.db", kept)
            directory.rmdir()
            # A database server going away takes its open connections with it.
            await state.engine.dispose()

            down = await client.get("/readyz")

            assert down.status_code == 503
            assert down.json()["status"] != "ready"
            assert down.json()["checks"]["database"].startswith("down")
            assert down.json()["checks"]["broker"] == "ok"
            # Liveness does not depend on the database: do not restart a process for it.
            assert (await client.get("/healthz")).status_code == 200

            directory.mkdir()
            shutil.move(kept, directory / "pricefeed.db")
            back = await poll(client, "/readyz", lambda r: r.status_code == 200)

            assert back.status_code == 200
            assert back.json()["checks"]["database"] == "ok"


METRICS = {
    "pricefeed_connections": "gauge",
    "pricefeed_ticks_published": "counter",  # exposed as pricefeed_ticks_published_total
    "pricefeed_messages_sent": "counter",  # exposed as pricefeed_messages_sent_total
    "pricefeed_subscriptions": "gauge",
}


class TestMetrics:
    async def test_prometheus_text(self, api: ApiFactory) -> None:
        async with api() as client:
            response = await client.get("/metrics")

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
        for name, kind in METRICS.items():
            assert families.get(name) == kind, name
        for line in (
            "# TYPE pricefeed_connections gauge",
            "# TYPE pricefeed_subscriptions gauge",
            "pricefeed_ticks_published_total ",
            "pricefeed_messages_sent_total ",
        ):
            assert line in response.text

    async def test_ticks_published_counts_up(self, api: ApiFactory) -> None:
        def published(response: httpx.Response) -> float:
            return scraped(response, "pricefeed_ticks_published_total")

        async with api() as client:
            before = published(await client.get("/metrics"))
            after = await poll(client, "/metrics", lambda r: published(r) >= before + 10)

        assert published(after) >= before + 10

    async def test_the_broker_gauge_agrees_with_readiness_on_a_memory_broker(
        self, api: ApiFactory
    ) -> None:
        def broker_connected(response: httpx.Response) -> float:
            return scraped(response, "pricefeed_broker_connected")

        async with api() as client:  # BROADCAST_URL=memory://
            assert (await client.get("/readyz")).json()["checks"]["broker"] == "ok"
            assert broker_connected(await client.get("/metrics")) == 1.0

        # and it was the broker that said so: shut down, it says 0
        assert REGISTRY.get_sample_value("pricefeed_broker_connected") == 0.0

    async def test_needs_no_token_and_leaks_none(self, api: ApiFactory) -> None:
        secret = token()
        async with api() as client:
            await client.get("/v1/symbols", headers={"Authorization": f"Bearer {secret}"})
            response = await client.get("/metrics")

        assert response.status_code == 200
        assert secret not in response.text


class TestProbesIgnoreAuth:
    @pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
    async def test_a_bad_token_does_not_fail_a_probe(self, api: ApiFactory, path: str) -> None:
        async with api() as client:
            response = await client.get(path, headers={"Authorization": "Bearer garbage"})

        assert response.status_code == 200


def history_check(response: httpx.Response) -> str:
    check: str = response.json()["checks"]["history"]
    return check


class TestHistoryHealth:
    """`checks.history` says whether history is being written: `ok`, `degraded`, or `off`
    where nothing writes it, never `degraded` for a writer that does not exist."""

    async def test_ok_once_the_producers_writer_reports(self, api: ApiFactory) -> None:
        async with api() as client:
            response = await poll(client, "/readyz", lambda r: history_check(r) == "ok")

        assert history_check(response) == "ok"

    async def test_off_when_no_history_is_kept(self, api: ApiFactory) -> None:
        async with api(history_days=0) as client:
            response = await client.get("/readyz")

        assert history_check(response) == "off"

    async def test_off_without_a_producer_on_memory(self, api: ApiFactory) -> None:
        # memory:// is one process: with PRODUCER=off nothing publishes, nothing writes.
        async with api(producer="off") as client:
            response = await client.get("/readyz")

        assert response.status_code == 200
        assert response.json()["status"] == "ready"
        assert response.json()["checks"]["producer"] == "off"
        assert history_check(response) == "off"

    @pytest.mark.redis
    async def test_with_redis_off_until_a_producer_leads_then_its_report(
        self, api: ApiFactory, redis: RedisServer
    ) -> None:
        async with api(broadcast_url=redis.url, producer="off") as web:
            assert history_check(await web.get("/readyz")) == "off"
            async with api(broadcast_url=redis.url) as _leader:
                response = await poll(web, "/readyz", lambda r: history_check(r) == "ok")

        assert history_check(response) == "ok"

    @pytest.mark.redis
    async def test_with_redis_a_leader_that_writes_no_history_is_degraded(
        self, api: ApiFactory, redis: RedisServer
    ) -> None:
        """Its instance keeps none (HISTORY_DAYS=0) while this one expects it: a cluster
        configured at odds, which /readyz should show."""
        async with (
            api(broadcast_url=redis.url, producer="off") as web,
            api(broadcast_url=redis.url, history_days=0) as leader,
        ):
            await poll(leader, "/readyz", lambda r: r.json()["checks"]["producer"] == "leader")
            response = await web.get("/readyz")

        assert history_check(response) == "degraded"


class TestFeedHealth:
    async def test_a_ticking_feed_is_ok(self, api: ApiFactory) -> None:
        async with api() as client:
            response = await poll(
                client, "/readyz", lambda r: r.json()["checks"].get("feed") == "ok"
            )
            metrics = await client.get("/metrics")

        body = response.json()
        assert body["checks"]["feed"] == "ok"
        assert body["feed"]["source"] == "simulated"
        assert 0 <= body["feed"]["last_tick_age_seconds"] < 10
        assert 0 <= scraped(metrics, "pricefeed_feed_last_tick_age_seconds") < 10

    async def test_a_silent_feed_is_stale_but_still_ready(self, api: ApiFactory) -> None:
        # Nothing is pushed in, so no tick ever comes: say so, but keep serving snapshots.
        async with api(feed_source="ingest") as client:
            response = await client.get("/readyz")
            metrics = await client.get("/metrics")

        assert response.status_code == 200
        assert response.json()["status"] == "ready"
        assert response.json()["checks"]["feed"] == "stale"
        assert response.json()["feed"] == {
            "source": "ingest",
            "status": "stale",
            "last_tick_age_seconds": None,
        }
        age = scraped(metrics, "pricefeed_feed_last_tick_age_seconds")
        assert age != age  # NaN: no tick yet

    async def test_the_producers_counts_reach_metrics(self, build_app: Any) -> None:
        async with serve_with_state(build_app()) as (client, state):
            await state.feed_counts.add(
                {"rejected|replay|bad_price": 3, "gaps|coinbase": 2, "junk": 1}
            )
            metrics = await client.get("/metrics")

        families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
        rejected = [s for s in families["pricefeed_feed_rejected"].samples]
        assert [(s.labels, s.value) for s in rejected if s.name.endswith("_total")] == [
            ({"source": "replay", "reason": "bad_price"}, 3.0)
        ]
        gaps = [s for s in families["pricefeed_feed_upstream_gaps"].samples]
        assert [(s.labels, s.value) for s in gaps if s.name.endswith("_total")] == [
            ({"source": "coinbase"}, 2.0)
        ]
