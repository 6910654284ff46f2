"""The physical limit of polling: the best slot utilisation any client could reach.

A slot cycles through a create, a generation ``T ~ F`` and polls until one sees the
end. A poll's only news is "not yet", so one task's poll schedule is a fixed list of
ages. Pricing each poll at ``lam`` seconds of delay, the best schedule solves a
dynamic programme on a grid of ages (step ``h``):

    W(s) = min over u > s of [lam * S(s) + integral_s^u (u - t) f(t) dt + W(u)]

with ``S = 1 - F``: from the last poll at age ``s`` (the task still running), the
next poll at ``u`` is paid with probability ``S(s)`` and every end in ``(s, u]``
waits until ``u``. ``lam`` is bisected until the polls meet the budget,
``slots * (1 + E[polls]) / (E[T] + E[D]) = rate``, and the limit is
``E[T] / (E[T] + E[D])``. Slots never collide for a request here and a create
follows the poll that saw the end at once, so no client can beat the limit.

    python benchmarks/poll_limit.py [--margin 1.0]
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sora_async.testing import GenerationTime
from sora_async.testing._timing import _Fixed, _HeavyTailed, _LogNormal, _Uniform

__all__ = ["Limit", "poll_limit"]

Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
# Ages past this survival are left out of the grid (unbounded distributions).
_TAIL = 1e-7
# Draws used to estimate the distribution of a generation time of unknown form.
_SAMPLES = 400_000


@dataclass(frozen=True)
class Limit:
    """The best one-task poll schedule that meets the request budget."""

    mean_time: float  # E[T], s
    polls: float  # E[polls] per task
    delay: float  # E[D], mean detection delay, s
    price: float  # lam, s of delay one poll is worth at the budget
    schedule: tuple[float, ...]  # poll ages, s

    @property
    def utilisation(self) -> float:
        """Return the share of slot-time spent generating: E[T] / (E[T] + E[D])."""
        return self.mean_time / (self.mean_time + self.delay)


def _cdf(generation: GenerationTime, h: float) -> Array:
    """Return F on the grid 0, h, 2h, ... up to where (almost) every task has ended."""
    if isinstance(generation, _LogNormal):
        mu = math.log(generation.mean) - generation.sigma**2 / 2
        sigma = max(generation.sigma, 1e-9)
        top = math.exp(mu + sigma * 5.4)  # S(top) ~ 3e-8
        ages = np.arange(0.0, top + h, h)
        z = (np.log(np.maximum(ages, 1e-300)) - mu) / (sigma * math.sqrt(2))
        cdf: Array = 1.0 - 0.5 * np.array([math.erfc(v) for v in z])
        cdf[0] = 0.0
        return cdf
    if isinstance(generation, _Uniform):
        ages = np.arange(0.0, generation.high + 2 * h, h)
        width = max(generation.high - generation.low, 1e-9)
        cdf = np.clip((ages - generation.low) / width, 0.0, 1.0)
        return cdf
    if isinstance(generation, _Fixed):
        ages = np.arange(0.0, generation.seconds + 2 * h, h)
        return (ages >= generation.seconds).astype(np.float64)
    if isinstance(generation, _HeavyTailed):
        low, high, alpha = generation.low, generation.high, generation.alpha
        ages = np.arange(0.0, high + 2 * h, h)
        clipped: Array = np.clip(ages, low, high)
        cdf = (1.0 - (low / clipped) ** alpha) / (1.0 - (low / high) ** alpha)
        return cdf
    # Any other callable: estimate F from seeded draws.
    rng = random.Random(0)
    draws = np.sort(np.array([generation(rng) for _ in range(_SAMPLES)]))
    ages = np.arange(0.0, float(draws[-1]) + 2 * h, h)
    counts: Array = np.searchsorted(draws, ages, side="right").astype(np.float64)
    return counts / len(draws)


def _moments(cdf: Array, h: float) -> tuple[Array, Array, Array]:
    """Return the grid ages, the first moment of T up to each age, and S."""
    ages = np.arange(len(cdf), dtype=np.float64) * h
    mass = np.diff(cdf, prepend=0.0)  # P(T in (t_{j-1}, t_j])
    middle = ages - h / 2  # where an end in that interval falls on average
    return ages, np.cumsum(mass * middle), 1.0 - cdf


def _choices(cdf: Array, h: float, lam: float) -> IntArray:
    """Return, for each grid age of a poll that saw the task running, the grid age of
    the next poll in the best schedule at price ``lam``."""
    n = len(cdf) - 1
    ages, moment, survival = _moments(cdf, h)
    value = np.zeros(n + 1)
    choice = np.full(n + 1, n, dtype=np.int64)
    for a in range(n - 1, -1, -1):
        b = np.arange(a + 1, n + 1)
        # integral_s^u (u - t) f(t) dt, from cumulative mass and first moment.
        wait = ages[b] * (cdf[b] - cdf[a]) - (moment[b] - moment[a])
        total = wait + value[b]
        best = int(np.argmin(total))
        value[a] = lam * survival[a] + total[best]
        choice[a] = a + 1 + best
    return choice


def _solve(cdf: Array, h: float, lam: float) -> tuple[float, float, list[int]]:
    """Return E[polls], E[D] and the poll ages (grid indices) of the best schedule at ``lam``."""
    n = len(cdf) - 1
    ages, moment, survival = _moments(cdf, h)
    choice = _choices(cdf, h, lam)
    polls, delay, at, schedule = 0.0, 0.0, 0, []
    while at < n:
        nxt = int(choice[at])
        polls += survival[at]
        delay += ages[nxt] * (cdf[nxt] - cdf[at]) - (moment[nxt] - moment[at])
        schedule.append(nxt)
        at = nxt
    return float(polls), float(delay), schedule


def poll_limit(
    generation: GenerationTime,
    *,
    slots: int = 10,
    requests: int = 60,
    period: float = 60.0,
    h: float = 0.25,
) -> Limit:
    """Return the utilisation limit for ``generation`` at ``requests`` per ``period``."""
    cdf = _cdf(generation, h)
    ages = np.arange(len(cdf)) * h
    mean_time = float(np.sum(np.diff(cdf, prepend=0.0) * (ages - h / 2)).clip(0.0))
    rate = requests / period

    def fits(polls: float, delay: float) -> bool:
        return slots * (1.0 + polls) <= rate * (mean_time + delay)

    low, high = math.log(1e-4), math.log(1e5)  # log lam
    best = _solve(cdf, h, math.exp(high))
    if fits(*best[:2]):
        for _ in range(36):
            middle = (low + high) / 2
            trial = _solve(cdf, h, math.exp(middle))
            if fits(*trial[:2]):
                high, best = middle, trial
            else:
                low = middle
    polls, delay, schedule = best
    return Limit(mean_time, polls, delay, math.exp(high), tuple(ages[i] for i in schedule))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--margin", type=float, default=0.0, help="jitter margin, s")
    parser.add_argument("--step", type=float, default=0.25, help="grid step, s")
    args = parser.parse_args()
    from utilization import SCENARIOS  # the benchmark's scenarios (it imports this module)

    print(
        "| scenario | E[T] s | polls per task | best mean detection delay s | limit utilisation |"
        f"\n|{'---|' * 5}"
    )
    for name, scenario in SCENARIOS.items():
        limit = poll_limit(scenario(500)[1], period=60.0 + args.margin, h=args.step)
        print(
            f"| {name} | {limit.mean_time:.0f} | {limit.polls:.1f} | {limit.delay:.2f} "
            f"| {limit.utilisation:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
