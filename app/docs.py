"""The API docs a newcomer opens: Swagger UI at `/docs`, ReDoc at `/redoc`, both from assets the
app serves itself (app/static/docs/, see its README), so they work with no internet access:
no CDN, no Google Fonts. And the schema they render, with every error in the shape the
handlers of app/errors.py answer.

`create_app` builds FastAPI with `docs_url=None, redoc_url=None` and calls `install_docs(app)`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from app.errors import document_error_shapes

ASSETS_DIR = Path(__file__).parent / "static" / "docs"
ASSETS_URL = "/static/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASYNCAPI_URL = "/asyncapi.json"  # the stream protocol; protocol.md links it from /docs


def install_docs(
    app: FastAPI,
    *,
    public: bool = True,
    stream_spec: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Document the error shapes in the schema, and (`public`) serve `/docs`, `/redoc`, their
    assets, and `stream_spec()` (the AsyncAPI document of the streams) at `/asyncapi.json`.
    Not public: build FastAPI with `openapi_url=None` too (DOCS_PUBLIC=false)."""
    openapi_url = app.openapi_url or "/openapi.json"
    title = app.title
    build_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # built once, then served from FastAPI's cache
            app.openapi_schema = document_error_shapes(build_schema())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented hook
    if not public:
        return

    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    if stream_spec is not None:
        spec = stream_spec

        @app.get(ASYNCAPI_URL, include_in_schema=False)
        async def show_asyncapi() -> JSONResponse:
            return JSONResponse(spec())

    @app.get("/docs", include_in_schema=False)
    async def show_swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
            oauth2_redirect_url=OAUTH2_REDIRECT_URL,
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def show_swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def show_redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
            with_google_fonts=False,
        )
