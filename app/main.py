"""The application: `create_app()` and its lifespan, the one place that wires things together.

Run it with `python -m app` (uvicorn with the settings applied, clean 1001 on shutdown) or any
ASGI server as `app.main:app`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import Message, Receive, Scope, Send

from app import metrics
from app.auth.revocations import Revocations
from app.auth.routes import router as auth_router
from app.auth.service import disable_client, upsert_client
from app.auth.throttle import TokenThrottle
from app.broker import Broker
from app.config import DEV_DEMO_CLIENT_SECRET, Settings, get_settings
from app.db import create_engine, create_session_factory
from app.deps import AppState
from app.docs import install_docs
from app.errors import CloseCode, close_code_table, install_error_handlers
from app.feed.checkpoints import SeqCheckpoints
from app.feed.inbox import Inbox, create_inbox
from app.feed.leader import create_lease, instance_name
from app.feed.preflight import cannot_start, check_source
from app.feed.producer import Producer, create_producer
from app.feed.routes import router as feed_router
from app.feed.sources import SourceNotReady
from app.feed.stats import create_feed_counts
from app.feed.witness import HubWitness
from app.history.records import HistoryRecords
from app.history.service import History
from app.history.status import create_history_report
from app.history.writer import HistoryWriter, create_history_writer
from app.instruments.catalog import Catalog, CatalogChange
from app.instruments.repository import load_instruments
from app.instruments.watcher import CatalogWatcher
from app.logs import install_client_error_filter, install_redaction
from app.ops import router as ops_router
from app.prices.asyncapi import build_asyncapi
from app.prices.board import router as board_router
from app.prices.hub import FanoutHub
from app.prices.leases import StreamLeases
from app.prices.replays import ReplayBudget
from app.prices.routes import router as prices_router
from app.prices.sse import router as sse_router
from app.prices.store import create_tick_store
from app.prices.streams import StreamRegistry
from app.prices.ws import serve_websocket
from app.ratelimit import RateLimiter, create_buckets
from app.redis_client import create_redis
from app.security import TokenSigner, TokenVerifier, load_public_keys
from app.server import guard
from app.shutdown import close_streams_on_exit_signal
from app.supervisor import Supervisor

logger = logging.getLogger("app")

PROTOCOL_DOC = (
    (Path(__file__).parent / "prices" / "protocol.md")
    .read_text(encoding="utf-8")
    .replace("{close_codes}", close_code_table())
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, AppState]]:
    settings: Settings = app.state.settings
    streams: StreamRegistry = app.state.streams
    instance = instance_name(settings)
    if settings.producer == "on":
        try:  # before anything is built: nothing to tear down
            check_source(settings)
        except SourceNotReady as error:
            logger.error("%s", cannot_start(error))
            raise

    signer = TokenSigner(
        secret=settings.jwt_secret,
        audience=settings.jwt_audience,
        ttl_seconds=settings.jwt_ttl_seconds,
        leeway_seconds=settings.jwt_leeway_seconds,
    )
    verifier = TokenVerifier(
        signer=signer,
        public_keys=tuple(
            load_public_keys(
                pem_file=settings.jwt_public_key_file, jwks_file=settings.jwt_jwks_file
            )
        ),
        issuer=settings.jwt_issuer,
    )
    engine = create_engine(settings.database_url, timeout=settings.database_timeout_seconds)
    sessions = create_session_factory(engine)
    revocations = Revocations(
        sessions,
        poll_seconds=settings.revocation_poll_seconds,
        on_revoked=partial(streams.close_where, code=CloseCode.BAD_TOKEN, reason="token revoked"),
    )
    try:
        instruments = await load_instruments(sessions)
        await revocations.refresh()  # no revoked token gets in before the first poll
        async with sessions() as session:
            if settings.env == "dev":
                await upsert_client(
                    session,
                    client_id=settings.demo_client_id,
                    name="Demo client (dev)",
                    secret=settings.demo_client_secret,
                    symbols=["*"],
                )
            elif await disable_client(session, settings.demo_client_id):
                # A dev run on this database seeded it: its public secret opens nothing here.
                logger.warning(
                    "ENV=prod: disabled the demo client %r a dev run left in the database",
                    settings.demo_client_id,
                )
    except (SQLAlchemyError, RuntimeError):
        await engine.dispose()
        raise

    redis = create_redis(settings.broadcast_url) if settings.uses_redis else None
    store = create_tick_store(settings, redis)
    history = History(store=store, sessions=sessions, retention=settings.retention_ticks)
    lease = create_lease(settings, redis, store, instance=instance)

    broker = Broker(settings.broadcast_url)
    await broker.connect()
    hub = FanoutHub(
        broker=broker,
        store=store,
        history=history,
        retention=settings.retention_ticks,
        max_lag_ms=settings.fanout_max_lag_ms,
        direct_writes=settings.fanout_direct_writes,
        max_connections=settings.ws_max_connections,
        replays=ReplayBudget(
            per_subscribe=settings.ws_replay_ticks_per_subscribe,
            per_minute=settings.ws_replay_ticks_per_minute,
        ),
    )
    catalog = Catalog(instruments)
    await hub.follow(catalog.symbols)

    async def follow_catalog(change: CatalogChange) -> None:
        """Instruments added: the hub passes their ticks on. Disabled: it stops, and their
        streams end or drop them (app/prices/protocol.md)."""
        await hub.follow(i.symbol for i in change.added)
        gone = [i.symbol for i in change.removed]
        await hub.unfollow(gone)
        await streams.withdraw(gone)

    supervisor = Supervisor()
    supervisor.spawn("fanout", hub.consume)
    supervisor.spawn("revocations", revocations.run)
    supervisor.spawn(
        "instruments",
        CatalogWatcher(
            sessions,
            catalog,
            poll_seconds=settings.instrument_poll_seconds,
            on_change=follow_catalog,
        ).run,
    )
    leases: StreamLeases | None = None
    if redis is not None:  # the per-subject stream limit counts every instance's streams
        leases = StreamLeases(
            redis,
            prefix=settings.redis_key_prefix,
            instance=instance,
            limit=settings.ws_max_connections_per_subject,
            lease_seconds=settings.stream_lease_seconds,
        )
        streams.count_across_instances(leases)
        supervisor.spawn("stream-leases", leases.run)
    feed_counts = create_feed_counts(redis, prefix=settings.redis_key_prefix)
    metrics.FEED.last_tick_age = hub.last_tick_age
    # Pushed quotes: with Redis any instance takes them for the leader, wherever it runs; with
    # memory:// only this process's producer can publish them, so none without it.
    inbox: Inbox | None = None
    if settings.uses_redis or settings.producer == "on":
        inbox = create_inbox(settings, redis)
    history_report = create_history_report(redis, prefix=settings.redis_key_prefix)
    producer: Producer | None = None
    history_writer: HistoryWriter | None = None
    if settings.producer == "on":
        history_writer = create_history_writer(settings, HistoryRecords(engine), history_report)
        producer = create_producer(
            settings,
            instruments=catalog,
            store=store,
            broker=broker,
            lease=lease,
            checkpoints=SeqCheckpoints(sessions) if settings.uses_redis else None,
            counts=feed_counts,
            inbox=inbox,
            history=history_writer,
            witness=HubWitness(hub),
        )
        supervisor.spawn("producer", producer.run)

    buckets = create_buckets(redis, prefix=settings.redis_key_prefix)
    state = AppState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        signer=signer,
        verifier=verifier,
        revocations=revocations,
        catalog=catalog,
        feed_counts=feed_counts,
        history_report=history_report if settings.history_days else None,
        store=store,
        history=history,
        broker=broker,
        hub=hub,
        streams=streams,
        supervisor=supervisor,
        producer=producer,
        inbox=inbox,
        instance=instance,
        redis=redis,
        rest_limit=RateLimiter(
            buckets,
            name="rest",
            what="token subject or client address",
            rate=settings.rest_rate_per_second,
            burst=settings.rest_rate_burst,
        ),
        token_throttle=TokenThrottle(
            buckets,
            per_minute=settings.token_rate_per_minute,
            burst=settings.token_rate_burst,
            max_checks=settings.token_max_concurrent_checks,
            check_wait=settings.token_check_wait_seconds,
        ),
    )
    logger.info(
        "pricefeed ready: %d symbols, broker %s, producer %s, instance %s",
        len(instruments),
        settings.broadcast_url.split("@")[-1],
        settings.producer,
        instance,
    )
    _log_how_to_start(settings)
    _tune_garbage_collector()
    try:
        with close_streams_on_exit_signal(streams):
            yield {"app": state}
    finally:
        # Each step is bounded: an orchestrator kills a process that lingers, so a step that
        # hangs is named in the log and the rest still run.
        closing = streams.close_all(CloseCode.GOING_AWAY, "server going away")
        await _within("closing streams", closing)
        await _within("stopping background tasks", supervisor.stop())
        if history_writer is not None:  # what the producer published last (bounded by itself)
            if producer is not None:
                await _within("seeing the last writes through", producer.settled())
            await _within("writing the last ticks to history", history_writer.flush())
        if leases is not None:
            await _within("releasing stream leases", leases.close())
        await _within("disconnecting the broker", broker.disconnect())
        await _within("closing the tick store", store.close())
        if redis is not None:
            await _within("closing Redis", redis.aclose())
        await _within("closing the database", engine.dispose())


SHUTDOWN_STEP_SECONDS = 3.0


async def _within(step: str, work: Awaitable[object]) -> None:
    try:
        async with asyncio.timeout(SHUTDOWN_STEP_SECONDS):
            await work
    except TimeoutError:
        logger.error(
            "shutdown: %s took over %.0f s; going on without it", step, SHUTDOWN_STEP_SECONDS
        )


def _tune_garbage_collector() -> None:
    """Thousands of long-lived connection objects make every full collection a pause of
    many milliseconds, and the fan-out allocates fast enough to trigger one often. Move what
    startup built out of the collector's sight, and collect young objects less eagerly."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _log_how_to_start(settings: Settings) -> None:
    base = f"http://{settings.host}:{settings.port}"
    logger.info("docs: %s/docs   price board: %s/", base, base)
    if settings.env == "dev":
        # Not as `client_secret=…`: the log filter would hide it. A chosen secret never shows.
        hint = (
            f"the dev default is {DEV_DEMO_CLIENT_SECRET}"
            if settings.demo_client_secret == DEV_DEMO_CLIENT_SECRET
            else "your DEMO_CLIENT_SECRET"
        )
        logger.info(
            "get a token: curl -s -X POST %s/v1/auth/token -d grant_type=client_credentials "
            "-d client_id=%s -d client_secret=$DEMO_CLIENT_SECRET   (%s)",
            base,
            settings.demo_client_id,
            hint,
        )


