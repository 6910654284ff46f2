"""Slot utilisation of sora-async against the hand-written baselines, in virtual time.

For each scenario of generation times, 500 videos are made at the real limits (60
requests a minute, 10 tasks) against the fake service, by sora-async and by two
baselines a user would write by hand:

- recipe: the provider's advice (wait 120 s, then poll every 5 s) behind
  ``AsyncLimiter(60, 60)`` and a semaphore of 10;
- poll-1s: fixed 1-s polling behind a correct limiter and a semaphore of 10;

and by sora-async in callback mode, with every callback delivered and with 30% lost.

Everything is measured on the fake server's side. Slot utilisation is the share of
slot-time in which the server generates for us while prompts still wait for a slot
(from the first create to the last: the drain at the end is nobody's waste); the
makespan is set against its lower bound, the sum of generation times / 10.
Detection delay is the time from a task's end to the first answer that shows it.

Beside each scenario stands its limit (``poll_limit.py``): the utilisation of the
best poll schedule any client could follow within the budget, and the gap to it.
In the shifting scenario the mean moves from 180 s to 300 s halfway through the
videos; its utilisation is measured after the shift, against the limit for 300 s.

With ``--seeds N`` each figure is the mean over the seeds 1..N (the runs go to
``--jobs`` processes), and the utilisation's standard error stands beside it: one
seed's utilisation moves by about 0.002 between seeds. Answers on loopback take no
virtual time, so the governor learns a jitter margin of 50 ms; ``--network-delay D``
makes every request take U(0, D) s to the fake and as long back (figures then go to
``results/utilization-network-Ds.json``).

    python benchmarks/utilization.py [--videos 500] [--seeds 5] [--scenario NAME ...]
        [--network-delay 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import looptime
from aiohttp import web
from aiolimiter import AsyncLimiter
from poll_limit import poll_limit

import sora_async as sa
import sora_async.webhook
from sora_async.testing import (
    FakeApixo,
    GenerationTime,
    TaskRecord,
    heavy_tailed,
    lognormal,
    uniform,
)

RESULTS = Path(__file__).parent / "results"


class Shift:
    """Generation times whose distribution changes after ``after`` draws."""

    def __init__(self, before: GenerationTime, after: GenerationTime, draws: int) -> None:
        self.before, self.after, self.draws, self.drawn = before, after, draws, 0

    def __call__(self, rng: random.Random) -> float:
        self.drawn += 1
        return (self.before if self.drawn <= self.draws else self.after)(rng)


# Each scenario: its generation times for a run of n videos, and what its limit is
# computed for (after the shift, for the shifting one), with the create index from
# which utilisation is measured.
Scenario = Callable[[int], tuple[GenerationTime, GenerationTime, int]]
SCENARIOS: dict[str, Scenario] = {
    "lognormal mean 180 s": lambda n: (lognormal(180.0, 0.4), lognormal(180.0, 0.4), 0),
    "fast mean 60 s": lambda n: (lognormal(60.0, 0.4), lognormal(60.0, 0.4), 0),
    "heavy-tailed 60-900 s": lambda n: (heavy_tailed(60.0, 900.0), heavy_tailed(60.0, 900.0), 0),
    "uniform 150-210 s": lambda n: (uniform(150.0, 210.0), uniform(150.0, 210.0), 0),
    "mean 180 s, then 300 s": lambda n: (
        Shift(lognormal(180.0, 0.4), lognormal(300.0, 0.4), n // 2),
        lognormal(300.0, 0.4),
        n // 2,
    ),
}
Contender = Callable[[FakeApixo, list[str]], Awaitable[None]]


async def run_sora_async(fake: FakeApixo, prompts: list[str]) -> None:
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        requests = [sa.TextToVideo(prompt=p, duration=10) for p in prompts]
        async for outcome in client.generate_many(requests):
            assert outcome.ok, outcome.error


async def _with_callbacks(fake: FakeApixo, prompts: list[str], loss: float) -> None:
    """sora-async in callback mode, its receiver on loopback; ``loss`` of callbacks dropped."""
    fake.callback_loss = loss
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = sa.SoraClient(
        api_key=fake.api_key,
        base_url=fake.url,
        callback_url=f"http://127.0.0.1:{port}/apixo/callback",
    )
    runner = web.AppRunner(sora_async.webhook.aiohttp_app(client))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with client:
            requests = [sa.TextToVideo(prompt=p, duration=10) for p in prompts]
            async for outcome in client.generate_many(requests):
                assert outcome.ok, outcome.error
    finally:
        await runner.cleanup()


async def run_callbacks(fake: FakeApixo, prompts: list[str]) -> None:
    await _with_callbacks(fake, prompts, loss=0.0)


async def run_callbacks_lossy(fake: FakeApixo, prompts: list[str]) -> None:
    await _with_callbacks(fake, prompts, loss=0.3)


async def _by_hand(
    fake: FakeApixo,
    prompts: list[str],
    permit: Callable[[], Awaitable[None]],
    first_wait: float,
    interval: float,
) -> None:
    """What a user writes by hand: a semaphore of 10, a limiter, sleep-and-poll."""
    headers = {"Authorization": f"Bearer {fake.api_key}"}
    slots = asyncio.Semaphore(10)
    async with aiohttp.ClientSession(headers=headers) as session:

        async def call(method: str, url: str, **kwargs: Any) -> Any:
            while True:
                await permit()
                async with session.request(method, url, **kwargs) as response:
                    body = await response.json()
                if body["code"] != 429:
                    return body["data"]
                await asyncio.sleep(interval)  # "wait and retry"

        async def one(prompt: str) -> None:
            async with slots:
                body = {
                    "request_type": "async",
                    "input": {"mode": "text-to-video", "prompt": prompt, "duration": 10},
                }
                created = await call("POST", f"{fake.url}/generateTask/sora-2-pro", json=body)
                await asyncio.sleep(first_wait)
                while True:
                    status = await call(
                        "GET",
                        f"{fake.url}/statusTask/sora-2-pro",
                        params={"taskId": created["taskId"]},
                    )
                    if status["state"] in ("success", "failed"):
                        return
                    await asyncio.sleep(interval)

        await asyncio.gather(*(one(p) for p in prompts))


async def run_recipe(fake: FakeApixo, prompts: list[str]) -> None:
    limiter = AsyncLimiter(60, 60)  # the usual choice: admits ~119 in the first minute
    await _by_hand(fake, prompts, limiter.acquire, first_wait=120.0, interval=5.0)


async def run_poll_1s(fake: FakeApixo, prompts: list[str]) -> None:
    governor = sa.LocalGovernor()  # a correct limiter: never over 60 in any minute

    async def permit() -> None:
        await governor.request("status")

    await _by_hand(fake, prompts, permit, first_wait=0.0, interval=1.0)


CONTENDERS: dict[str, Contender] = {
    "sora-async": run_sora_async,
    "sora-async callbacks": run_callbacks,
    "sora-async callbacks, 30% lost": run_callbacks_lossy,
    "recipe 120s+5s": run_recipe,
    "poll-1s": run_poll_1s,
}


def slot_utilisation(
    tasks: Iterable[TaskRecord], start: float, end: float, slots: int = 10
) -> float:
    """Return the share of slot-time in [start, end] (server seconds) spent generating for us."""
    busy = sum(max(0.0, min(t.complete_at, end) - max(t.created_at, start)) for t in tasks)
    return busy / (slots * (end - start))


async def measure(
    scenario: str, contender: Contender, videos: int, seed: int, network_delay: float = 0.0
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    times, _, since = SCENARIOS[scenario](videos)
    async with FakeApixo(
        generation_time=times, seed=seed, balance=1e12, network_delay=network_delay
    ) as fake:
        prompts = [f"video {i}" for i in range(videos)]
        started = loop.time()
        await contender(fake, prompts)
        makespan = loop.time() - started
        tasks = list(fake.tasks.values())
        stats = fake.stats
    generation = sum(t.complete_at - t.created_at for t in tasks)
    # While prompts still wait for a slot, every idle slot-second is the client's waste
    # (detection delay, a late create); the drain at the end is nobody's, so slot
    # utilisation is measured from the first create to the last (from the shift on,
    # when the generation times shift).
    first = sorted(t.created_at for t in tasks)[since]
    last = max(t.created_at for t in tasks)
    delays = sorted(
        t.first_seen_done_at - t.complete_at for t in tasks if t.first_seen_done_at is not None
    )
    lower_bound = generation / 10
    return {
        "utilisation": slot_utilisation(tasks, first, last),
        "detect_mean_s": statistics.fmean(delays),
        "detect_p95_s": delays[int(0.95 * (len(delays) - 1))],
        "requests_per_video": stats.requests / videos,
        "429s": stats.rate_limited,
        "max_in_window": stats.max_requests_in_window,
        "makespan_s": makespan,
        "lower_bound_s": lower_bound,
    }


def run_virtual(coro: Awaitable[Any]) -> Any:
    loop = looptime.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def run_one(job: tuple[str, str, int, int, float]) -> dict[str, Any]:
    """Run one scenario, contender, seed and network delay; return its figures and wall time."""
    scenario, name, videos, seed, network_delay = job
    wall = time.perf_counter()
    result: dict[str, Any] = run_virtual(
        measure(scenario, CONTENDERS[name], videos, seed, network_delay)
    )
    return result | {"wall_s": time.perf_counter() - wall}


def mean_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the seeds' mean of each figure (of the 429s the sum, of the window the worst)."""
    row: dict[str, Any] = {key: statistics.fmean(run[key] for run in runs) for key in runs[0]}
    row["429s"] = sum(run["429s"] for run in runs)
    row["max_in_window"] = max(run["max_in_window"] for run in runs)
    shares = [run["utilisation"] for run in runs]
    row["utilisation_se"] = statistics.stdev(shares) / len(shares) ** 0.5 if len(runs) > 1 else None
    row["utilisation_by_seed"] = shares
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds, from --seed on")
    parser.add_argument("--jobs", type=int, default=2, help="processes running seeds at once")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    parser.add_argument("--contender", action="append", choices=list(CONTENDERS))
    parser.add_argument(
        "--network-delay",
        type=float,
        default=0.0,
        help="each request takes U(0, this) s to the fake and as long back (default 0)",
    )
    args = parser.parse_args()
    delay = args.network_delay
    scenarios = args.scenario or list(SCENARIOS)
    names = args.contender or list(CONTENDERS)
    seeds = range(args.seed, args.seed + args.seeds)
    jobs = [
        (sc, name, args.videos, seed, delay) for sc in scenarios for name in names for seed in seeds
    ]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = dict(zip(jobs, pool.map(run_one, jobs), strict=True))
    rows = []
    print(
        f"| scenario | client | utilisation | limit | gap | detect mean s | detect p95 s "
        f"| req/video | 429s | max req/60s | makespan / bound |\n|{'---|' * 11}"
    )
    for scenario in scenarios:
        limit = poll_limit(SCENARIOS[scenario](args.videos)[1]).utilisation
        for name in names:
            result = mean_of([runs[scenario, name, args.videos, seed, delay] for seed in seeds])
            result |= {
                "scenario": scenario,
                "client": name,
                "limit": limit,
                # The limit is for polling: with callbacks a client is told of ends.
                "gap": None if "callbacks" in name else limit - result["utilisation"],
                "videos": args.videos,
                "seeds": list(seeds),
                "network_delay_s": delay,
            }
            rows.append(result)
            gap = "-" if result["gap"] is None else f"{result['gap']:.4f}"
            spread = (
                "" if result["utilisation_se"] is None else f" ± {result['utilisation_se']:.4f}"
            )
            print(
                f"| {scenario} | {name} | {result['utilisation']:.4f}{spread} "
                f"| {limit:.4f} | {gap} "
                f"| {result['detect_mean_s']:.1f} | {result['detect_p95_s']:.1f} "
                f"| {result['requests_per_video']:.1f} | {result['429s']} "
                f"| {result['max_in_window']} "
                f"| {result['makespan_s']:.0f} / {result['lower_bound_s']:.0f} s |",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    name = "utilization.json" if delay == 0 else f"utilization-network-{delay:g}s.json"
    (RESULTS / name).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
