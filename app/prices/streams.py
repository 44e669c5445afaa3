"""Open streams on this instance: admission limits, the per-connection writer, closing, and
withdrawing the symbols of instruments disabled while they run.

A WebSocket stream owns an `Outbox` (app/prices/outbox.py); its writer drains it, batches when
the client asked for it, sends heartbeats when idle, closes with 4408 the moment the token
expires (before sending anything more), and with 1013 when a send stays stuck.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from typing import Protocol

import orjson
from starlette.websockets import WebSocket, WebSocketState

from app import metrics
from app.errors import CloseCode, RateLimited, Unavailable
from app.frames import FrameWriter, count_control_frames, frame_writer, park
from app.prices.hub import FanoutHub
from app.prices.leases import StreamLeases
from app.prices.outbox import Frame, Outbox
from app.prices.wire import text_frame
from app.security import Principal
from app.timers import WheelTimer, coarse_timers

logger = logging.getLogger(__name__)


class OpenStream(Protocol):
    """What the registry asks of a stream: WebSocketStream here, EventStream (app/prices/sse.py)."""

    async def close(self, code: int, reason: str) -> None: ...

    async def withdraw(self, symbols: AbstractSet[str]) -> bool:
        """Stop sending `symbols` (instruments disabled), as the stream's protocol says;
        whether it had any of them."""
        ...


class StreamRegistry:
    """Counts open streams (per instance and per token subject) and can close them all."""

    def __init__(self, *, max_total: int, max_per_subject: int) -> None:
        self._max_total = max_total
        self._max_per_subject = max_per_subject
        self._per_subject: Counter[str] = Counter()
        self._open: set[OpenStream] = set()
        self._leases: StreamLeases | None = None

    def count_across_instances(self, leases: StreamLeases) -> None:
        """With Redis: the per-subject limit counts every instance's streams."""
        self._leases = leases

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[OpenStream]:
        return iter(list(self._open))

    @asynccontextmanager
    async def admit(self, stream: OpenStream, subject: str, transport: str) -> AsyncIterator[None]:
        admission = await self.enter(stream, subject, transport)
        try:
            yield
        finally:
            admission.leave()

    async def enter(self, stream: OpenStream, subject: str, transport: str) -> Admission:
        """Count `stream` in, or raise Unavailable at capacity, RateLimited past the subject's
        limit; `leave()` the answer once it ends. `admit` does both around a block; a stream
        that outlives its task (a parked WebSocket, app/prices/ws.py) holds the answer."""
        if len(self._open) >= self._max_total:
            raise Unavailable("server at capacity; retry later")
        if self._per_subject[subject] >= self._max_per_subject:
            raise RateLimited("too many connections for this token subject")
        self._per_subject[subject] += 1
        self._open.add(stream)
        metrics.CONNECTIONS.labels(transport=transport).inc()
        admission = Admission(self, stream, subject, transport)
        leases = self._leases
        if leases is not None:
            try:  # RateLimited past the limit across instances
                admission.lease = await leases.acquire(subject)
            except BaseException:
                admission.leave()
                raise
        return admission

    def _leave(self, admission: Admission) -> None:
        """Nothing awaited: it runs whole even in a cancelled task."""
        subject, transport = admission.subject, admission.transport
        if self._leases is not None and admission.lease is not None:
            self._leases.release(subject, admission.lease)
        self._open.discard(admission.stream)
        self._per_subject[subject] -= 1
        if not self._per_subject[subject]:
            del self._per_subject[subject]
        metrics.CONNECTIONS.labels(transport=transport).dec()

    async def close_all(self, code: int, reason: str) -> None:
        await asyncio.gather(
            *(s.close(code, reason) for s in list(self._open)), return_exceptions=True
        )

    async def withdraw(self, symbols: Iterable[str]) -> int:
        """Symbols no longer served (instruments disabled): every open stream drops them as
        its protocol says (app/prices/protocol.md); how many streams had any."""
        gone = frozenset(symbols)
        if not gone:
            return 0
        results = await asyncio.gather(
            *(s.withdraw(gone) for s in list(self._open)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception):
                logger.warning("stream: could not withdraw %s: %r", sorted(gone), result)
        return sum(1 for result in results if result is True)

    async def close_where(self, picked: Callable[[Principal], bool], code: int, reason: str) -> int:
        """Close the streams whose current principal `picked` chooses (a revoked token's);
        how many. A stream without a principal is left alone."""
        doomed = [
            s
            for s in list(self._open)
            if (principal := getattr(s, "principal", None)) is not None and picked(principal)
        ]
        await asyncio.gather(*(s.close(code, reason) for s in doomed), return_exceptions=True)
        return len(doomed)


class Admission:
    """One admitted stream's place in its `StreamRegistry`, until `leave()`."""

    __slots__ = ("_registry", "stream", "subject", "transport", "lease")

    def __init__(
        self, registry: StreamRegistry, stream: OpenStream, subject: str, transport: str
    ) -> None:
        self._registry: StreamRegistry | None = registry
        self.stream, self.subject, self.transport = stream, subject, transport
        self.lease: str | None = None  # its lease across instances (with Redis)

    def leave(self) -> None:
        """The stream ended; only the first call counts."""
        registry, self._registry = self._registry, None
        if registry is not None:
            registry._leave(self)


class RateLimiter:
    """A token bucket: `rate` messages a second, bursts up to twice that."""

    __slots__ = ("_rate", "_burst", "_tokens", "_at")

    def __init__(self, rate: float) -> None:
        self._rate, self._burst = rate, max(2 * rate, 1.0)
        self._tokens, self._at = self._burst, time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class TokenExpiredWhileSending(Exception):
    """The token expired while a send waited for the socket: nothing more may go out."""


def no_longer_available(symbols: list[str]) -> str:
    """What a stream is told of withdrawn symbols (instruments disabled)."""
    return f"{', '.join(symbols)} {'is' if len(symbols) == 1 else 'are'} no longer available"


def control(kind: str, **fields: object) -> str:
    return orjson.dumps({"type": kind, **fields}).decode()


class WebSocketStream:
    """One WebSocket connection's sending side.

    An idle stream costs no task: live ticks are written by the hub (`Outbox.flush`), a timer
    checks for token expiry and idleness, and a short-lived task drains the outbox only while
    frames are queued in it (protocol replies, snapshots, or ticks for a reader that is behind).
    """

    def __init__(
        self,
        websocket: WebSocket,
        *,
        hub: FanoutHub,
        principal: Principal,
        leeway: float,
        outbox_frames: int,
        send_timeout: float,
        heartbeat: float | None,
        max_messages_per_second: float,
        single_symbol: bool = False,
    ) -> None:
        """`single_symbol`: the per-symbol route's stream, closed (not just unsubscribed)
        when its symbol is withdrawn."""
        self.websocket = websocket
        self.hub = hub
        self._single_symbol = single_symbol
        # Every frame from the client spends from it: messages (app/prices/ws.py), and pings
        # and pongs where the server counts them for us (pricefeed's protocol).
        self.limiter = RateLimiter(max_messages_per_second)
        count_control_frames(websocket.scope, self.limiter.allow)
        self._direct: FrameWriter | None = frame_writer(websocket.scope)
        self.outbox = Outbox(limit=outbox_frames, on_queued=self._drain_soon, direct=self._direct)
        self._leeway = leeway
        self._send_timeout = send_timeout
        # Checked twice per period: a heartbeat goes out at most `heartbeat` s after the last frame.
        self._check_every = heartbeat / 2 if heartbeat is not None else None
        self._sent_at_check = -1
        self._queued_sent = 0
        self._closing = False
        self._timer: WheelTimer | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._subscribe_check: WheelTimer | None = None
        self.principal = principal

    @property
    def principal(self) -> Principal:
        return self._principal

    @principal.setter
    def principal(self, value: Principal) -> None:
        self._principal = value
        self.outbox.deadline = value.expires_at + self._leeway
        if self._timer is not None:
            self._arm_timer()

    @property
    def closed(self) -> bool:
        return self._closing

    def start(self) -> None:
        self._arm_timer()

    def park(self, resume: Callable[[], Awaitable[None]]) -> bool:
        """Hand the connection back to the server until the client's next frame (or its
        going away), which runs `resume()` in a new task: see `app.frames.park`. False while
        a frame is waiting, or on a server that cannot do this."""
        return park(self.websocket.scope, resume)

    def require_subscription(self, within: float) -> None:
        """Close 1008 unless the stream is subscribed to something `within` seconds from now:
        an idle socket that subscribes to nothing only holds a slot."""
        self._subscribe_check = coarse_timers().call_later(within, self._check_subscribed)

    def _check_subscribed(self) -> None:
        self._subscribe_check = None
        if not self.outbox.symbols:
            self._close_soon(CloseCode.POLICY, "no subscription; subscribe after connecting")

    def stop(self) -> None:
        """The connection is over: drop timers and any drain still running."""
        if self._subscribe_check is not None:
            self._subscribe_check.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self._drainer is not None:
            self._drainer.cancel()

    async def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.outbox.closed = True
        self.outbox.direct = None  # from now on nothing bypasses the close
        self.hub.detach(self.outbox, self.outbox.symbols)
        if self._timer is not None:
            self._timer.cancel()
        if self._subscribe_check is not None:
            self._subscribe_check.cancel()
        metrics.CLOSES.labels(code=str(code)).inc()
        try:
            if self.websocket.application_state == WebSocketState.CONNECTED:
                await self.websocket.close(code, reason)
        except Exception:  # noqa: BLE001 - the peer may be gone already
            pass

    async def withdraw(self, symbols: AbstractSet[str]) -> bool:
        """`symbols` are no longer served (instruments disabled). The per-symbol route closes
        4404; the multiplexed one drops them, says so with an `error` frame (`unknown_symbol`)
        and an `unsubscribed` frame, and goes on with the rest. Nothing of them follows."""
        gone = sorted(self.outbox.symbols & symbols)
        if not gone or self._closing:
            return False
        message = no_longer_available(gone)
        if self._single_symbol:
            await self.close(CloseCode.UNKNOWN_SYMBOL, message)
            return True
        self.hub.detach(self.outbox, gone)  # their queued frames go too
        self.outbox.push_control(
            control("error", code="unknown_symbol", message=message, symbols=gone)
        )
        self.outbox.push_control(control("unsubscribed", symbols=gone))
        return True

    def _close_soon(self, code: int, reason: str) -> None:
        if not self._closing and self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self.close(code, reason))

    # -- timers: token expiry and heartbeats (on the wheel: app/timers.py)

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = self.outbox.deadline - time.time()
        if self._check_every is not None:
            delay = min(delay, self._check_every)
        self._timer = coarse_timers().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing:
            return
        if time.time() >= self.outbox.deadline:
            self._close_soon(CloseCode.TOKEN_EXPIRED, "token expired")
            return
        if self._check_every is not None:
            sent = self.outbox.sent + self._queued_sent
            if sent == self._sent_at_check:  # nothing went out for a whole period
                self.outbox.push_control(control("heartbeat", ts=time.time_ns() // 1_000_000))
            self._sent_at_check = sent
        self._arm_timer()

    # -- draining what queued in the outbox

    def _drain_soon(self) -> None:
        if self._drainer is None and not self._closing:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        outbox = self.outbox
        try:
            while len(outbox) and not self._closing:
                if time.time() >= outbox.deadline:  # nothing more after the token expired
                    self._close_soon(CloseCode.TOKEN_EXPIRED, "token expired")
                    return
                frames = outbox.drain()
                try:
                    async with asyncio.timeout(self._send_timeout):
                        await self._send(frames)
                except TokenExpiredWhileSending:
                    self._close_soon(CloseCode.TOKEN_EXPIRED, "token expired")
                    return
                except TimeoutError:
                    logger.info("stream: reader stuck %.0fs; closing 1013", self._send_timeout)
                    self._close_soon(CloseCode.TRY_LATER, "reader too slow")
                    return
                except Exception:  # noqa: BLE001 - the peer went away mid-send
                    self._close_soon(CloseCode.GOING_AWAY, "connection lost")
                    return
                finally:
                    outbox.flushed()
                self._queued_sent += len(frames)
                metrics.MESSAGES_SENT.inc(len(frames))
        finally:
            self._drainer = None

    def _texts(self, frames: list[Frame]) -> list[str]:
        if not self.outbox.batch:
            return [frame.text for frame in frames]
        # Batch mode: each run of price frames goes out as one JSON array, in seq order.
        texts: list[str] = []
        run: list[str] = []
        for frame in frames:
            if frame.event == "control":
                if run:
                    texts.append(run[0] if len(run) == 1 else "[" + ",".join(run) + "]")
                    run = []
                texts.append(frame.text)
            else:
                run.append(frame.text)
        if run:
            texts.append(run[0] if len(run) == 1 else "[" + ",".join(run) + "]")
        return texts

    async def _send(self, frames: list[Frame]) -> None:
        texts = self._texts(frames)
        direct = self._direct
        if direct is None:
            for text in texts:
                await self.websocket.send_text(text)
            return
        # One write for everything queued: the frames leave in one segment.
        data = b"".join(text_frame(text.encode()) for text in texts)
        await direct.wait_writable()
        if time.time() >= self.outbox.deadline:
            raise TokenExpiredWhileSending
        if not direct.write(data):
            raise ConnectionError("connection closed")
