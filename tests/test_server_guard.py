"""The version guard (app/server/guard.py): pricefeed's WebSocket protocol only on the uvicorn
and websockets releases it was tested with; outside them, or if its module fails to import,
the service still serves, on uvicorn's stock protocol, and says why once."""

from __future__ import annotations

import ast
import logging
import re
import tomllib
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from app.prices.streams import WebSocketStream
from app.server import guard
from app.server.protocol import PricefeedWebSocketProtocol
from tests.support import (
    ROOT,
    LiveApp,
    make_settings,
    open_stream,
    redis_server,
    server_process,
    token,
)

TOO_NEW_UVICORN = "0.99.0"


@pytest.fixture
def fresh_guard() -> Iterator[None]:
    """The guard decides once per process: forget that decision before and after the test."""
    guard.fast_protocol.cache_clear()
    yield
    guard.fast_protocol.cache_clear()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == guard.__name__ and r.levelno == logging.WARNING
    ]


class TestRange:
    @pytest.mark.parametrize(
        ("package", "version", "admitted"),
        [
            ("uvicorn", "0.35.0", False),  # the first websockets-sansio: no close_timer yet
            ("uvicorn", "0.52.0", False),
            ("uvicorn", "0.52.1", True),
            ("uvicorn", "0.55.0", True),
            ("uvicorn", "0.55.9", True),
            ("uvicorn", "0.56.0rc1", False),
            ("uvicorn", "0.56.0", False),
            ("uvicorn", "1.0", False),
            ("websockets", "12.0", False),
            ("websockets", "14.0", False),
            ("websockets", "14.1", True),
            ("websockets", "17.4", True),
            ("websockets", "18.0", False),
            ("websockets", "unknown", False),
        ],
    )
    def test_a_version_is_admitted_only_inside_the_tested_range(
        self, package: str, version: str, admitted: bool
    ) -> None:
        versions: dict[str, str | None] = {"uvicorn": "0.55.0", "websockets": "17.4"}
        versions[package] = version
        why = guard.outside_tested_range(versions)
        if admitted:
            assert why is None
        else:
            (tested,) = (t for t in guard.TESTED if t.package == package)
            assert why == f"{package} {version} is outside the tested range {tested.spec}"

    def test_a_package_without_a_version_is_outside(self) -> None:
        why = guard.outside_tested_range({"uvicorn": None, "websockets": "17.4"})
        assert why is not None and why.startswith("uvicorn version unknown")

    def test_pyproject_states_the_same_ranges(self) -> None:
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
        requirements = {
            re.split(r"[\[<>=]", line, maxsplit=1)[0]: line
            for line in pyproject["project"]["dependencies"]
        }
        for tested in guard.TESTED:
            assert requirements[tested.package].endswith(tested.spec), tested.package

    def test_the_installed_releases_run_pricefeeds_protocol(
        self, fresh_guard: None, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Else the whole suite would test the fallback."""
        assert guard.fast_protocol() is PricefeedWebSocketProtocol
        assert warnings_of(caplog) == []


class TestResolve:
    def test_fast_is_pricefeeds_protocol_with_the_settings_as_they_are(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        protocol = PricefeedWebSocketProtocol
        monkeypatch.setattr(protocol, "send_buffer_bytes", protocol.send_buffer_bytes)  # restored
        settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/x.db", ws_send_buffer_bytes=4096)
        serving = guard.resolve(settings)
        assert serving.ws is PricefeedWebSocketProtocol
        assert serving.settings is settings and not serving.fell_back
        assert PricefeedWebSocketProtocol.send_buffer_bytes == 4096

    @pytest.mark.parametrize("ws_impl", ["websockets-sansio", "wsproto", "websockets"])
    def test_a_stock_protocol_is_passed_through_unchecked(
        self,
        ws_impl: str,
        tmp_path: Path,
        fresh_guard: None,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        monkeypatch.setattr(guard, "installed_version", lambda package: TOO_NEW_UVICORN)
        settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/x.db", ws_impl=ws_impl)
        serving = guard.resolve(settings)
        assert (serving.ws, serving.settings, serving.fell_back) == (ws_impl, settings, False)
        assert warnings_of(caplog) == []

    def test_a_protocol_module_that_fails_to_import_falls_back(
        self,
        tmp_path: Path,
        fresh_guard: None,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        monkeypatch.setattr(guard, "PROTOCOL_MODULE", "app.server.no_such_protocol")
        serving = guard.resolve(make_settings(f"sqlite+aiosqlite:///{tmp_path}/x.db"))
        assert (serving.ws, serving.fell_back) == ("websockets-sansio", True)
        assert not serving.settings.fanout_direct_writes
        (warning,) = warnings_of(caplog)
        assert "importing pricefeed's protocols failed (ModuleNotFoundError" in warning
        assert "app.server.no_such_protocol" in warning


async def test_a_too_new_uvicorn_serves_ticks_on_the_stock_protocol_and_says_why_once(
    live: Callable[..., AbstractAsyncContextManager[LiveApp]],
    fresh_guard: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = guard.installed_version
    monkeypatch.setattr(
        guard,
        "installed_version",
        lambda package: TOO_NEW_UVICORN if package == "uvicorn" else real(package),
    )
    async with (
        live(ws_impl="fast", fanout_direct_writes=True) as server,
        open_stream(f"{server.ws}/v1/ws?token={token('fallback')}") as stream,
    ):
        settings = server.app.state.settings
        assert (settings.ws_impl, settings.fanout_direct_writes) == ("websockets-sansio", False)
        await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
        snapshot = await stream.recv_type("snapshot")
        ticks = [await stream.recv_type("tick") for _ in range(3)]
        assert [t["seq"] for t in ticks] == list(range(snapshot["seq"] + 1, snapshot["seq"] + 4))
        (served,) = list(server.app.state.streams)
        assert isinstance(served, WebSocketStream)
        assert served.outbox.direct is None, "no frame writer: the stock protocol serves it"
    assert warnings_of(caplog) == [
        f"WS_IMPL=fast unavailable: uvicorn {TOO_NEW_UVICORN} is outside the tested range "
        ">=0.52.1,<0.56; serving WebSockets with uvicorn's websockets-sansio protocol and no "
        "direct writes"
    ]


@pytest.mark.redis
@pytest.mark.slow
async def test_python_m_app_with_a_too_new_uvicorn_serves_and_warns_once(
    database_url: str, tmp_path: Path
) -> None:
    """A real `python -m app` with two workers, whose installed uvicorn reports a version past
    the tested range (a dist-info ahead of the real one on the path): each process of the
    service starts on the stock protocol; the warning is logged once, not once per worker."""
    fake = tmp_path / "fake-site"
    dist_info = fake / f"uvicorn-{TOO_NEW_UVICORN}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: uvicorn\nVersion: {TOO_NEW_UVICORN}\n"
    )
    with redis_server() as redis:
        server = server_process(
            tmp_path,
            "fallback",
            database_url,
            BROADCAST_URL=redis.url,
            WORKERS="2",
            WS_IMPL="fast",
            PYTHONPATH=str(fake),
        )
        server.start()
        try:
            await server.wait_ready(timeout=30)
            async with open_stream(f"{server.ws}/v1/ws?token={token()}") as stream:
                await stream.send({"op": "subscribe", "symbols": ["MSFT"]})
                snapshot = await stream.recv_type("snapshot", timeout=10)
                tick = await stream.recv_type("tick", timeout=10)
                assert tick["seq"] > snapshot["seq"]
        finally:
            server.stop()
    lines = [line for line in server.log().splitlines() if "WS_IMPL=fast unavailable" in line]
    assert len(lines) == 1, server.log()[-3000:]
    assert "WARNING" in lines[0]
    assert f"uvicorn {TOO_NEW_UVICORN} is outside the tested range >=0.52.1,<0.56" in lines[0]


def test_nothing_outside_app_server_imports_uvicorn_or_websockets_internals() -> None:
    """The quarantine: a uvicorn or websockets release can break app/server/protocol.py (which
    the guard then leaves out), never the import of the rest. The Python client may use
    websockets' public client API."""
    public = {"websockets.asyncio.client", "websockets.exceptions"}
    offenders = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        if path.is_relative_to(ROOT / "app" / "server"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if name.split(".")[0] in ("uvicorn", "websockets") and name not in public:
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []
