"""Where the gap to the polling limit goes: a model of slots sharing one request budget.

The limit (``poll_limit.py``) prices each poll and lets every slot poll on a schedule of
its own, as if no two slots ever wanted a request at the same moment. A client has one
stream of permits for its ten slots. This model replays sora-async's rules, with the true
distribution of generation times known (nothing learned), event by event:

- the governor (``LocalGovernor``): at most ``requests`` sends in any window of
  ``period + margin`` seconds; polls take at most ``requests - reserve`` places of it
  and go at least ``(period + margin) / (requests - 1)`` seconds apart; a create goes
  first, as soon as the window has a place;
- the scheduler (``PollScheduler._choose``): each permit goes to the task with the
  largest expected accrued delay, among tasks last seen at least 1 s ago whose chance of
  having ended unseen reaches 0.005.

Changing one thing at a time splits the gap:

- ``margin`` 1 s -> 0 s: what the jitter margin costs;
- ``k`` x 10 slots with ``k`` x 60 requests a minute (the same budget per slot, so the
  same limit): as ``k`` grows, the slots' wishes average out over a denser permit stream.
  The model at ``k = 1`` against the largest ``k`` is what ten slots sharing one permit
  stream cost (collisions); at the largest ``k``, a reserve of ``k`` places against one
  is what the create reserve costs, and the rest against the limit is the scheduler's
  rule and what collisions remain at that ``k``;
- the measured utilisation (``utilization.py``) against the model at ``k = 1``,
  ``margin`` 1 s: learning the distribution from the prior, and the model's own noise.

The same rows with the scheduler's rule replaced by the Whittle index (``IndexRule``,
the best known online policy for such restless bandits: each task's own best schedule
at every price of a poll, the permit to the task that would pay the most for it) say
how much of the gap one permit stream costs a client whatever its rule. Each index
row is also compared run by run with the client's rule at the same seeds.

    python benchmarks/poll_gap.py [--scenario NAME] [--seeds 6] [--scale 2 4]
                                  [--policy client --policy index]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from poll_limit import _cdf, _choices, poll_limit

from sora_async.testing import GenerationTime

RESULTS = Path(__file__).parent / "results"
_STEP = 0.05  # grid step of the survival table, s
_MIN_HAZARD = 0.005
_FLOOR = 1.0  # s between polls of one task
_INDEX_STEP = 0.25  # grid step of the index policy's one-task programmes, s
# Prices of a poll (s of delay) at which the index policy solves the one-task programme.
_PRICES = tuple(float(x) for x in np.geomspace(0.02, 2000.0, 80))


class Survival:
    """S(age) and its integral from 0 to age, from a fine grid of the distribution."""

    def __init__(self, generation: GenerationTime) -> None:
        cdf = _cdf(generation, _STEP)
        survival = 1.0 - cdf
        self.survival = [float(x) for x in survival]
        steps = (survival[:-1] + survival[1:]) / 2 * _STEP
        self.area = [0.0, *(float(x) for x in np.cumsum(steps))]
        self.top = len(self.survival) - 1
        self._falling = [-x for x in self.survival]  # ascending, for bisect

    def at(self, age: float) -> tuple[float, float]:
        """Return S(age) and the integral of S from 0 to age."""
        i = int(age / _STEP)
        if i >= self.top:
            return 0.0, self.area[-1]
        return self.survival[i], self.area[i]

    def age_below(self, level: float) -> float:
        """Return the first grid age at which S falls to ``level`` or below."""
        return bisect.bisect_left(self._falling, -level) * _STEP


@dataclass
class _Task:
    start: float
    length: float
    seen: float  # last time a poll saw it running


class Rule(Protocol):
    """How the modelled scheduler picks the task a permit goes to."""

    def due(self, task: _Task) -> float:
        """Return the first time the rule would spend a permit on ``task``."""
        ...

    def score(self, task: _Task, now: float) -> float:
        """Return the rank of ``task`` at ``now`` among due tasks (largest first)."""
        ...


class ClientRule:
    """The client's rule: the largest expected accrued delay among tasks whose chance of
    having ended unseen reaches 0.005."""

    def __init__(self, generation: GenerationTime) -> None:
        self.survival = Survival(generation)

    def due(self, task: _Task) -> float:
        """Return when ``task``'s chance of an unseen end reaches the threshold."""
        seen_age = task.seen - task.start
        survival = self.survival
        ripe = survival.age_below(survival.at(seen_age)[0] * (1.0 - _MIN_HAZARD))
        return max(task.seen + _FLOOR, task.start + ripe)

    def score(self, task: _Task, now: float) -> float:
        """Return the expected delay ``task`` has accrued since it was last seen."""
        seen_age, age = task.seen - task.start, now - task.start
        before, before_area = self.survival.at(seen_age)
        area = self.survival.at(age)[1]
        waited = (age - seen_age) * before - (area - before_area)
        return waited / before if before > 0 else age - seen_age


