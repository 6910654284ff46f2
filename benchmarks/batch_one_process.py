"""End-to-end figures of a durable batch (journal, downloads, manifest).

- Virtual time: a batch at the real limits (lognormal generations, mean 180 s):
  makespan against its lower bound (sum of generation times / 10).
- Real time: a 10,000-item batch with the limits lifted and instant generations:
  CPU per item (client, journal, downloads and the fake service, all in this one
  process), and in a second run the peak of traced Python memory.

    python benchmarks/batch_one_process.py [--virtual-items 1000] [--real-items 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import looptime

import sora_async as sa
from sora_async.testing import FakeApixo, fixed, lognormal

RESULTS = Path(__file__).parent / "results"


def write_prompts(path: Path, count: int) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"item-{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(count)
        )
    )
    return path


async def virtual_makespan(items: int, folder: Path) -> dict[str, Any]:
    source = write_prompts(folder / "virtual.jsonl", items)
    loop = asyncio.get_running_loop()
    async with FakeApixo(generation_time=lognormal(180.0, 0.4), balance=1e12, seed=7) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            started = loop.time()
            report = await sa.run_batch(client, source, folder / "virtual")
            makespan = loop.time() - started
        assert report.ok
        bound = sum(t.complete_at - t.created_at for t in fake.tasks.values()) / 10
        stats = fake.stats
    return {
        "items": items,
        "makespan_s": makespan,
        "lower_bound_s": bound,
        "ratio": makespan / bound,
        "429s": stats.rate_limited,
        "max_in_window": stats.max_requests_in_window,
    }


async def real_cost(items: int, folder: Path, *, trace: bool) -> dict[str, Any]:
    """Run a lifted batch; with ``trace``, measure peak memory (tracemalloc slows it)."""
    source = write_prompts(folder / "real.jsonl", items)
    limits = sa.Limits(requests=10**9, period=1.0, concurrent_tasks=100)
    async with FakeApixo(
        requests=10**9,
        concurrent_tasks=10**9,
        generation_time=fixed(0.0),
        pending_time=0.0,
        balance=1e15,
    ) as fake:
        async with sa.SoraClient(
            api_key=fake.api_key,
            base_url=fake.url,
            limits=limits,
            governor=sa.LocalGovernor(limits, jitter_margin=0.0),
            poll_policy=sa.PollPolicy(prior_mean=0.01, min_interval=0.0, min_hazard=0.0),
        ) as client:
            if trace:
                tracemalloc.start()
            cpu, wall = time.process_time(), time.perf_counter()
            report = await sa.run_batch(client, source, folder / ("traced" if trace else "real"))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            peak = tracemalloc.get_traced_memory()[1] if trace else 0
            tracemalloc.stop()
        assert report.ok
        requests = fake.stats.requests
    return {
        "items": items,
        "cpu_ms_per_item": cpu / items * 1e3,
        "wall_s": wall,
        "peak_memory_mb": peak / 2**20,
        "requests_per_item": requests / items,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--virtual-items", type=int, default=1000)
    parser.add_argument("--real-items", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        loop = looptime.new_event_loop()
        try:
            virtual = loop.run_until_complete(virtual_makespan(args.virtual_items, Path(scratch)))
        finally:
            loop.close()
        real = asyncio.run(real_cost(args.real_items, Path(scratch), trace=False))
        traced = asyncio.run(real_cost(args.real_items, Path(scratch), trace=True))
        real["peak_memory_mb"] = traced["peak_memory_mb"]
    print("| measure | value |\n|---|---|")
    print(
        f"| makespan of {virtual['items']:,} videos at the real limits (virtual time) "
        f"| {virtual['makespan_s']:.0f} s = {virtual['ratio']:.3f} x the lower bound "
        f"({virtual['lower_bound_s']:.0f} s), {virtual['429s']} 429s |"
    )
    print(
        f"| CPU per item, {real['items']:,}-item batch, limits lifted (real time) "
        f"| {real['cpu_ms_per_item']:.2f} ms ({real['requests_per_item']:.1f} requests, "
        f"journal, download, manifest) |"
    )
    print(f"| peak memory, {real['items']:,}-item batch | {real['peak_memory_mb']:.1f} MB |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch_one_process.json").write_text(
        json.dumps({"virtual": virtual, "real": real}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
