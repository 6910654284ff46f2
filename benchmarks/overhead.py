"""What the client costs in real time: CPU, memory and throughput, against raw aiohttp.

- CPU per task life cycle: submit + wait until done (generation time 0), with the
  limits lifted, against raw aiohttp making the same create and status requests
  (in alternating rounds, so that a change in the machine's load weighs on both).
- Memory per queued awaitable: 100,000 ``generate()`` calls waiting for a slot
  (tracemalloc, per call, including the caller's own asyncio Task).
- Requests per second, limits lifted: ``client.status()`` against raw aiohttp GETs
  decoded with the json module, same fake, same concurrency.

Both sides share one process and loop with the fake service, so ratios matter,
not absolutes. Medians over ``--repeats`` runs.

    python benchmarks/overhead.py [--repeats 3] [--queued 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

import sora_async as sa
from sora_async.testing import FakeApixo, fixed

RESULTS = Path(__file__).parent / "results"
UNLIMITED = sa.Limits(requests=10**9, period=1.0, concurrent_tasks=10**6)
CONCURRENCY = 32


def lifted_fake(generation: float = 0.0) -> FakeApixo:
    return FakeApixo(
        requests=10**9,
        concurrent_tasks=10**9,
        generation_time=fixed(generation),
        pending_time=0.0,
        balance=1e15,
    )


def lifted_client(fake: FakeApixo, limits: sa.Limits = UNLIMITED) -> sa.SoraClient:
    return sa.SoraClient(
        api_key=fake.api_key,
        base_url=fake.url,
        limits=limits,
        governor=sa.LocalGovernor(limits, jitter_margin=0.0),
        # Generation takes no time here: poll at once, no floor to speak of.
        poll_policy=sa.PollPolicy(prior_mean=0.01, min_interval=0.0, min_hazard=0.0),
    )


async def gather_limited(count: int, job: Callable[[int], Awaitable[None]]) -> None:
    """Run ``job(0..count-1)`` with CONCURRENCY workers."""
    queue = iter(range(count))

    async def worker() -> None:
        for index in queue:
            await job(index)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def cpu_per_life_cycle(tasks: int, rounds: int = 10) -> dict[str, float]:
    """CPU per life cycle of each side, in ``rounds`` alternating rounds (client, then
    raw), so that a change in the machine's load weighs on both sides alike."""
    # An earlier repeat's fake is garbage in cycles until a full collection: collect
    # it now, or whichever side runs first pays for it.
    gc.collect()
    async with lifted_fake() as fake, lifted_client(fake) as client:
        request = sa.TextToVideo(prompt="cpu", duration=10)
        headers = {"Authorization": f"Bearer {fake.api_key}"}
        body = {"request_type": "async", "input": {"mode": "text-to-video", "prompt": "cpu"}}
        status_url = f"{fake.url}/statusTask/sora-2-pro"
        polls_per_task = 1

        async def ours(index: int) -> None:
            await client.wait(await client.submit(request))

        async def raw(index: int) -> None:
            async with session.post(f"{fake.url}/generateTask/sora-2-pro", json=body) as r:
                task_id = (await r.json())["data"]["taskId"]
            for _ in range(polls_per_task):
                async with session.get(status_url, params={"taskId": task_id}) as r:
                    await r.json()

        def polls_sent() -> int:
            return fake.stats.requests_by_kind["status"]

        async with aiohttp.ClientSession(headers=headers) as session:
            # Warm both sides up (connections, first calls); the raw side then makes
            # as many polls per task as the client did.
            sent = polls_sent()
            await gather_limited(CONCURRENCY * 4, ours)
            polls_per_task = round((polls_sent() - sent) / (CONCURRENCY * 4))
            await gather_limited(CONCURRENCY * 4, raw)
            client_cpu = raw_cpu = 0.0
            client_polls = 0
            per_round = max(1, tasks // rounds)
            for _ in range(rounds):
                sent, start = polls_sent(), time.process_time()
                await gather_limited(per_round, ours)
                client_cpu += time.process_time() - start
                client_polls += polls_sent() - sent
                start = time.process_time()
                await gather_limited(per_round, raw)
                raw_cpu += time.process_time() - start
    done = per_round * rounds
    return {
        "client_ms": client_cpu / done * 1e3,
        "raw_ms": raw_cpu / done * 1e3,
        "polls_per_task": client_polls / done,
    }


async def memory_per_queued_call(queued: int) -> float:
    limits = sa.Limits(requests=10**9, period=1.0, concurrent_tasks=10)
    async with lifted_fake(generation=3600.0) as fake, lifted_client(fake, limits) as client:
        request = sa.TextToVideo(prompt="memory", duration=10)
        for _ in range(10):  # fill the slots first: later calls queue for one
            await client.submit(request)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        calls = [asyncio.ensure_future(client.generate(request)) for _ in range(queued)]
        await asyncio.sleep(0.5)  # every call runs up to its wait for a slot
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert client.governor.slots_in_use == 10
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    return (after - before) / queued


async def requests_per_second(count: int) -> dict[str, float]:
    async with lifted_fake(generation=3600.0) as fake:
        async with lifted_client(fake) as client:
            task_id = await client.submit(sa.TextToVideo(prompt="rps"))

            async def ours(index: int) -> None:
                await client.status(task_id)

            start = time.perf_counter()
            await gather_limited(count, ours)
            client_rps = count / (time.perf_counter() - start)

        headers = {"Authorization": f"Bearer {fake.api_key}"}
        async with aiohttp.ClientSession(headers=headers) as session:

            async def raw(index: int) -> None:
                async with session.get(
                    f"{fake.url}/statusTask/sora-2-pro", params={"taskId": task_id}
                ) as response:
                    json.loads(await response.read())

            start = time.perf_counter()
            await gather_limited(count, raw)
            raw_rps = count / (time.perf_counter() - start)
    return {"client_rps": client_rps, "raw_rps": raw_rps}


def median_of(repeats: int, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    runs: list[Any] = [asyncio.run(make()) for _ in range(repeats)]
    if isinstance(runs[0], dict):
        return {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    cpu = median_of(args.repeats, lambda: cpu_per_life_cycle(args.tasks))
    memory = median_of(args.repeats, lambda: memory_per_queued_call(args.queued))
    rps = median_of(args.repeats, lambda: requests_per_second(args.requests))
    print("| measure | sora-async | raw aiohttp | ratio |\n|---|---|---|---|")
    print(
        f"| CPU per task life cycle (create + {cpu['polls_per_task']:.1f} polls) "
        f"| {cpu['client_ms']:.2f} ms | {cpu['raw_ms']:.2f} ms "
        f"| {cpu['client_ms'] / cpu['raw_ms']:.2f}x |"
    )
    print(f"| memory per queued generate() ({args.queued:,} queued) | {memory:.0f} B | - | - |")
    print(
        f"| status requests/s, limits lifted | {rps['client_rps']:.0f} | {rps['raw_rps']:.0f} "
        f"| {rps['client_rps'] / rps['raw_rps']:.2f}x |"
    )
    RESULTS.mkdir(exist_ok=True)
    result = {
        "cpu": cpu,
        "memory_bytes_per_queued_call": memory,
        "requests_per_second": rps,
        "args": vars(args),
    }
    (RESULTS / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
