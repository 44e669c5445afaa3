"""Running pricefeed under uvicorn, and the one place that touches uvicorn's and websockets'
internals.

- run.py: `python -m app` (uvicorn with the settings applied, the producer process)
- guard.py: which WebSocket protocol to serve with, given the installed versions
- protocol.py: pricefeed's protocol (`WS_IMPL=fast`), imported only through guard.py, so that
  an untested uvicorn or websockets release degrades to uvicorn's stock protocol instead of
  breaking the import of the whole app. With it go direct_writes.py (the hub's frame writer
  and the watched transport), shared.py (what a server's connections share, held once) and
  lean.py (lighter queue and event); http_protocol.py is its HTTP side.
"""