class IndexRule:
    """The Whittle index: for each price ``lam`` of a poll, the best one-task schedule
    (``poll_limit``'s programme) gives ``next(s, lam)``, the age of the next poll after
    one that saw the task running at age ``s``. A task seen at ``s`` and now at age
    ``a`` is worth the largest ``lam`` with ``next(s, lam) <= a``: the price up to
    which polling it now is part of the best schedule. Each permit goes to the largest
    index; the index is interpolated in log ``lam`` between grid prices, so that tasks
    rarely tie."""

    def __init__(
        self,
        generation: GenerationTime,
        *,
        step: float = _INDEX_STEP,
        prices: tuple[float, ...] = _PRICES,
    ) -> None:
        cdf = _cdf(generation, step)
        table = np.array([_choices(cdf, step, lam) for lam in prices])
        # A dearer poll never comes sooner; argmin ties could break that by a grid step.
        table = np.maximum.accumulate(table, axis=0) * step
        self.nexts = [[float(x) for x in column] for column in table.T]  # [s][lam]
        self.top = len(self.nexts) - 1
        self.step = step
        self.logs = [math.log(lam) for lam in prices]

    def _column(self, task: _Task) -> list[float]:
        return self.nexts[min(round((task.seen - task.start) / self.step), self.top)]

    def due(self, task: _Task) -> float:
        """Return when ``task``'s index reaches the cheapest price."""
        return max(task.seen + _FLOOR, task.start + self._column(task)[0])

    def score(self, task: _Task, now: float) -> float:
        """Return the log of ``task``'s index at ``now``."""
        column, age = self._column(task), now - task.start + 1e-9
        j = bisect.bisect_right(column, age) - 1
        if j < 0:
            return -math.inf
        if j + 1 == len(column):
            return self.logs[-1]
        low, high = column[j], column[j + 1]
        # Ages between two prices' next polls are ranked linearly in log price.
        part = (age - low) / (high - low) if high > low else 0.0
        return self.logs[j] + part * (self.logs[j + 1] - self.logs[j])


@dataclass(frozen=True)
class Outcome:
    """One modelled run."""

    utilisation: float
    detect_mean_s: float
    polls_per_task: float