class PricefeedApp(FastAPI):
    """FastAPI, with WebSocket connections routed straight to their endpoints: they need no
    HTTP middleware (CORS, error pages, body limits), and each layer would stay on the stack of
    every open connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope["app"] = self
            await serve_websocket(scope, receive, send)
            return
        if scope["type"] == "lifespan":
            await self._run_lifespan(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _run_lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A source that cannot start fails startup with the one line the lifespan logged:
        Starlette would hand the server a traceback as the failure's message, for it to log."""
        failures: list[Message] = []

        async def hold_startup_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                failures.append(message)  # sent below, once it is known why
            else:
                await send(message)

        try:
            await super().__call__(scope, receive, hold_startup_failure)
        except SourceNotReady:
            if not failures:  # not in startup: as it came
                raise
            await send({"type": "lifespan.startup.failed", "message": ""})
        except BaseException:
            for message in failures:
                await send(message)
            raise


def create_app(settings: Settings | None = None) -> FastAPI:
    # WS_IMPL=fast needs a uvicorn and websockets it was tested with: otherwise the stock
    # protocol, without direct writes (app/server/guard.py logs why).
    settings = guard.resolve(settings or get_settings()).settings
    install_redaction()
    install_client_error_filter()
    app = PricefeedApp(
        title="pricefeed",
        version="0.1.0",
        description=PROTOCOL_DOC,
        lifespan=lifespan,
        docs_url=None,  # served by install_docs, from assets of our own
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_public else None,  # None: 404
        openapi_tags=[
            {"name": "auth", "description": "Access tokens"},
            {"name": "prices", "description": "REST snapshots"},
            {"name": "streams", "description": "Server-Sent Events (WebSocket: see above)"},
            {"name": "feed", "description": "Pushing prices in (the `publish` scope)"},
            {"name": "operations", "description": "Health, readiness, metrics"},
        ],
    )
    app.state.settings = settings
    app.state.streams = StreamRegistry(
        max_total=settings.ws_max_connections,
        max_per_subject=settings.ws_max_connections_per_subject,
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
    )
    install_error_handlers(app)
    install_docs(app, public=settings.docs_public, stream_spec=partial(build_asyncapi, app.version))
    routers = (auth_router, prices_router, sse_router, feed_router, ops_router, board_router)
    for router in routers:
        app.include_router(router)
    return app


app = create_app()
