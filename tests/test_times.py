"""The learned model of generation times: a proper distribution, whatever it has seen."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sora_async as sa
from sora_async._times import GenerationTimes

durations = st.lists(st.floats(0.5, 2000.0, allow_nan=False), max_size=60)


@settings(max_examples=60, deadline=None)
@given(seen=durations, history=st.integers(1, 40))
def test_the_model_is_a_distribution_whatever_it_saw(seen: list[float], history: int) -> None:
    """Survival falls from 1 to 0, its integral is E[min(T, age)], and the age found for a
    survival is the first to reach it, after any durations (and forgetting the oldest)."""
    times = GenerationTimes(sa.PollPolicy(history=history))
    for seconds in seen:
        times.observe(seconds)
    ages = [0.0, 0.3, 1.0, 30.0, 100.0, 170.0, 400.0, 1000.0, 2500.0, 1e9]
    survival = [times.survival(age) for age in ages]
    assert survival[0] == 1.0
    assert all(1.0 >= a >= b >= 0.0 for a, b in itertools.pairwise(survival))
    assert survival[-1] < 1e-3
    for low, high in itertools.pairwise(ages):
        # The integral of a falling survival lies between its ends times the width.
        grown = times.mean_min(high) - times.mean_min(low)
        width = high - low
        assert width * times.survival(high) - 1e-6 <= grown <= width * times.survival(low) + 1e-6
    for target in (0.9, 0.5, 0.1, 0.01):
        # The first age where survival is down to the target (it may jump past it there).
        age = times.age_at_survival(target)
        assert times.survival(age) <= target + 1e-3
        assert times.survival(max(0.0, age - 0.01)) >= target - 1e-3


def test_the_model_learns_a_tight_spread_and_a_hard_floor() -> None:
    """After 200 durations spread evenly over 150-210 s, the model says almost none end
    before 150 s or after 215 s, as the durations did."""
    times = GenerationTimes(sa.PollPolicy())
    for i in range(200):
        times.observe(150.0 + 60.0 * i / 199)
    assert times.survival(145.0) > 0.99
    assert times.survival(180.0) == pytest.approx(0.5, abs=0.02)
    assert times.survival(215.0) < 0.01
