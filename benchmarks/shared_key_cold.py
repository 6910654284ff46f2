"""A fresh or emptied Redis under many processes: one re-registration round, not a window.

Four real worker processes (``sora-async batch FILE --shard K/4 --redis-url``, started
as a user would) share one key through a real ``redis-server``, against one fake service
in this parent process, whose counters are the judge. Three parts, each repeated:

- cold start, at the real limits (``--time-scale 1``: a 61-s window, a 15-s lease; the
  fake's window 60 s): the four start at once on a fresh ``redis-server``. Timed from
  their start: the first create the fake receives, and the 10th (every slot taken);
  split at the first script a worker runs in Redis (the moment the round begins, which
  the epoch it writes names, on Redis's clock): start-up before, the round after. For
  reference, the bare start-up of the command line (``python -m sora_async --help``, to
  its exit), alone and four at once. The workers are then stopped (SIGTERM, SIGKILL
  after 5 s).
- restart empty, limits ten times faster (``--time-scale 10``: a 6.1-s window; the fake's
  window 6 s, generations log-normal with a mean of 6 s): the four make 32 videos; once
  14 creates have reached the fake, Redis is restarted without its data (down 0.5 s).
  Timed: from Redis answering again to the next request the fake receives. Counted over
  the whole run: 429s, the most requests in any window (limit 60), the most unfinished
  tasks (limit 10), creates per prompt, videos saved.
- restart empty at the real limits, where a window is 61 s and waiting one would show
  most. The same, except that the workers are stopped 10 s after the first request
  that follows the restart, and that the fake's generations last 30-60 s: at the real
  limits the poll schedule polls no task younger than about 45 s (its prior is 180 s),
  so until the first tasks end no request is due; 14 creates mean they have.

Before the re-registration round, a fresh Redis held the first create 61-63 s after the
workers' start (a whole window, then a lease), and the first request after Redis came
back empty came 61 s later.

    python benchmarks/shared_key_cold.py [--repeats 5] [--part cold|restart|restart-real ...]
    python benchmarks/shared_key.py --scenario cold [the same options]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import anyio
import redis.asyncio as aioredis

import sora_async as sa
from sora_async.testing import FakeApixo, GenerationTime, RedisServer, lognormal, uniform

RESULTS = Path(__file__).parent / "results"
WORKERS = 4
RESTART_AFTER_CREATES = 14  # "well under way": four tasks have ended and been replaced
DOWN_FOR = 0.5
STOP_GRACE = 5.0  # seconds from SIGTERM to SIGKILL
LOST = "Redis lost the governor's data"


@dataclass(frozen=True)
class Restart:
    """One restart part: its limits and the fake's generation times."""

    name: str
    scale: float
    generation: GenerationTime
    prompts: int
    stop_after: float | None  # seconds after the first request past the restart; None: to the end


RESTARTS = {
    "restart": Restart("restart", 10.0, lognormal(6.0, 0.3), 32, stop_after=None),
    "restart-real": Restart("restart-real", 1.0, uniform(30.0, 60.0), 40, stop_after=10.0),
}
PARTS = ["cold", *RESTARTS]


# --- workers -------------------------------------------------------------------------


def write_prompts(folder: Path, count: int) -> Path:
    """Write ``count`` prompts with ids to a JSONL file."""
    path = folder / "prompts.jsonl"
    lines = [
        json.dumps({"id": f"item-{i:03d}", "prompt": f"prompt number {i}", "duration": 10})
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Worker:
    """One ``sora-async batch`` process; its output goes to a file (no pipe to fill)."""

    process: asyncio.subprocess.Process
    log: Path
    sink: TextIO

    async def stop(self) -> str:
        """SIGTERM, then SIGKILL after STOP_GRACE s; return how it ended."""
        ended = f"exit {self.process.returncode}"
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                ended = f"exit {await asyncio.wait_for(self.process.wait(), STOP_GRACE)}"
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
                ended = "killed"
        self.sink.close()
        return ended

    def text(self) -> str:
        self.sink.close()
        return self.log.read_text(errors="replace")


async def start_worker(
    fake: FakeApixo, redis_url: str, prompts: Path, out: Path, shard: int, scale: float
) -> Worker:
    """Start one worker on shard ``shard``/WORKERS."""
    log = prompts.parent / f"worker-{shard}.log"
    sink = log.open("w")
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "sora_async", "batch", str(prompts), "-o", str(out)],
        *["--shard", f"{shard}/{WORKERS}", "--time-scale", str(scale)],
        *["--redis-url", redis_url, "--api-key", fake.api_key, "--base-url", fake.url, "--json"],
        stdout=sink,
        stderr=sink,
    )
    return Worker(process, log, sink)


