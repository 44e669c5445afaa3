"""Running pricefeed under uvicorn, and the one place that touches uvicorn's and websockets'
internals.

- run.py: `python -m app` (uvicorn with the settings applied, the producer process)
- guard.py: which WebSocket protocol to serve with, given the installed versions
- protocol.py: pricefeed's protocol (`WS_IMPL=fast`), imported only through guard.py, so that
  an untested uvicorn or websockets release degrades to uvicorn's stock protocol instead of
  breaking the import of the whole app.
"""
