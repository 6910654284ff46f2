"""The learned model of generation times that the poll scheduler plans with.

A log-normal fit (starting from the policy's prior) blended with the finished tasks'
own sorted durations: the fit carries the tails and the first minutes, the sample
the shape that a log-normal misses (a hard floor, a tight spread, a heavy tail).
"""

from __future__ import annotations

import bisect
import collections
import math
from statistics import NormalDist
from typing import Protocol

__all__ = ["GenerationTimes"]

_STANDARD_NORMAL = NormalDist()
_SQRT2 = math.sqrt(2.0)
# The log-normal fit weighs like this many durations against the sample.
_FIT_WEIGHT = 20.0


class _Prior(Protocol):
    @property
    def prior_mean(self) -> float: ...
    @property
    def prior_sigma(self) -> float: ...
    @property
    def prior_weight(self) -> float: ...
    @property
    def history(self) -> int: ...


class GenerationTimes:
    """A model of generation times, learned from finished tasks."""

    def __init__(self, policy: _Prior) -> None:
        self._policy = policy
        self._recent: collections.deque[float] = collections.deque(maxlen=policy.history)
        self._logs: collections.deque[float] = collections.deque(maxlen=policy.history)
        self._log_sum = 0.0  # running sums of the remembered logs, for the fit
        self._log_squares = 0.0
        self._sorted: list[float] = []
        self._points: list[float] = []  # the sample the blend uses (rebuilt now and then)
        self._areas: list[float] = []  # integral of the sample's survival up to each point
        self._stale = 0  # durations learned since the sample was rebuilt
        self._fit = 1.0  # the log-normal fit's share of the blend
        self._fit_mean = 0.0
        #: Changes whenever the model does (callers may cache what it told them).
        self.version = 0
        self.mu = 0.0
        self.sigma = 0.0
        self._refit()

    def observe(self, seconds: float) -> None:
        """Learn one finished generation's duration."""
        if seconds > 0:
            if len(self._recent) == self._recent.maxlen:
                del self._sorted[bisect.bisect_left(self._sorted, self._recent[0])]
                self._log_sum -= self._logs[0]
                self._log_squares -= self._logs[0] ** 2
            log = math.log(seconds)
            self._recent.append(seconds)
            self._logs.append(log)
            self._log_sum += log
            self._log_squares += log * log
            bisect.insort(self._sorted, seconds)
            self._stale += 1
            self._refit()

    @property
    def count(self) -> int:
        """Return how many durations were learned."""
        return len(self._logs)

    @property
    def mean(self) -> float:
        """Return the log-normal fit's mean generation time in seconds."""
        return math.exp(self.mu + self.sigma**2 / 2)

    def _refit(self) -> None:
        # Conjugate-style blend: the prior counts as ``prior_weight`` observations.
        policy = self._policy
        prior_mu = math.log(policy.prior_mean) - policy.prior_sigma**2 / 2
        weight = policy.prior_weight
        count = len(self._logs)
        total = weight + count
        mu = (weight * prior_mu + self._log_sum) / total
        spread = weight * (policy.prior_sigma**2 + (prior_mu - mu) ** 2)
        # sum((x - mu)^2) from the running sums (never below 0 for rounding).
        spread += max(0.0, self._log_squares - 2 * mu * self._log_sum + count * mu * mu)
        self.mu = mu
        self.sigma = max(0.05, math.sqrt(spread / total))
        self._fit_mean = math.exp(mu + self.sigma**2 / 2)
        self.version += 1
        # The sample moves little with one more duration: rebuild it when it has grown
        # by 2% (every time while it is small), so learning stays cheap per task.
        if self._stale * 50 >= len(self._sorted):
            self._rebuild()

    def _rebuild(self) -> None:
        # The sample's survival falls linearly from 1 at its least to 0 at its most.
        self._stale = 0
        points = self._points = list(self._sorted)
        steps = len(points) - 1
        self._fit = 1.0 if steps < 1 else _FIT_WEIGHT / (_FIT_WEIGHT + len(points))
        if steps >= 1:
            areas = [points[0]]
            for i in range(steps):
                mid = 1.0 - (i + 0.5) / steps
                areas.append(areas[-1] + (points[i + 1] - points[i]) * mid)
            self._areas = areas

    def _sample_survival(self, age: float) -> tuple[float, float]:
        """Return the sample's survival at ``age`` and its integral from 0 to ``age``."""
        points = self._points
        if age < points[0]:
            return 1.0, max(age, 0.0)
        if age >= points[-1]:
            return 0.0, self._areas[-1]
        i = bisect.bisect_right(points, age) - 1
        steps = len(points) - 1
        low, high = points[i], points[i + 1]
        left = 1.0 - i / steps
        here = left - (age - low) / ((high - low) * steps)
        return here, self._areas[i] + (age - low) * (left + here) / 2

    def at(self, age: float) -> tuple[float, float]:
        """Return P(generation time > age) and E[min(generation time, age)] together."""
        if age <= 0:
            return 1.0, 0.0
        # One logarithm for both parts of the fit: this runs for every task, every poll.
        z = (math.log(age) - self.mu) / (self.sigma * _SQRT2)
        fit = 0.5 * math.erfc(z)
        partial = 0.5 * math.erfc(self.sigma / _SQRT2 - z)
        area = age * fit + self._fit_mean * partial
        if self._fit >= 1.0:
            return fit, area
        sample, sample_area = self._sample_survival(age)
        share = self._fit
        return share * fit + (1.0 - share) * sample, share * area + (1.0 - share) * sample_area

    def survival(self, age: float) -> float:
        """Return P(generation time > age)."""
        return self.at(age)[0]

    def mean_min(self, age: float) -> float:
        """Return E[min(generation time, age)], the integral of survival from 0 to ``age``."""
        return self.at(age)[1]

    def age_at_survival(self, survival: float) -> float:
        """Return the age at which P(generation time > age) falls to ``survival``."""
        survival = min(max(survival, 1e-12), 1 - 1e-12)
        fit = math.exp(self.mu + self.sigma * _STANDARD_NORMAL.inv_cdf(1 - survival))
        if self._fit >= 1.0:
            return fit
        # Past both the fit's age and the sample's largest, the blend is below target.
        low, high = 0.0, max(fit, self._points[-1])
        for _ in range(40):
            middle = (low + high) / 2
            if self.survival(middle) > survival:
                low = middle
            else:
                high = middle
            if high - low < 1e-3:
                break
        return high
