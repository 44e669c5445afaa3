"""`python -m app.feed`: the producer on its own, in a process of its own.

With Redis, `python -m app` starts one of these beside its uvicorn workers (which then run
`PRODUCER=off`), so a fan-out loop saturated by clients can never delay a tick: the producer
keeps its own core time. It can also run as a separate service. Leadership is the usual lease:
any number may run, one publishes. Instruments added or disabled while it runs are read every
INSTRUMENT_POLL_SECONDS (app/instruments/watcher.py) and quoted from the next round on.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import logging.config
import os
import signal
import sys
from collections.abc import Callable

from app.broker import Broker
from app.config import get_settings
from app.db import create_engine, create_session_factory
from app.feed.checkpoints import SeqCheckpoints
from app.feed.inbox import create_inbox
from app.feed.leader import create_lease, instance_name
from app.feed.preflight import exit_cannot_start, exit_unless_source_ready
from app.feed.producer import create_producer
from app.feed.sources import SourceNotReady
from app.feed.stats import create_feed_counts
from app.feed.witness import PublishedTicks
from app.history.records import HistoryRecords
from app.history.status import create_history_report
from app.history.writer import create_history_writer
from app.instruments.catalog import Catalog
from app.instruments.repository import load_instruments
from app.instruments.watcher import CatalogWatcher
from app.logs import logging_config
from app.prices.store import create_tick_store
from app.redis_client import create_redis

logger = logging.getLogger("app.feed")


def _die_with_parent(parent: int) -> None:
    """A producer started by a server goes when its server goes, even on SIGKILL: on Linux the
    kernel kills it (PR_SET_PDEATHSIG); the lease it held expires within LEADER_LEASE_MS."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before we asked
        raise SystemExit(0)


async def _exit_with_parent(parent: int) -> None:
    """Elsewhere, notice the parent is gone by polling."""
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    logger.warning("producer: parent process %d is gone; stopping", parent)


def _tune_garbage_collector() -> None:
    """What startup built (SQLAlchemy, pydantic, the settings, the catalog) out of the
    collector's sight, and young objects collected less eagerly: every tick allocates, and
    with the defaults a full collection walking all of startup's objects ran so often that it
    was most of the producer's CPU at a few hundred ticks/s (perf: 60 % in gc_collect_main).
    The server's workers do the same (app/main.py), but for a collection first: what little
    startup left as garbage is kept rather than make the lease wait for a full collection."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def run_producer() -> None:
    settings = get_settings()
    if not settings.uses_redis:
        raise SystemExit(
            "python -m app.feed needs BROADCAST_URL=redis://… (memory:// is in-process)"
        )
    engine = create_engine(settings.database_url, timeout=settings.database_timeout_seconds)
    sessions = create_session_factory(engine)
    try:
        instruments = await load_instruments(sessions)
    except BaseException:
        await engine.dispose()
        raise
    redis = create_redis(settings.broadcast_url)
    store = create_tick_store(settings, redis)
    lease = create_lease(settings, redis, store, instance=instance_name(settings))
    broker = Broker(settings.broadcast_url)
    await broker.connect()
    catalog = Catalog(instruments)  # the producer quotes what it holds on each round
    watcher = CatalogWatcher(sessions, catalog, poll_seconds=settings.instrument_poll_seconds)
    witness = PublishedTicks(broker, catalog, keep=settings.retention_ticks)
    history = create_history_writer(
        settings,
        HistoryRecords(engine),
        create_history_report(redis, prefix=settings.redis_key_prefix),
    )
    producer = create_producer(
        settings,
        instruments=catalog,
        store=store,
        broker=broker,
        lease=lease,
        checkpoints=SeqCheckpoints(sessions),
        counts=create_feed_counts(redis, prefix=settings.redis_key_prefix),
        inbox=create_inbox(settings, redis),
        history=history,
        witness=witness,
    )
    _tune_garbage_collector()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchers = [
        asyncio.create_task(producer.run()),
        asyncio.create_task(watcher.run()),
        asyncio.create_task(witness.run()),
        asyncio.create_task(stop.wait()),
    ]
    parent = os.environ.get("PRICEFEED_PARENT_PID")
    if parent:
        watchers.append(asyncio.create_task(_exit_with_parent(int(parent))))
    try:
        done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in watchers:
            task.cancel()
        try:
            async with asyncio.timeout(5):  # never linger: a successor may need the lease
                await asyncio.gather(*watchers, return_exceptions=True)
                await lease.release()
                if history is not None:  # what it published last, not yet in the database
                    await producer.settled()
                    await history.flush()
                await broker.disconnect()
                await store.close()
                await redis.aclose()
                await engine.dispose()
        except TimeoutError:
            logger.warning("producer: cleanup timed out; exiting anyway")


def _loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # not on this platform (uvicorn falls back the same way)
            return None
        return uvloop.new_event_loop
    return None


def main() -> None:
    settings = get_settings()
    logging.config.dictConfig(logging_config(settings.log_level))
    exit_unless_source_ready(settings)  # before the database, Redis and the lease
    parent = os.environ.get("PRICEFEED_PARENT_PID")
    if parent:
        _die_with_parent(int(parent))
    try:
        # The same loop as the server's (EVENT_LOOP): uvloop halves the loop's own cost per
        # Redis round trip, which is most of what a tick costs here.
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            runner.run(run_producer())
    except SourceNotReady as error:  # it became unready since the check (a file removed)
        exit_cannot_start(error)


if __name__ == "__main__":
    main()
