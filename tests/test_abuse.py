"""A short run of bench/abuse.py: a ping flooder, a replay looper, a connection churner and a
token-endpoint hammer at once (a process of their own) against `python -m app`, while a
well-behaved subscriber on the same instance reads every symbol. It gets every tick, in order.
Timing (p99, the producer's rate) is the benchmark's to print, not this test's to assert."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.abuse import Attack, measure, read_attackers, spawn_attackers
from tests.support import JWT_SECRET, SEED_SYMBOLS, server_process, signer

pytestmark = pytest.mark.slow

# 5 s at 4 ticks a second: as many ticks checked under attack as 10 s at 2, in half the time
# (the attack loads both cores, and under pytest-xdist the other worker's tests too).
SECONDS = 5
TICKS_PER_SECOND = 4


async def test_a_well_behaved_subscriber_gets_every_tick_in_order_under_attack(
    tmp_path: Path, database_url: str
) -> None:
    server = server_process(
        tmp_path, "abused", database_url, FEED_TICKS_PER_SECOND=str(TICKS_PER_SECOND)
    )
    server.start()
    try:
        await server.wait_ready()
        attack = Attack(pingers=2, loopers=10, churners=2, hammers=4)
        attackers = spawn_attackers(server.port, JWT_SECRET, SECONDS + 2, attack)
        try:
            await asyncio.sleep(1)  # the attackers under way
            victim = await measure(server.http, server.ws, signer(), SECONDS)
            await asyncio.to_thread(read_attackers, attackers, attack)
        finally:
            attackers.kill()
            attackers.wait(5)
        log = server.log()
    finally:
        server.stop()

    assert victim.closed is None, f"the subscriber was closed with {victim.closed}"
    assert victim.ticks > 0 and len(victim.last_seq) == len(SEED_SYMBOLS), "every symbol streamed"
    assert (victim.gaps, victim.out_of_order) == (0, 0), "every tick, in seq order, once"
    for kind in ("ping", "replay", "connection", "token request"):
        assert attack.sent[kind] > 0, f"the {kind} attacker ran: {attack.sent}"
    assert "Traceback" not in log
