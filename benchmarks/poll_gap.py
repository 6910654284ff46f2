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

    python benchmarks/poll_gap.py [--scenario NAME] [--seeds 6] [--scale 2 4]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from poll_limit import _cdf, poll_limit

from sora_async.testing import GenerationTime

RESULTS = Path(__file__).parent / "results"
_STEP = 0.05  # grid step of the survival table, s
_MIN_HAZARD = 0.005
_FLOOR = 1.0  # s between polls of one task


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


@dataclass(frozen=True)
class Outcome:
    """One modelled run."""

    utilisation: float
    detect_mean_s: float
    polls_per_task: float


def model(
    generation: GenerationTime,
    survival: Survival,
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

    def eligible_at(task: _Task) -> float:
        seen_age = task.seen - task.start
        ripe = survival.age_below(survival.at(seen_age)[0] * (1.0 - _MIN_HAZARD))
        return max(task.seen + _FLOOR, task.start + ripe)

    def accrued(task: _Task) -> float:
        seen_age, age = task.seen - task.start, now - task.start
        before, before_area = survival.at(seen_age)
        area = survival.at(age)[1]
        waited = (age - seen_age) * before - (area - before_area)
        return waited / before if before > 0 else age - seen_age

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
        wanted = min((eligible_at(task) for task in active), default=float("inf"))
        chances = [max(grant, wanted)]
        if waiting:
            chances.append(sent[len(sent) - requests] + window)
        step = min(chances)
        if step > now + 1e-9:
            now = step
            continue
        if waiting:
            continue  # the create goes first
        ready = [task for task in active if eligible_at(task) <= now + 1e-9]
        task = max(ready, key=accrued)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="fast mean 60 s")
    parser.add_argument("--videos", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--scale", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    from utilization import SCENARIOS  # the benchmark's scenarios

    generation = SCENARIOS[args.scenario](args.videos)[1]
    survival = Survival(generation)
    limit = poll_limit(generation)
    print(
        f"{args.scenario}: limit {limit.utilisation:.4f} (detection {limit.delay:.2f} s, "
        f"{limit.polls:.2f} polls per task)\n"
        "| slots | requests/min | margin s | create reserve | utilisation | gap "
        f"| detect mean s | polls per task |\n|{'---|' * 8}"
    )
    # As the client is; without the margin; without the create reserve (creates then wait
    # for a place); k times the slots and requests; and at the largest k, one place kept.
    cases = [(1, 1.0, 1), (1, 0.0, 1), (1, 0.0, 0)]
    cases += [(k, 0.0, k) for k in args.scale if k > 1] + [(max(args.scale), 0.0, 1)]
    rows = []
    for k, margin, reserve in cases:
        runs = [
            model(
                generation,
                survival,
                slots=10 * k,
                requests=60 * k,
                margin=margin,
                reserve=reserve,
                videos=args.videos * k,
                seed=seed,
            )
            for seed in range(1, args.seeds + 1)
        ]
        share = statistics.fmean(run.utilisation for run in runs)
        row = {
            "scenario": args.scenario,
            "slots": 10 * k,
            "requests": 60 * k,
            "margin_s": margin,
            "reserve": reserve,
            "utilisation": share,
            "utilisation_se": statistics.stdev(run.utilisation for run in runs) / len(runs) ** 0.5,
            "gap": limit.utilisation - share,
            "detect_mean_s": statistics.fmean(run.detect_mean_s for run in runs),
            "polls_per_task": statistics.fmean(run.polls_per_task for run in runs),
            "limit": limit.utilisation,
            "seeds": args.seeds,
        }
        rows.append(row)
        print(
            f"| {10 * k} | {60 * k} | {margin:g} | {reserve} | {share:.4f} "
            f"± {row['utilisation_se']:.4f} | {row['gap']:.4f} | {row['detect_mean_s']:.2f} "
            f"| {row['polls_per_task']:.2f} |",
            flush=True,
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "poll_gap.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
