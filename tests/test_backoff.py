"""app/backoff.py: retry delays grow exponentially to a cap, each drawn between half and all of
its step (so a cluster that lost Redis together does not retry together), and start over after
an attempt that worked or ran long enough."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from app.backoff import Backoff


def lowest(**kwargs: float) -> Backoff:
    """Every delay at the bottom of its jitter range: half the step."""
    return Backoff(rng=lambda: 0.0, **kwargs)


def highest(**kwargs: float) -> Backoff:
    """Every delay at the top of its jitter range: the whole step (random() is below 1)."""
    return Backoff(rng=lambda: 1.0, **kwargs)


def delays(backoff: Backoff, count: int) -> list[float]:
    return [backoff.next_delay() for _ in range(count)]


class TestGrowth:
    def test_steps_double_up_to_the_cap(self) -> None:
        assert delays(highest(base=0.5, cap=10.0), 8) == [0.5, 1, 2, 4, 8, 10, 10, 10]

    def test_factor_sets_the_growth(self) -> None:
        assert delays(highest(base=1.0, cap=100.0, factor=3.0), 5) == [1, 3, 9, 27, 81]

    def test_factor_one_is_a_constant_step(self) -> None:
        assert delays(highest(base=2.0, cap=5.0, factor=1.0), 4) == [2, 2, 2, 2]

    def test_attempt_counts_the_failures(self) -> None:
        backoff = Backoff()
        delays(backoff, 3)
        assert backoff.attempt == 3

    def test_a_dependency_down_for_hours_still_gets_the_cap(self) -> None:
        """A power of the attempt count overflows a float after ~1000 failures in a row."""
        backoff = highest(base=0.5, cap=15.0)
        assert delays(backoff, 5000)[-3:] == [15.0, 15.0, 15.0]
        assert backoff.attempt == 5000


class TestJitter:
    def test_each_delay_lies_between_half_and_all_of_its_step(self) -> None:
        steps = [0.5, 1, 2, 4, 8, 10, 10]
        assert delays(lowest(base=0.5, cap=10.0), 7) == [s / 2 for s in steps]
        assert delays(highest(base=0.5, cap=10.0), 7) == steps
        midway = Backoff(base=0.5, cap=10.0, rng=lambda: 0.5)
        assert delays(midway, 7) == [s * 0.75 for s in steps]

    def test_default_delays_spread_over_the_range(self) -> None:
        """Instances that failed together wait different times, never below half the step."""
        firsts = [Backoff(base=0.5, cap=10.0).next_delay() for _ in range(200)]
        assert len(set(firsts)) > 1
        assert all(0.25 <= d <= 0.5 for d in firsts)
        assert min(firsts) < 0.375 < max(firsts), "both halves of the range are used"

    def test_later_delays_stay_in_range_too(self) -> None:
        backoff = Backoff(base=0.5, cap=10.0)
        got = delays(backoff, 50)
        steps = [min(10.0, 0.5 * 2**i) for i in range(50)]
        assert all(s / 2 <= d <= s for d, s in zip(got, steps, strict=True))
        assert len(set(got[10:])) > 1, "capped delays are jittered as well"


class TestStartingOver:
    def test_reset_starts_from_base(self) -> None:
        backoff = highest(base=0.5, cap=10.0)
        delays(backoff, 4)
        backoff.reset()
        assert backoff.attempt == 0
        assert delays(backoff, 3) == [0.5, 1, 2]

    def test_an_attempt_that_ran_long_enough_counts_as_a_success(self) -> None:
        backoff = highest(base=0.5, cap=10.0, healthy_after=60.0)
        delays(backoff, 5)
        assert backoff.next_delay(ran_for=60.0) == 0.5
        assert backoff.next_delay() == 1.0
        assert backoff.attempt == 2

    def test_a_shorter_run_does_not(self) -> None:
        backoff = highest(base=0.5, cap=10.0, healthy_after=60.0)
        delays(backoff, 3)
        assert backoff.next_delay(ran_for=59.9) == 4.0


class TestSleep:
    async def test_sleep_waits_the_delay_it_returns(self) -> None:
        backoff = highest(base=0.05, cap=1.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = await backoff.sleep()
        second = await backoff.sleep()
        assert (first, second) == (0.05, 0.1)
        assert loop.time() - started >= 0.15 - 0.005  # the loop's clock resolution

    async def test_sleep_honours_ran_for(self) -> None:
        backoff = highest(base=0.01, cap=1.0, healthy_after=5.0)
        delays(backoff, 4)
        assert await backoff.sleep(ran_for=5.0) == 0.01


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"base": 0.0}, id="zero-base"),
        pytest.param({"base": -1.0}, id="negative-base"),
        pytest.param({"base": 20.0, "cap": 10.0}, id="base-above-cap"),
        pytest.param({"factor": 0.5}, id="shrinking-factor"),
        pytest.param({"cap": math.inf}, id="infinite-cap"),
        pytest.param({"healthy_after": 0.0}, id="always-healthy"),
        pytest.param({"healthy_after": -1.0}, id="negative-healthy-after"),
        pytest.param({"base": math.nan}, id="nan-base"),
        pytest.param({"factor": math.nan}, id="nan-factor"),
        pytest.param({"cap": math.nan}, id="nan-cap"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Backoff needs"):
        Backoff(**kwargs)


def test_base_equal_to_cap_is_allowed() -> None:
    assert delays(highest(base=3.0, cap=3.0), 3) == [3, 3, 3]
