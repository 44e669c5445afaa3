"""python-socketio fan-out server for the benchmark: AsyncServer + AsyncRedisManager, ASGI.

Run: ``BROADCAST_URL=redis://127.0.0.1:6379/0 uvicorn bench.peers.socketio_py:app``

A client emits ``subscribe`` with a list of symbols (acknowledged), and joins one room per
symbol. Ticks come from an external ``socketio.AsyncRedisManager(write_only=True)`` that
emits ``tick`` to the symbol's room (bench/producer.py ``--mode sio``); the manager on this
side relays them to the room's members.
"""

from __future__ import annotations

import os

import socketio

mgr = socketio.AsyncRedisManager(os.environ.get("BROADCAST_URL", "redis://127.0.0.1:6379/0"))
sio = socketio.AsyncServer(async_mode="asgi", client_manager=mgr, cors_allowed_origins=[])


@sio.event
async def subscribe(sid: str, symbols: list[str]) -> dict[str, list[str]]:
    joined = [str(s).upper() for s in symbols]
    for symbol in joined:
        await sio.enter_room(sid, symbol)
    return {"subscribed": joined}


app = socketio.ASGIApp(sio)
