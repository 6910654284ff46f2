"""kill -9 soak of the durable batch: the real CLI, SIGKILLed at random, rerun to the end.

For each seed, the fake service listens on loopback (in this process, so its counters
can be read) with every timing divided by 100, and ``sora-async batch`` runs in a
subprocess against it. The CLI is killed with SIGKILL 1-3 times at random moments,
then run again until it ends by itself. Counted on the server's side and on disk:

- lost: items that end neither downloaded, failed nor uncertain;
- duplicate: prompts the fake made more than one task for;
- torn: files on disk whose bytes differ from the video the fake made
  (or temporary ``.part`` files left behind by a finished run);
- uncertain: items whose create a kill cut off in flight (not sent again).

    python benchmarks/kill9.py [--seeds 50] [--items 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from sora_async.testing import FakeApixo, lognormal
from sora_async.testing._media import build_mp4

RESULTS = Path(__file__).parent / "results"
SCALE = 100.0  # every timing divided by this: a 180-s generation takes 1.8 s


async def start_cli(
    command: list[str], env: dict[str, str], *, output: int = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """Start ``python -m sora_async`` with ``command`` and ``env`` added to this one's;
    its stdout and stderr go to ``output`` (discarded by default)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sora_async",
        *command,
        stdout=output,
        stderr=output,
        env={**os.environ, **env},
    )


def count(out: Path, items: int, fake: FakeApixo) -> dict[str, int]:
    """Count lost, torn and uncertain items from the manifest and the files on disk."""
    manifest = out / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    states = {row["id"]: row["state"] for row in rows}
    torn = len(list(out.glob(".*.part")))
    for row in rows:
        if row["state"] == "downloaded":
            record = fake.tasks[row["task_id"]]
            made = build_mp4(record.task_id, record.duration, record.width, record.height)
            torn += Path(row["files"][0]).read_bytes() != made
    ended = ("downloaded", "failed", "uncertain")
    return {
        "lost": sum(states.get(f"k{i}") not in ended for i in range(items)),
        "torn": torn,
        "uncertain": sum(state == "uncertain" for state in states.values()),
        "downloaded": sum(state == "downloaded" for state in states.values()),
    }


async def soak(seed: int, items: int, folder: Path) -> dict[str, Any]:
    """Run one seed: kill the CLI at random 1-3 times, rerun it to the end, count."""
    rng = random.Random(seed)
    source = folder / "prompts.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"k{i}", "prompt": f"seed {seed} item {i}"}) + "\n"
            for i in range(items)
        )
    )
    out = folder / "out"
    async with FakeApixo(
        generation_time=lognormal(180 / SCALE, 0.4),
        period=60 / SCALE,
        pending_time=2 / SCALE,
        seed=seed,
        balance=1e9,
    ) as fake:
        env = {"APIXO_API_KEY": fake.api_key, "APIXO_BASE_URL": fake.url}
        command = ["batch", str(source), "-o", str(out), "--time-scale", str(SCALE), "--json"]
        kills = rng.randint(1, 3)
        for _ in range(kills):
            process = await start_cli(command, env)
            await asyncio.sleep(rng.uniform(0.3, 3.0))
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
            await process.wait()
        process = await start_cli(command, env)  # to the end
        code = await asyncio.wait_for(process.wait(), 300)
        counts = count(out, items, fake)
        duplicate = sum(n > 1 for n in fake.stats.creates_per_prompt.values())
    return {"seed": seed, "kills": kills, "exit": code, "duplicate": duplicate, **counts}


async def run(seeds: int, items: int) -> list[dict[str, Any]]:
    rows = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as scratch:
            rows.append(await soak(seed, items, Path(scratch)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--items", type=int, default=16)
    args = parser.parse_args()
    rows = asyncio.run(run(args.seeds, args.items))
    totals = {key: sum(row[key] for row in rows) for key in ("lost", "duplicate", "torn")}
    uncertain = sum(row["uncertain"] for row in rows)
    kills = sum(row["kills"] for row in rows)
    print("| seeds | items | kills | lost | duplicate | torn | uncertain |\n|" + "---|" * 7)
    print(
        f"| {len(rows)} | {len(rows) * args.items} | {kills} | {totals['lost']} "
        f"| {totals['duplicate']} | {totals['torn']} | {uncertain} |"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kill9.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
