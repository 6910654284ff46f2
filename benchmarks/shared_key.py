"""Many processes, one API key: slot utilisation through a RedisGovernor, real time.

1, 2, 4 and 8 OS processes (spawned, each with its own SoraClient and a stream of
work that never runs dry) share one key through one ``RedisGovernor`` on a real
``redis-server``, against one fake service in this parent process. The limits are
the real ones compressed tenfold in time: 60 requests per 6 s, 10 slots,
generations lognormal with a mean of 18 s (the real 180 s), a 0.1-s jitter margin
and a 3-s lease. For comparison: one process with a ``LocalGovernor``, and the 1/N
split without Redis (each of N processes a ``LocalGovernor`` with
``Limits(requests=60 // N, concurrent_tasks=10 // N)``).

The fake's own counters are the judge: slot utilisation (the share of slot-time in
a steady window, after a warm-up, in which the server generated for us), its idle
slot-time split into detection delay (task ended, nobody has seen it yet) and the
rest (hand-off: seen ended, next create not yet arrived; in the split, also the
slots no process may use), 429s, the most requests in any 6-s window, the most
unfinished tasks, and duplicate creates. From the workers:
Redis round trips per API request (every script run, lease renewals included),
and the time a request spends in ``governor.request()``, by kind: for a create it
is the permit's added latency; a poll also waits for its pacing step.

    python benchmarks/shared_key.py [--warmup 12] [--seconds 36] [--quick] [--row NAME ...]

``--scenario cold`` runs ``benchmarks/shared_key_cold.py`` instead (its options follow):
a fresh or emptied Redis under four real ``sora-async batch`` worker processes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import anyio
import shared_key_cold
from utilization import slot_utilisation

import sora_async as sa
from sora_async._governor import RequestKind
from sora_async.redis_governor import RedisGovernor
from sora_async.testing import FakeApixo, RedisServer, TaskRecord, lognormal

RESULTS = Path(__file__).parent / "results"
# The real limits, ten times faster: 60 requests a 6-s window, 10 slots, 18-s generations.
SCALE = 10.0
LIMITS = sa.Limits(requests=60, period=60.0 / SCALE, concurrent_tasks=10)
MEAN_GENERATION = 180.0 / SCALE
JITTER_MARGIN = 1.0 / SCALE
LEASE = 3.0  # 15 s / 10 would renew every 0.5 s: a slower lease is kinder to 2 cores
API_KEY = "shared-key"


@dataclass(frozen=True)
class Row:
    """One configuration: how many processes, and how they govern."""

    name: str
    processes: int
    redis: bool


ROWS = [
    Row("LocalGovernor, 1 process", 1, redis=False),
    Row("RedisGovernor, 1 process", 1, redis=True),
    Row("RedisGovernor, 2 processes", 2, redis=True),
    Row("RedisGovernor, 4 processes", 4, redis=True),
    Row("RedisGovernor, 8 processes", 8, redis=True),
    Row("1/N split, 4 processes", 4, redis=False),
    Row("1/N split, 8 processes", 8, redis=False),
]
QUICK = [
    "LocalGovernor, 1 process",
    "RedisGovernor, 1 process",
    "RedisGovernor, 4 processes",
    "1/N split, 4 processes",
]


@dataclass(frozen=True)
class Job:
    """What one worker process is told (picklable: it crosses a spawn)."""

    index: int
    processes: int
    base_url: str
    redis_url: str | None
    seconds: float
    out: str


class _Timings:
    """(When it began since the start, how long it took) of each call, by label."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self.calls: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)

    @contextlib.contextmanager
    def timing(self, label: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            ended = time.perf_counter()
            self.calls[label].append((started - self.origin, ended - started))


class TimedLocalGovernor(sa.LocalGovernor):
    """A LocalGovernor that times its permits."""

    def __init__(self, limits: sa.Limits) -> None:
        super().__init__(limits, jitter_margin=JITTER_MARGIN, backoff_base=1.0 / SCALE)
        self.permits = _Timings()
        self.scripts = _Timings()

    async def request(self, kind: RequestKind, priority: sa.Priority = "normal") -> None:
        with self.permits.timing(kind):
            await super().request(kind, priority)


class TimedRedisGovernor(RedisGovernor):
    """A RedisGovernor that times its permits and counts its scripts by name."""

    def __init__(self, url: str) -> None:
        super().__init__(
            url,
            api_key=API_KEY,
            limits=LIMITS,
            jitter_margin=JITTER_MARGIN,
            lease=LEASE,
            uncertain_hold=600.0 / SCALE,
            backoff_base=1.0 / SCALE,
            backoff_cap=60.0 / SCALE,
            trust_empty_redis=True,  # a fresh redis-server that nothing else used
        )
        self.permits = _Timings()
        self.scripts = _Timings()

    async def request(self, kind: RequestKind, priority: sa.Priority = "normal") -> None:
        with self.permits.timing(kind):
            await super().request(kind, priority)

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        with self.scripts.timing(name):
            return await super()._script(name, keys, args)


# --- a worker process --------------------------------------------------------------------


def worker(job: Job, barrier: Barrier) -> None:
    """Run one process's client until ``job.seconds`` after every process is ready."""
    barrier.wait()
    result = asyncio.run(_work(job))
    Path(job.out).write_text(json.dumps(result))


async def _work(job: Job) -> dict[str, Any]:
    governor: TimedLocalGovernor | TimedRedisGovernor
    if job.redis_url is not None:
        governor = TimedRedisGovernor(job.redis_url)
        limits = LIMITS
    else:
        n = job.processes
        limits = sa.Limits(
            requests=LIMITS.requests // n,
            period=LIMITS.period,
            concurrent_tasks=LIMITS.concurrent_tasks // n,
        )
        governor = TimedLocalGovernor(limits)
    videos = errors = 0
    async with sa.SoraClient(
        api_key=API_KEY,
        base_url=job.base_url,
        limits=limits,
        governor=governor,
        poll_policy=sa.PollPolicy(prior_mean=MEAN_GENERATION, min_interval=2.0 / SCALE),
        uncertain_hold=600.0 / SCALE,
    ) as client:
        # A stream of work that never runs dry: this process always wants a slot.
        stream = (
            sa.TextToVideo(prompt=f"process {job.index} video {i}", duration=10)
            for i in itertools.count()
        )
        with anyio.move_on_after(job.seconds):
            async for outcome in client.generate_many(stream):
                if outcome.ok:
                    videos += 1
                else:
                    errors += 1
    return {
        "videos": videos,
        "errors": errors,
        "permits": governor.permits.calls,
        "scripts": governor.scripts.calls,
        "round_trips": getattr(governor, "round_trips", 0),
    }


# --- the parent: one fake service, N workers ---------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def milliseconds(values: Sequence[float], q: float) -> float | None:
    """Return the ``q`` quantile in ms, or None (JSON null) when nothing was timed."""
    return quantile(values, q) * 1e3 if values else None


def detection_time(tasks: list[TaskRecord], start: float, end: float) -> float:
    """Return the slot-time in [start, end] in which a task had ended and no answer showed it."""
    return sum(
        max(0.0, min(t.first_seen_done_at, end) - max(t.complete_at, start))
        for t in tasks
        if t.first_seen_done_at is not None
    )


def in_window(
    results: list[dict[str, Any]], field: str, start: float, end: float
) -> dict[str, list[float]]:
    """Return the durations of the workers' calls that began in [start, end], by label."""
    durations: dict[str, list[float]] = collections.defaultdict(list)
    for result in results:
        for label, calls in result[field].items():
            durations[label] += [took for began, took in calls if start <= began <= end]
    return durations


async def measure(row: Row, warmup: float, seconds: float, seed: int) -> dict[str, Any]:
    fake = FakeApixo(
        api_key=API_KEY,
        requests=LIMITS.requests,
        period=LIMITS.period,
        concurrent_tasks=LIMITS.concurrent_tasks,
        generation_time=lognormal(MEAN_GENERATION, 0.4),
        pending_time=2.0 / SCALE,
        seed=seed,
        balance=1e12,
    )
    context = multiprocessing.get_context("spawn")
    redis = RedisServer() if row.redis else None
    with tempfile.TemporaryDirectory() as scratch, redis or contextlib.nullcontext():
        async with fake:
            barrier = context.Barrier(row.processes + 1)
            jobs = [
                Job(
                    index=i,
                    processes=row.processes,
                    base_url=fake.url,
                    redis_url=redis.url if redis else None,
                    seconds=warmup + seconds + 1.0,  # stop after the window closes
                    out=str(Path(scratch) / f"worker-{i}.json"),
                )
                for i in range(row.processes)
            ]
            workers = [context.Process(target=worker, args=(job, barrier)) for job in jobs]
            for process in workers:
                process.start()
            await asyncio.to_thread(barrier.wait, 120.0)
            started = fake.now()
            for process in workers:
                await asyncio.to_thread(process.join)
            tasks = list(fake.tasks.values())
            stats = fake.stats
        results = [json.loads(await anyio.Path(job.out).read_text()) for job in jobs]
    start, end = started + warmup, started + warmup + seconds
    utilisation = slot_utilisation(tasks, start, end)
    detection = detection_time(tasks, start, end)
    delays = [
        t.first_seen_done_at - t.complete_at
        for t in tasks
        if t.first_seen_done_at is not None and start <= t.complete_at <= end
    ]
    slot_time = LIMITS.concurrent_tasks * seconds
    # Permits and scripts of the steady window (workers count from the common start).
    permits = in_window(results, "permits", warmup, warmup + seconds)
    scripts = in_window(results, "scripts", warmup, warmup + seconds)
    requests = sum(len(waits) for waits in permits.values())
    script_seconds = [t for times in scripts.values() for t in times]
    requests_all = sum(len(calls) for r in results for calls in r["permits"].values())
    return {
        "row": row.name,
        "processes": row.processes,
        "redis": row.redis,
        "utilisation": utilisation,
        "idle_detection": detection / slot_time,
        # The rest of the idle time: a slot seen free and not yet refilled, or never usable.
        "idle_handoff": 1.0 - utilisation - detection / slot_time,
        "detect_mean_s": statistics.fmean(delays),
        "detect_p95_s": quantile(delays, 0.95),
        "429s": stats.rate_limited,
        "max_in_window": stats.max_requests_in_window,
        "max_unfinished": stats.max_concurrent_tasks,
        "duplicate_creates": sum(n - 1 for n in stats.creates_per_prompt.values()),
        "videos": sum(result["videos"] for result in results),
        "errors": sum(result["errors"] for result in results),
        "requests_sent": requests_all,
        "requests_seen": stats.requests,
        "round_trips_per_request": sum(r["round_trips"] for r in results) / requests_all,
        "window_requests": requests,
        "window_round_trips_by_script": {name: len(times) for name, times in scripts.items()},
        "script_p50_ms": milliseconds(script_seconds, 0.5),
        "script_p99_ms": milliseconds(script_seconds, 0.99),
        "create_permit_p50_ms": quantile(permits["create"], 0.5) * 1e3,
        "create_permit_p99_ms": quantile(permits["create"], 0.99) * 1e3,
        "poll_permit_p50_ms": quantile(permits["status"], 0.5) * 1e3,
        "poll_permit_p99_ms": quantile(permits["status"], 0.99) * 1e3,
        "warmup_s": warmup,
        "window_s": seconds,
        "seed": seed,
        "limits": {"requests": LIMITS.requests, "period": LIMITS.period, "slots": 10},
        "mean_generation_s": MEAN_GENERATION,
        "jitter_margin_s": JITTER_MARGIN,
        "lease_s": LEASE,
    }


def main() -> None:
    scenarios = ["utilisation", "cold"]
    scenario = argparse.ArgumentParser(add_help=False)
    scenario.add_argument("--scenario", choices=scenarios, default="utilisation")
    chosen, rest = scenario.parse_known_args()
    if chosen.scenario == "cold":
        shared_key_cold.main(rest)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario",
        choices=scenarios,
        default="utilisation",
        help="cold: a fresh or emptied Redis (benchmarks/shared_key_cold.py)",
    )
    parser.add_argument("--warmup", type=float, default=12.0, help="seconds before the window")
    parser.add_argument("--seconds", type=float, default=36.0, help="the steady window")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--row", action="append", choices=[row.name for row in ROWS])
    parser.add_argument(
        "--quick", action="store_true", help="4 rows, a 6-s warm-up and a 15-s window"
    )
    args = parser.parse_args()
    names = args.row or (QUICK if args.quick else [row.name for row in ROWS])
    warmup, seconds = (6.0, 15.0) if args.quick else (args.warmup, args.seconds)
    rows = []
    print(
        "| processes, governor | utilisation | idle: detect / hand-off | 429s | max req/6s "
        "| max tasks | Redis trips/request | create permit p50 / p99 ms "
        f"| poll permit p50 / p99 ms |\n|{'---|' * 9}"
    )
    for row in ROWS:
        if row.name not in names:
            continue
        wall = time.perf_counter()
        result = asyncio.run(measure(row, warmup, seconds, args.seed))
        result["wall_s"] = time.perf_counter() - wall
        rows.append(result)
        trips = f"{result['round_trips_per_request']:.2f}" if row.redis else "-"
        print(
            f"| {row.name} | {result['utilisation']:.3f} "
            f"| {result['idle_detection']:.3f} / {result['idle_handoff']:.3f} "
            f"| {result['429s']} | {result['max_in_window']} | {result['max_unfinished']} "
            f"| {trips} "
            f"| {result['create_permit_p50_ms']:.1f} / {result['create_permit_p99_ms']:.1f} "
            f"| {result['poll_permit_p50_ms']:.0f} / {result['poll_permit_p99_ms']:.0f} |",
            flush=True,
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shared_key.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
