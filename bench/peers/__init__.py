"""Peer servers the benchmark compares pricefeed with (run only by the bench)."""
