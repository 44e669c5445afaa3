"""What uvicorn's WebSocket protocol sets alike on every connection of one server, held once
per server instead of once per connection (app/server/protocol.py installs it with
`share_per_server`).

CPython shares one table of attribute names among a class's instances and gives each only an
array of values, up to 29 names; an instance that gets a 30th switches to a dict of its own
(~1.6 KB against ~0.3 KB). uvicorn's protocol sets 36 attributes, so every connection paid for
the dict. Thirteen of them are the same on every connection of a server: its config, app,
loop, logger, the server's sets of connections and tasks, timeouts from the config, and its
`default_headers`, which the server renews every second for their Date. Kept here, the
connection's own stay under the limit: the connection holds one `ServerShared` in its
`server_shared` attribute, and a descriptor on the class stands for each shared name.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uvicorn.server import ServerState

SHARED_NAMES = (
    "config",
    "app",
    "loop",
    "logger",
    "root_path",
    "asgi_version",
    "app_state",
    "connections",
    "tasks",
    "close_timeout",
    "ping_interval",
    "ping_timeout",
)


class ServerShared:
    """The `SHARED_NAMES` attributes of one server's connections, and that server's state."""

    __slots__ = (*SHARED_NAMES, "server_state", "__weakref__")

    def __init__(self, server_state: ServerState) -> None:
        self.server_state = weakref.ref(server_state)

    def copy(self) -> ServerShared:
        server_state = self.server_state()
        assert server_state is not None  # a connection of it is asking
        twin = ServerShared(server_state)
        for name in SHARED_NAMES:
            if hasattr(self, name):
                setattr(twin, name, getattr(self, name))
        return twin


_by_server: weakref.WeakKeyDictionary[ServerState, ServerShared] = weakref.WeakKeyDictionary()


def shared_by(server_state: ServerState) -> ServerShared:
    """The one `ServerShared` of the server whose state this is."""
    shared = _by_server.get(server_state)
    if shared is None:
        _by_server[server_state] = shared = ServerShared(server_state)
    return shared


_UNSET = object()


class _SharedAttribute:
    """A `SHARED_NAMES` attribute, read from and written to the connection's `ServerShared`.
    Writing a value other than the one there (a test shortening one connection's
    `close_timeout`) gives that connection a `ServerShared` of its own first."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return getattr(instance.server_shared, self._name)

    def __set__(self, instance: Any, value: Any) -> None:
        shared = instance.server_shared
        current = getattr(shared, self._name, _UNSET)
        if current is value:
            return
        if current is not _UNSET:
            instance.server_shared = shared = shared.copy()
        setattr(shared, self._name, value)


class _DefaultHeaders:
    """uvicorn's `default_headers` (Date and Server, for the handshake's response), read from
    the server's state when used, as its HTTP protocol does, rather than a copy per
    connection: the server renews the list every second. What uvicorn's `__init__` assigns
    is that same list."""

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        server_state = instance.server_shared.server_state()
        return server_state.default_headers if server_state is not None else []

    def __set__(self, instance: Any, value: Any) -> None:
        pass


def share_per_server(cls: type) -> None:
    """Make `cls` (a protocol whose instances set `server_shared = shared_by(server_state)`
    before uvicorn's `__init__` runs) keep the shared attributes there."""
    descriptors: dict[str, object] = {name: _SharedAttribute(name) for name in SHARED_NAMES}
    descriptors["default_headers"] = _DefaultHeaders()
    for name, descriptor in descriptors.items():
        setattr(cls, name, descriptor)
