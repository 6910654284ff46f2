"""Server clock and generation-time distributions of the fake APIXO service."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_EPOCH_MS",
    "Clock",
    "GenerationTime",
    "fixed",
    "heavy_tailed",
    "lognormal",
    "uniform",
]

#: Wire time of the server's start, in ms (the ``createTime`` of the seed page).
DEFAULT_EPOCH_MS = 1767965610929

#: Draws one generation time in seconds from the server's seeded generator.
GenerationTime = Callable[[random.Random], float]

_US = 1_000_000


class Clock:
    """Tell server time from the event loop, so that virtual loop time drives it.

    Time is kept in integer microseconds since :meth:`start`, which keeps the
    sliding-window arithmetic exact (no float rounding at window edges), and
    never runs backwards.
    """

    def __init__(self, epoch_ms: int = DEFAULT_EPOCH_MS) -> None:
        """Make a clock whose wire time at start is ``epoch_ms``."""
        self.epoch_ms = epoch_ms
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shift_us = 0
        self._last_us = 0
        self._virtual: object = None

    def start(self) -> None:
        """Set time zero to now on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._virtual = getattr(self._loop, "looptime_on", None)
        self._shift_us = -round(self._loop.time() * _US)
        self._last_us = 0

    def now_us(self) -> int:
        """Return microseconds elapsed since start."""
        loop = self._loop
        if loop is None:
            return 0
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
        raw = round(loop.time() * _US)
        virtual = getattr(loop, "looptime_on", None)
        if virtual != self._virtual:
            # looptime switched this loop between wall and virtual time (a fake
            # started in a fixture, used in a marked test): carry on from here.
            self._virtual = virtual
            self._shift_us = self._last_us - raw
        self._last_us = max(self._last_us, raw + self._shift_us)
        return self._last_us

    def now(self) -> float:
        """Return seconds elapsed since start."""
        return self.now_us() / _US

    def wire_ms(self, seconds: float) -> int:
        """Convert server seconds to a wire timestamp in ms."""
        return self.epoch_ms + round(seconds * _US) // 1000


@dataclass(frozen=True)
class _LogNormal:
    mean: float
    sigma: float

    def __call__(self, rng: random.Random) -> float:
        # Pick mu so that the distribution's mean (not its median) is ``mean``.
        mu = math.log(self.mean) - self.sigma**2 / 2
        return rng.lognormvariate(mu, self.sigma)


@dataclass(frozen=True)
class _Uniform:
    low: float
    high: float

    def __call__(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


@dataclass(frozen=True)
class _Fixed:
    seconds: float

    def __call__(self, rng: random.Random) -> float:
        return self.seconds


@dataclass(frozen=True)
class _HeavyTailed:
    low: float
    high: float
    alpha: float

    def __call__(self, rng: random.Random) -> float:
        # Inverse CDF of a Pareto(alpha) truncated to [low, high].
        u = rng.random()
        tail = 1.0 - (self.low / self.high) ** self.alpha
        return float(self.low / (1.0 - u * tail) ** (1.0 / self.alpha))


def lognormal(mean: float = 180.0, sigma: float = 0.4) -> GenerationTime:
    """Return log-normal generation times with the given mean (s) and log-sigma.

    >>> lognormal(180.0, 0.4)(random.Random(0)) > 0
    True
    """
    if mean <= 0 or sigma < 0:
        raise ValueError("lognormal needs mean > 0 and sigma >= 0")
    return _LogNormal(mean, sigma)


def uniform(low: float, high: float) -> GenerationTime:
    """Return generation times drawn uniformly from ``[low, high]`` seconds."""
    if not 0 <= low <= high:
        raise ValueError("uniform needs 0 <= low <= high")
    return _Uniform(low, high)


def fixed(seconds: float) -> GenerationTime:
    """Return the same generation time, ``seconds``, for every task."""
    if seconds < 0:
        raise ValueError("fixed needs seconds >= 0")
    return _Fixed(seconds)


def heavy_tailed(low: float = 60.0, high: float = 900.0, alpha: float = 1.2) -> GenerationTime:
    """Return Pareto(``alpha``) generation times truncated to ``[low, high]`` seconds."""
    if not 0 < low < high or alpha <= 0:
        raise ValueError("heavy_tailed needs 0 < low < high and alpha > 0")
    return _HeavyTailed(low, high, alpha)
