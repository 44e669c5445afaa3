"""Run the service under uvicorn with every setting applied: WebSocket implementation,
frame size limit, compression, workers, and log redaction.

On SIGTERM/SIGINT the streams are closed with 1001 ("going away": reconnect) before uvicorn
closes what is left (it would say 1012).
"""

from __future__ import annotations

import uvicorn
from uvicorn.supervisors import Multiprocess

from app.config import get_settings
from app.logs import logging_config
from app.prices.streams import CLOSE_GOING_AWAY, StreamRegistry


class PricefeedServer(uvicorn.Server):
    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        app = self.config.loaded_app
        # Unwrap uvicorn's middleware to reach the FastAPI app's state.
        while not hasattr(app, "state") and hasattr(app, "app"):
            app = app.app
        streams: StreamRegistry | None = getattr(getattr(app, "state", None), "streams", None)
        if streams is not None:
            await streams.close_all(CLOSE_GOING_AWAY, "server going away")
        await super().shutdown(sockets)


def main() -> None:
    settings = get_settings()
    config = uvicorn.Config(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        ws=settings.ws_impl,
        ws_max_size=settings.ws_max_message_bytes,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        log_config=logging_config(settings.log_level),
        log_level=settings.log_level,
        proxy_headers=True,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = PricefeedServer(config)
    if config.workers > 1:
        sock = config.bind_socket()
        Multiprocess(config, target=server.run, sockets=[sock]).run()
    else:
        server.run()