async def start_workers(
    fake: FakeApixo, redis_url: str, prompts: Path, scale: float
) -> list[Worker]:
    out = prompts.parent / "out"
    return [
        await start_worker(fake, redis_url, prompts, out, k, scale) for k in range(1, WORKERS + 1)
    ]


async def until(condition: Callable[[], bool], timeout: float) -> None:
    """Wait until ``condition`` holds; it reads what other processes did, so look often."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - no event crosses a process boundary
            await asyncio.sleep(0.01)


class Arrivals:
    """When the fake saw each request (its clock, to 10 ms), read from its counters."""

    def __init__(self, fake: FakeApixo) -> None:
        self.fake = fake
        self.times: list[float] = []

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[Arrivals]:
        async def watch() -> None:
            while True:
                new = self.fake.stats.requests - len(self.times)
                self.times += [self.fake.now()] * new
                await asyncio.sleep(0.01)

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            yield self
            group.cancel_scope.cancel()

    def first_after(self, since: float) -> float | None:
        """Return the arrival time of the first request after ``since``, if any came."""
        return next((t for t in self.times if t > since), None)


async def born(url: str, api_key: str) -> float:
    """Return when (Redis's clock, unix seconds) the first script found the key empty:
    the epoch it wrote names that moment, and the round runs from it."""
    epoch_key = sa.RedisGovernor(url, api_key=api_key).prefix + ":epoch"
    connection = aioredis.from_url(url, decode_responses=True)
    try:
        epoch = await connection.get(epoch_key)
    finally:
        await connection.aclose()
    assert epoch is not None, "no worker reached Redis"
    return float(str(epoch).partition("/")[0]) / 1000


# --- the parts -----------------------------------------------------------------------


async def startup_seconds(copies: int) -> float:
    """Return the seconds until ``copies`` of ``python -m sora_async --help`` all exit."""
    started = time.perf_counter()
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sora_async", "--help", stdout=asyncio.subprocess.DEVNULL
        )
        for _ in range(copies)
    ]
    for process in processes:
        await process.wait()
    return time.perf_counter() - started


def judged(fake: FakeApixo, prompts: int, out: Path) -> dict[str, Any]:
    """The fake's counters, and the videos on disk."""
    stats = fake.stats
    return {
        "429s": stats.rate_limited,
        "max_in_window": stats.max_requests_in_window,
        "max_unfinished": stats.max_concurrent_tasks,
        "max_creates_per_prompt": max(stats.creates_per_prompt.values(), default=0),
        "creates": stats.creates,
        "requests": stats.requests,
        "prompts": prompts,
        "videos": len(list(out.glob("*.mp4"))),
    }


async def cold_start(folder: Path, seed: int) -> dict[str, Any]:
    """Four workers on a fresh Redis at the real limits: when do the creates come?"""
    alone, together = await startup_seconds(1), await startup_seconds(WORKERS)
    prompts = write_prompts(folder, 40)
    async with FakeApixo(
        period=60.0, generation_time=lognormal(180.0, 0.4), balance=1e9, seed=seed
    ) as fake:
        with RedisServer() as server:
            started, wall = fake.now(), time.time()  # the same moment on both clocks
            workers = await start_workers(fake, server.url, prompts, 1.0)
            await until(lambda: fake.stats.creates >= 10, timeout=120.0)
            contact = await born(server.url, fake.api_key) - wall  # since the start
            ended = [await worker.stop() for worker in workers]
        creates = sorted(task.created_at - started for task in fake.tasks.values())
        return {
            "first_create_s": creates[0],
            "tenth_create_s": creates[9],
            "first_script_s": contact,
            "first_create_after_first_script_s": creates[0] - contact,
            "startup_alone_s": alone,
            f"startup_{WORKERS}_at_once_s": together,
            "requests_before_first_create": fake.stats.requests_by_kind["status"]
            + fake.stats.requests_by_kind["balance"],
            "workers": ended,
            **judged(fake, 40, folder / "out"),
        }


async def restart_empty(folder: Path, part: Restart, seed: int) -> dict[str, Any]:
    """Four busy workers; Redis restarts empty under them: when does the next request come?"""
    prompts = write_prompts(folder, part.prompts)
    async with FakeApixo(
        period=60.0 / part.scale,
        generation_time=part.generation,
        pending_time=2.0 / part.scale,
        balance=1e9,
        seed=seed,
    ) as fake:
        arrivals = Arrivals(fake)
        with RedisServer() as server:
            async with arrivals.watching():
                started = fake.now()
                workers = await start_workers(fake, server.url, prompts, part.scale)
                await until(lambda: fake.stats.creates >= RESTART_AFTER_CREATES, timeout=300.0)
                down = fake.now()
                await asyncio.to_thread(server.restart, down_for=DOWN_FOR, keep_data=False)
                back, wall = fake.now(), time.time()
                await until(lambda: arrivals.first_after(back) is not None, timeout=180.0)
                resumed = arrivals.first_after(back)
                assert resumed is not None
                reborn = await born(server.url, fake.api_key) - wall
                if part.stop_after is not None:
                    await asyncio.sleep(part.stop_after - (fake.now() - resumed))
                    ended = [await worker.stop() for worker in workers]
                else:
                    with anyio.fail_after(600.0):
                        ended = [f"exit {await w.process.wait()}" for w in workers]
            logs = "".join(worker.text() for worker in workers)
        before = [t for t in arrivals.times if t <= down]
        gaps = [b - a for a, b in itertools.pairwise(before)]
        return {
            "to_next_request_s": resumed - back,
            # When, after Redis was back, a worker's script found it empty (the round began).
            "round_began_s": reborn,
            "restart_at_s": down - started,
            "down_s": back - down,
            # For scale: how far apart requests came before the restart.
            "gap_before_p50_s": statistics.median(gaps) if gaps else None,
            "gap_before_max_s": max(gaps, default=None),
            "requests_while_down": sum(down < t <= back for t in arrivals.times),
            "loss_logged_by": logs.count(LOST),
            "workers": ended,
            **judged(fake, part.prompts, folder / "out"),
        }


# --- the table -----------------------------------------------------------------------


def median_max(runs: Sequence[dict[str, Any]], field: str) -> tuple[float, float]:
    values = [run[field] for run in runs]
    return statistics.median(values), max(values)


def rows(part: str, runs: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(figure, median, max) rows of one part."""
    seconds = {
        "cold": [
            ("first create after the workers' start, s", "first_create_s"),
            ("10th create (every slot taken), s", "tenth_create_s"),
            ("first script in Redis (the workers' start-up), s", "first_script_s"),
            ("first create after it (the round), s", "first_create_after_first_script_s"),
            ("reference: `python -m sora_async --help` alone, s", "startup_alone_s"),
            (f"reference: {WORKERS} of them at once, s", f"startup_{WORKERS}_at_once_s"),
        ],
    }.get(
        part,
        [
            ("next request after Redis is back, s", "to_next_request_s"),
            ("of which: a worker finds it empty, s", "round_began_s"),
        ],
    )
    table = []
    for label, field in seconds:
        median, most = median_max(runs, field)
        table.append((label, f"{median:.2f}", f"{most:.2f}"))
    window = "6-s" if part == "restart" else "60-s"
    counts = [
        ("429s", "429s"),
        (f"most requests in a {window} window (limit 60)", "max_in_window"),
        ("most unfinished tasks (limit 10)", "max_unfinished"),
        ("creates per prompt (max 1)", "max_creates_per_prompt"),
    ]
    if part != "cold":
        counts.append(("requests over the run", "requests"))
    for label, field in counts:
        median, most = median_max(runs, field)
        table.append((label, f"{median:g}", f"{most:g}"))
    if part == "restart":
        saved = sum(run["videos"] == run["prompts"] for run in runs)
        table.append(("runs with every video saved", f"{saved} of {len(runs)}", ""))
    return table


async def run_part(part: str, repeats: int) -> list[dict[str, Any]]:
    runs = []
    for repeat in range(repeats):
        wall = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            if part == "cold":
                result = await cold_start(folder, seed=repeat + 1)
            else:
                result = await restart_empty(folder, RESTARTS[part], seed=repeat + 1)
        runs.append({"repeat": repeat + 1, "wall_s": time.perf_counter() - wall, **result})
        print(f"  {part} {repeat + 1}/{repeats}: {json.dumps(runs[-1])}", file=sys.stderr)
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", action="append", choices=PARTS, help="default: all three")
    args = parser.parse_args(argv)
    parts = args.part or PARTS
    results: dict[str, Any] = {"repeats": args.repeats, "workers": WORKERS}
    headings = {
        "cold": "cold start, real limits",
        "restart": "restart empty, limits x10",
        "restart-real": "restart empty, real limits",
    }
    table = []
    for part in parts:
        runs = asyncio.run(run_part(part, args.repeats))
        results[part] = runs
        table += [(headings[part], *row) for row in rows(part, runs)]
    print(f"| part | figure | median | max ({args.repeats} runs) |\n|---|---|---|---|")
    for heading, label, median, most in table:
        print(f"| {heading} | {label} | {median} | {most} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shared_key_cold.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