def model(
    generation: GenerationTime,
    rule: Rule,
    *,
    slots: int = 10,
    requests: int = 60,
    period: float = 60.0,
    margin: float = 1.0,
    reserve: int = 1,
    videos: int = 500,
    seed: int = 1,
) -> Outcome:
    """Return the slot utilisation of one modelled run (measured as utilization.py does)."""
    rng = random.Random(seed)
    window = period + margin
    spacing = window / (requests - 1)
    sent: collections.deque[float] = collections.deque()
    last_poll = -spacing
    now, created, waiting, polls = 0.0, 0, min(slots, videos), 0
    active: list[_Task] = []
    ended: list[tuple[float, float, float]] = []  # start, length, seen to end at

    while created < videos or active:
        while sent and sent[0] + window <= now + 1e-9:
            sent.popleft()
        if waiting and len(sent) < requests:
            sent.append(now)
            waiting, created = waiting - 1, created + 1
            active.append(_Task(now, float(generation(rng)), now))
            continue
        # When the governor next grants a poll, and when the scheduler next wants one.
        grant = last_poll + spacing
        if len(sent) >= requests - reserve:
            grant = max(grant, sent[len(sent) - (requests - reserve)] + window)
        wanted = min((rule.due(task) for task in active), default=float("inf"))
        chances = [max(grant, wanted)]
        if waiting:
            chances.append(sent[len(sent) - requests] + window)
        step = min(chances)
        if step > now + 1e-9:
            now = step
            continue
        if waiting:
            continue  # the create goes first
        ready = [task for task in active if rule.due(task) <= now + 1e-9]
        task = max(ready, key=lambda task: rule.score(task, now))
        sent.append(now)
        last_poll, polls = now, polls + 1
        if now - task.start >= task.length:
            active.remove(task)
            ended.append((task.start, task.length, now))
            waiting += created < videos
        else:
            task.seen = now
    starts = sorted(start for start, _, _ in ended)
    first, last = starts[0], starts[-1]
    busy = sum(max(0.0, min(s + t, last) - max(s, first)) for s, t, _ in ended)
    delay = statistics.fmean(seen - s - t for s, t, seen in ended)
    return Outcome(busy / (slots * (last - first)), delay, polls / videos)


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Return the mean of ``values`` and its standard error."""
    return statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5


def _cases(policy: str, scale: list[int]) -> list[tuple[int, float, int]]:
    """Return the (k, margin, reserve) rows of one policy."""
    ks = sorted(k for k in scale if k > 1)
    # As the client is; without the margin; without the create reserve (creates then wait
    # for a place; the client's rule only); k times the slots and requests; and at the
    # largest k, one place kept.
    bare = [(1, 0.0, 0)] if policy == "client" else []
    scaled = [(k, 0.0, k) for k in ks] + [(k, 0.0, 1) for k in ks[-1:]]
    return [(1, 1.0, 1), (1, 0.0, 1), *bare, *scaled]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="fast mean 60 s")
    parser.add_argument("--videos", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--scale", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--policy", choices=["client", "index"], action="append", help="default: both"
    )
    args = parser.parse_args()
    from utilization import SCENARIOS  # the benchmark's scenarios

    generation = SCENARIOS[args.scenario](args.videos)[1]
    limit = poll_limit(generation)
    print(
        f"{args.scenario}: limit {limit.utilisation:.4f} (detection {limit.delay:.2f} s, "
        f"{limit.polls:.2f} polls per task)\n"
        "| policy | slots | requests/min | margin s | create reserve | utilisation | gap "
        f"| against the client's rule | detect mean s | polls per task |\n|{'---|' * 10}"
    )
    rows = []
    # The same seed draws the same generation times in the same order of creates, so
    # policies are compared run by run (paired), which cancels most of the seeds' noise.
    client: dict[tuple[int, float, int], list[float]] = {}
    for policy in args.policy or ["client", "index"]:
        rule: Rule = ClientRule(generation) if policy == "client" else IndexRule(generation)
        for k, margin, reserve in _cases(policy, args.scale):
            runs = [
                model(
                    generation,
                    rule,
                    slots=10 * k,
                    requests=60 * k,
                    margin=margin,
                    reserve=reserve,
                    videos=args.videos * k,
                    seed=seed,
                )
                for seed in range(1, args.seeds + 1)
            ]
            shares = [run.utilisation for run in runs]
            share, spread = _mean_se(shares)
            if policy == "client":
                client[k, margin, reserve] = shares
            base = client.get((k, margin, reserve))
            gain = _mean_se([a - b for a, b in zip(shares, base, strict=True)]) if base else None
            row = {
                "scenario": args.scenario,
                "policy": policy,
                "slots": 10 * k,
                "requests": 60 * k,
                "margin_s": margin,
                "reserve": reserve,
                "utilisation": share,
                "utilisation_se": spread,
                "gap": limit.utilisation - share,
                "detect_mean_s": statistics.fmean(run.detect_mean_s for run in runs),
                "polls_per_task": statistics.fmean(run.polls_per_task for run in runs),
                "limit": limit.utilisation,
                "seeds": args.seeds,
                "utilisations": shares,
            }
            if gain and policy != "client":
                row["against_client"], row["against_client_se"] = gain
            rows.append(row)
            against = f"{gain[0]:+.4f} ± {gain[1]:.4f}" if gain and policy != "client" else "-"
            print(
                f"| {policy} | {10 * k} | {60 * k} | {margin:g} | {reserve} | {share:.4f} "
                f"± {spread:.4f} | {row['gap']:.4f} | {against} | {row['detect_mean_s']:.2f} "
                f"| {row['polls_per_task']:.2f} |",
                flush=True,
            )
    # One file for every scenario: this run replaces its scenario's rows at its seeds.
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "poll_gap.json"
    kept = json.loads(path.read_text()) if path.exists() else []
    kept = [row for row in kept if (row["scenario"], row["seeds"]) != (args.scenario, args.seeds)]
    path.write_text(json.dumps(kept + rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
