"""Run the service under uvicorn with every setting applied: WebSocket implementation,
frame size limit, compression, workers, and log redaction."""

from __future__ import annotations

import uvicorn

from app.config import get_settings
from app.logs import logging_config


def main() -> None:
    settings = get_settings()
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        ws=settings.uvicorn_ws,
        ws_max_size=settings.ws_max_message_bytes,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        log_config=logging_config(settings.log_level),
        log_level=settings.log_level,
        proxy_headers=True,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
