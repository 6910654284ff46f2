"""Several models on one client, in virtual time: per-model budgets against one shared.

A mixed workload (Sora 2 Pro videos ~180 s, Veo 3.1 videos ~120 s, Nano Banana
images ~15 s) runs against the fake service, whose limits are per (key, model) at
the Sora figures (60 requests a minute, 10 tasks). Two clients drive it:

- per-model: the default, one governor and one scheduler per model, one
  ``generate_many`` per model;
- per-model, one stream: the same, with every request in one interleaved
  ``generate_many`` (a model whose slots are full must not stall the others);
- shared: ``shared_budget=True``, one governor for every model (what a user must
  choose when the key's limits are counted across models).

Measured on the server's side: makespan, requests per task, 429s, the most
unfinished tasks of each model at once, and the mean detection delay per model
(from a task's end to the first answer that shows it).

    python benchmarks/models.py [--scale 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

from utilization import run_virtual

import sora_async as sa
from sora_async.testing import FakeApixo, lognormal

RESULTS = Path(__file__).parent / "results"
MODELS = ("sora-2-pro", "veo-3-1", "nano-banana")
CONTENDERS = ("per-model", "per-model, one stream", "shared")


def interleave(streams: list[list[Any]]) -> list[Any]:
    """Return the requests of every stream taken in turn (a mixed stream)."""
    longest = max(len(stream) for stream in streams)
    return [stream[i] for i in range(longest) for stream in streams if i < len(stream)]


def workload(scale: int) -> dict[str, list[Any]]:
    """Return the requests of each model: 100, 50 and 100 per unit of ``scale``."""
    return {
        "sora-2-pro": [sa.TextToVideo(prompt=f"sora {i}") for i in range(100 * scale)],
        "veo-3-1": [sa.Veo31(prompt=f"veo {i}", mode="fast") for i in range(50 * scale)],
        "nano-banana": [sa.NanoBanana(prompt=f"image {i}") for i in range(100 * scale)],
    }


async def run(contender: str, scale: int) -> dict[str, Any]:
    """Run the workload with one contender and return the server's figures."""
    async with FakeApixo(
        generation_time=lognormal(180.0, 0.4),
        generation_times={"veo-3-1": lognormal(120.0, 0.4), "nano-banana": lognormal(15.0, 0.4)},
        balance=1e9,
        seed=1,
    ) as fake:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with sa.SoraClient(
            api_key=fake.api_key, base_url=fake.url, shared_budget=contender == "shared"
        ) as client:

            async def drain(requests: list[Any]) -> None:
                async for outcome in client.generate_many(requests):
                    assert outcome.ok, outcome.error

            streams = list(workload(scale).values())
            if contender == "per-model, one stream":
                streams = [interleave(streams)]
            await asyncio.gather(*(drain(reqs) for reqs in streams))
        makespan = loop.time() - start
        stats = fake.stats
        delays: dict[str, list[float]] = {model: [] for model in MODELS}
        for task in fake.tasks.values():
            if task.first_seen_done_at is not None:
                delays[task.model].append(task.first_seen_done_at - task.complete_at)
    tasks = sum(stats.creates_by_model.values())
    return {
        "contender": contender,
        "tasks": tasks,
        "makespan_s": round(makespan, 1),
        "requests_per_task": round(stats.requests / tasks, 2),
        "429s": stats.rate_limited,
        "max_tasks": {m: stats.max_concurrent_tasks_by_model[m] for m in MODELS},
        "detect_mean_s": {m: round(statistics.fmean(delays[m]), 1) for m in MODELS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1)
    args = parser.parse_args()
    rows = [run_virtual(run(contender, args.scale)) for contender in CONTENDERS]
    header = "| contender | tasks | makespan s | requests/task | 429s | most tasks at once "
    header += "(sora, veo, banana) | detection s (sora, veo, banana) |"
    print(header)
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        most = ", ".join(str(row["max_tasks"][m]) for m in MODELS)
        detect = ", ".join(str(row["detect_mean_s"][m]) for m in MODELS)
        print(
            f"| {row['contender']} | {row['tasks']} | {row['makespan_s']} | "
            f"{row['requests_per_task']} | {row['429s']} | {most} | {detect} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "models.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
