"""A broker message becomes a tick only if it is one: every other shape is refused by name."""

from decimal import Decimal

import pytest

from app.prices.ticks import MalformedTick, Tick, decode_tick, encode_tick


def test_a_frame_decodes_to_its_own_fields_and_text() -> None:
    frame = encode_tick(symbol="MSFT", price=Decimal("1.5"), ts=1_700_000_000_123, seq=7).frame
    tick = decode_tick(frame)
    assert tick == Tick("MSFT", 7, 1_700_000_000_123, frame)
    assert type(tick) is Tick and tick.frame is frame


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not a tick", "not JSON"),
        ("", "not JSON"),
        ("[1, 2]", "not an object"),
        ('"tick"', "not an object"),
        ("42", "not an object"),
        ("null", "not an object"),
        ('{"type":"tick","symbol":"MSFT"}', "missing"),
        ('{"type":"snapshot","symbol":"MSFT","price":"1","ts":1,"seq":1}', "missing"),
        ('{"symbol":"MSFT","price":"1","ts":1,"seq":1}', "missing"),
        ('{"type":"tick","symbol":"MSFT","price":"1","ts":1,"seq":"1"}', "mistyped"),
        ('{"type":"tick","symbol":"MSFT","price":"1","ts":1,"seq":true}', "mistyped"),
        ('{"type":"tick","symbol":"MSFT","price":"1","ts":1.5,"seq":1}', "mistyped"),
        ('{"type":"tick","symbol":"MSFT","price":1,"ts":1,"seq":1}', "mistyped"),
        ('{"type":"tick","symbol":null,"price":"1","ts":1,"seq":1}', "mistyped"),
        ('{"type":"tick","symbol":"MSFT","ts":1,"seq":1}', "missing"),
    ],
)
def test_anything_else_is_refused_with_its_reason(frame: str, reason: str) -> None:
    with pytest.raises(MalformedTick, match=reason):
        decode_tick(frame)
