"""The outbox, alone: ordering, deduplication, bounded memory, conflation."""

from __future__ import annotations

from app.prices.outbox import Frame, Outbox
from tests.prices.fanout_support import offer, tick


def subscribed_outbox(*symbols: str, limit: int = 16) -> Outbox:
    outbox = Outbox(limit=limit, on_queued=lambda: None)
    for symbol in symbols:
        outbox.begin_sync(symbol)
        outbox.end_sync(symbol, [], floor=0, first_live_is_snapshot=False)
    return outbox


class TestOutbox:
    def test_keeps_every_tick_while_under_its_limit(self) -> None:
        outbox = subscribed_outbox("AAPL")
        for seq in range(1, 11):
            offer(outbox, tick("AAPL", seq))
        assert [f.seq for f in outbox.drain()] == list(range(1, 11))
        assert outbox.conflated == 0

    def test_drops_duplicates_and_older_ticks(self) -> None:
        outbox = subscribed_outbox("AAPL")
        for seq in (1, 2, 2, 1, 3):
            offer(outbox, tick("AAPL", seq))
        assert [f.seq for f in outbox.drain()] == [1, 2, 3]

    def test_ignores_symbols_not_subscribed(self) -> None:
        outbox = subscribed_outbox("AAPL")
        offer(outbox, tick("MSFT", 1))
        assert outbox.drain() == []

    def test_a_stuck_reader_stays_bounded_and_sees_a_seq_jump(self) -> None:
        outbox = subscribed_outbox("AAPL", "MSFT", limit=16)
        for seq in range(1, 10_001):
            offer(outbox, tick("AAPL", seq))
            offer(outbox, tick("MSFT", seq))
        assert len(outbox) <= 16
        frames = outbox.drain()
        by_symbol = {s: [f.seq for f in frames if f.symbol == s] for s in ("AAPL", "MSFT")}
        for seqs in by_symbol.values():
            assert seqs[-1] == 10_000, "the latest tick always survives"
            assert seqs == sorted(seqs), "still in seq order"
            assert len(seqs) < 10_000, "older ticks were conflated: a visible seq jump"
        assert outbox.conflated == 20_000 - len(frames)

    def test_control_frames_survive_conflation(self) -> None:
        outbox = subscribed_outbox("AAPL", limit=16)
        outbox.push_control('{"type":"pong"}')
        for seq in range(1, 100):
            offer(outbox, tick("AAPL", seq))
        texts = [f.text for f in outbox.drain()]
        assert texts[0] == '{"type":"pong"}'

    def test_live_ticks_during_sync_follow_the_snapshot_without_duplicates(self) -> None:
        outbox = Outbox(limit=64, on_queued=lambda: None)
        outbox.begin_sync("AAPL")
        for seq in (5, 6, 7):  # live ticks arrive while the snapshot (seq 6) is loading
            offer(outbox, tick("AAPL", seq))
        snapshot = tick("AAPL", 6)
        outbox.end_sync(
            "AAPL",
            [Frame("AAPL", 6, snapshot.snapshot_frame, "snapshot")],
            floor=0,
            first_live_is_snapshot=False,
        )
        offer(outbox, tick("AAPL", 8))
        frames = outbox.drain()
        assert [(f.event, f.seq) for f in frames] == [("snapshot", 6), ("tick", 7), ("tick", 8)]
        assert frames[0].text.startswith('{"type":"snapshot","symbol":"AAPL"')

    def test_first_live_tick_is_the_snapshot_when_none_existed(self) -> None:
        outbox = Outbox(limit=64, on_queued=lambda: None)
        outbox.begin_sync("AAPL")
        outbox.end_sync("AAPL", [], floor=0, first_live_is_snapshot=True)
        offer(outbox, tick("AAPL", 1))
        offer(outbox, tick("AAPL", 2))
        assert [f.event for f in outbox.drain()] == ["snapshot", "tick"]
