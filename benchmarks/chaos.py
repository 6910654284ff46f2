"""The client under chaos: 2,000 generations with a fifth of all requests faulty.

In virtual time at the real limits (60 requests a minute, 10 tasks, lognormal
generations of mean 180 s, 5% of tasks failing), the same prompts are run by
``generate_many`` and by ``run_batch`` (rerun up to three times, as a user would
after passing faults), each against ``FakeApixo(chaos=0.2)`` and against the same
fake without chaos. Every figure is the fake server's view, except the outcomes.

- delivered: a video (batch: on disk, byte for byte the fake's file);
- failed, by reason: the task failed, the service answered nonsense
  (ProtocolError), a create refused after the deadline, a download given up;
- uncertain: a create whose fate is unknown (not sent again: never pay twice);
- duplicates: prompts the fake made more than one task for;
- utilisation: share of slot-time the fake generated for us, from first create to
  last (tasks made by an uncertain create count: the service worked for them).

    python benchmarks/chaos.py [--items 2000] [--chaos 0.2] [--seed 5]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import looptime

import sora_async as sa
from sora_async.testing import FakeApixo, Fault, TaskRecord, lognormal
from sora_async.testing._media import build_mp4

RESULTS = Path(__file__).parent / "results"


def utilisation(tasks: list[TaskRecord], slots: int = 10) -> float:
    """Return the share of slot-time spent generating, from the first create to the last."""
    first = min(t.created_at for t in tasks)
    last = max(t.created_at for t in tasks)
    busy = sum(max(0.0, min(t.complete_at, last) - max(t.created_at, first)) for t in tasks)
    return busy / (slots * (last - first))


def reason(error: str) -> str:
    """Return the kind of a recorded error, for the 'failed by reason' column."""
    if "answered nonsense" in error:
        return "nonsense"
    if error.startswith("download"):
        return "download"
    if "[429]" in error:
        return "429 past deadline"
    return "task failed"


async def by_generate_many(fake: FakeApixo, items: int, folder: Path) -> collections.Counter[str]:
    outcomes: collections.Counter[str] = collections.Counter()
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        requests = (sa.TextToVideo(prompt=f"chaos {i}", duration=10) for i in range(items))
        async for outcome in client.generate_many(requests):
            if outcome.video is not None:
                outcomes["delivered"] += 1
            elif isinstance(outcome.error, sa.SubmitUncertainError):
                outcomes["uncertain"] += 1
            else:
                outcomes[f"failed: {reason(str(outcome.error))}"] += 1
    return outcomes


async def by_run_batch(fake: FakeApixo, items: int, folder: Path) -> collections.Counter[str]:
    source = folder / "prompts.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"i{i}", "prompt": f"chaos {i}"}) + "\n" for i in range(items))
    )
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        report = await sa.run_batch(client, source, folder / "out")
        for _ in range(3):
            if not {"queued", "succeeded"} & set(report.counts):
                break
            report = await sa.run_batch(client, source, folder / "out")
    return tally(report, fake)


def tally(report: sa.BatchReport, fake: FakeApixo) -> collections.Counter[str]:
    """Count a batch's outcomes; a file is delivered only if byte for byte the fake's."""
    outcomes: collections.Counter[str] = collections.Counter()
    for row in report.rows:
        if row.state is sa.ItemState.DOWNLOADED:
            record = fake.tasks[str(row.task_id)]
            made = build_mp4(record.task_id, record.duration, record.width, record.height)
            whole = Path(row.files[0]).read_bytes() == made
            outcomes["delivered" if whole else "torn"] += 1
        elif row.state is sa.ItemState.UNCERTAIN:
            outcomes["uncertain"] += 1
        else:
            outcomes[f"failed: {reason(row.error or '')}"] += 1
    return outcomes


async def run(
    way: str, items: int, chaos: float, seed: int, folder: Path, *, storms: bool = True
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with FakeApixo(
        generation_time=lognormal(180.0, 0.4),
        failure_rate=0.05,
        seed=seed,
        balance=1e12,
        chaos=chaos,
        chaos_faults=None if storms else [f for f in Fault if f is not Fault.RATE_LIMIT],
    ) as fake:
        started = loop.time()
        runner = by_generate_many if way == "generate_many" else by_run_batch
        outcomes = await runner(fake, items, folder)
        makespan = loop.time() - started
        stats = fake.stats
        tasks = list(fake.tasks.values())
    return {
        "way": way,
        "chaos": chaos if storms else f"{chaos:g}, no 429 storms",
        "items": items,
        "outcomes": dict(outcomes),
        "duplicates": sum(1 for n in stats.creates_per_prompt.values() if n > 1),
        "429s": stats.rate_limited,
        "faults": sum(stats.faults.values()),
        "max_in_window": stats.max_requests_in_window,
        "max_tasks": stats.max_concurrent_tasks,
        "utilisation": utilisation(tasks),
        "makespan_s": makespan,
    }


def table_line(row: dict[str, Any]) -> str:
    """Return one run as a row of the printed table."""
    outcomes = row["outcomes"]
    failed = ", ".join(
        f"{name.removeprefix('failed: ')} {n}"
        for name, n in sorted(outcomes.items())
        if name.startswith("failed")
    )
    cells = [
        row["way"],
        str(row["chaos"]),
        outcomes.get("delivered", 0),
        failed or "-",
        outcomes.get("uncertain", 0),
        row["duplicates"],
        row["429s"],
        row["max_in_window"],
        row["max_tasks"],
        f"{row['utilisation']:.3f}",
        f"{row['makespan_s'] / 3600:.1f}",
    ]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--chaos", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("sora_async").setLevel(logging.ERROR)  # chaos warns on every fault
    rows = []
    print(
        "| way | chaos | delivered | failed by reason | uncertain | duplicates | 429s "
        "| max req/60s | max tasks | utilisation | makespan h |\n|" + "---|" * 11
    )
    runs = [
        ("generate_many", args.chaos, True),
        ("generate_many", args.chaos, False),
        ("generate_many", 0.0, True),
        ("run_batch", args.chaos, True),
        ("run_batch", 0.0, True),
    ]
    for way, chaos, storms in runs:
        wall = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            # Fewer idle cycles before the clock jumps: hours of timers otherwise spin.
            loop = looptime.new_event_loop(noop_cycles=8)
            try:
                row = loop.run_until_complete(
                    run(way, args.items, chaos, args.seed, Path(scratch), storms=storms)
                )
            finally:
                loop.close()
        row["wall_s"] = time.perf_counter() - wall
        rows.append(row)
        print(table_line(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
