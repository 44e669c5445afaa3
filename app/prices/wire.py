"""WebSocket frames as bytes (RFC 6455 §5.2), for the fast path that writes one encoded frame
to every subscriber instead of encoding it again per connection. Server frames are unmasked."""

from __future__ import annotations

import struct


def text_frame(payload: bytes) -> bytes:
    """One final, uncompressed text frame carrying `payload` (UTF-8 JSON)."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 1 << 16:
        return b"\x81\x7e" + struct.pack("!H", length) + payload
    return b"\x81\x7f" + struct.pack("!Q", length) + payload


def batch_frame(texts: list[str]) -> bytes:
    """One text frame for the JSON of several ticks, in order: an array, or one alone as itself
    (what a client that subscribed with `"batch": true` accepts)."""
    text = texts[0] if len(texts) == 1 else "[" + ",".join(texts) + "]"
    return text_frame(text.encode())
