"""Users' requests beside a batch on one key: their slot wait, and what the batch keeps.

A batch of ``--items`` prompts fills the key (60 requests a minute, 10 tasks, videos
of about 180 s: lognormal, sigma 0.3) while interactive requests arrive at random
(Poisson, one a minute on average) until the batch ends. Four configurations:

- fifo: no priorities (every create "normal"), the line first come, first served;
- reserve 0, 1, 2, 4: the batch at priority "batch", the users at "interactive", with
  that many slots reserved for them (lent after 600 s without a user).

Two set-ups:

- one process, in virtual time against the fake at the real limits: the batch through
  ``generate_many``, the users through ``generate``, on one client;
- two processes through a real redis-server, in real time with every timing divided by
  ``--scale``: the batch is ``sora-async batch --redis-url`` in a process of its own,
  the users this process's client on the same key (figures scaled back to real seconds).

Reported: the users' slot wait (from submit to their task id: the slot, the permit and
the create; p50, p99, max)
and utilisation, the share of the key's slot-time (10 slots, from the first create to
the batch's end) that the batch's tasks held and that all tasks held.

    python benchmarks/priority.py [--items 10000] [--redis-items 300] [--scale 60]
        [--parts one,two]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import looptime

import sora_async as sa
from sora_async._cli_run import scaled_client_options
from sora_async.redis_governor import RedisGovernor
from sora_async.testing import FakeApixo, RedisServer, lognormal

RESULTS = Path(__file__).parent / "results"
CONFIGS: tuple[tuple[str, int | None], ...] = (
    ("fifo", None),
    ("reserve 0", 0),
    ("reserve 1", 1),
    ("reserve 2", 2),
    ("reserve 4", 4),
)
MEAN = 180.0  # seconds a video takes, on average
USERS_PER_MINUTE = 1.0


def quantile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


async def users(
    client: sa.SoraClient, priority: sa.Priority, until: asyncio.Event, scale: float, seed: int
) -> tuple[list[float], float]:
    """Send users' requests at random until ``until``; return how long each waited for
    its slot (its submit: the slot, then the create), and the slot-time they held."""
    rng = random.Random(seed)
    waits: list[float] = []
    held = 0.0
    loop = asyncio.get_running_loop()

    async def one(n: int) -> None:
        nonlocal held
        asked = loop.time()
        task_id = await client.submit(sa.TextToVideo(prompt=f"user {n}"), priority=priority)
        started = loop.time()
        waits.append(started - asked)
        await client.wait(task_id)
        held += loop.time() - started

    running: set[asyncio.Task[None]] = set()
    n = 0
    while not until.is_set():
        gap = rng.expovariate(USERS_PER_MINUTE / (60.0 / scale))
        try:
            await asyncio.wait_for(until.wait(), gap)
        except TimeoutError:
            task = asyncio.ensure_future(one(n))
            running.add(task)
            task.add_done_callback(running.discard)
            n += 1
    await asyncio.gather(*running)
    return waits, held


async def sample(governor: Any, every: float, into: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        into.append(governor.slots_in_use)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def figures(
    name: str, waits: list[float], used: list[int], user_held: float, span: float, scale: float
) -> dict[str, Any]:
    total = statistics.fmean(used) / 10 if used else 0.0
    users_share = user_held / (10 * span) if span else 0.0
    return {
        "config": name,
        "users": len(waits),
        "wait_p50_s": round(quantile(waits, 0.5) * scale, 2),
        "wait_p99_s": round(quantile(waits, 0.99) * scale, 2),
        "wait_max_s": round(max(waits, default=0.0) * scale, 2),
        "batch_utilisation": round(total - users_share, 4),
        "total_utilisation": round(total, 4),
        "span_h": round(span * scale / 3600, 2),
    }


# --- one process, virtual time -------------------------------------------------------------


async def one_process(name: str, reserved: int | None, items: int, seed: int) -> dict[str, Any]:
    governor = sa.LocalGovernor(sa.Limits(), reserved=reserved or 0)
    batch_priority: sa.Priority = "normal" if reserved is None else "batch"
    user_priority: sa.Priority = "normal" if reserved is None else "interactive"
    fake = FakeApixo(generation_time=lognormal(MEAN, 0.3), balance=1e9, seed=seed)
    async with (
        fake,
        sa.SoraClient(api_key=fake.api_key, base_url=fake.url, governor=governor) as client,
    ):
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        used: list[int] = []
        started = loop.time()
        watch = asyncio.ensure_future(sample(governor, 5.0, used, done))
        crowd = asyncio.ensure_future(users(client, user_priority, done, 1.0, seed))
        requests = (sa.TextToVideo(prompt=f"item {n}") for n in range(items))
        async for outcome in client.generate_many(requests, priority=batch_priority):
            assert outcome.error is None, outcome.error
        span = loop.time() - started
        done.set()
        waits, user_held = await crowd
        await watch
        stats = fake.stats
    assert stats.rate_limited == 0
    assert set(stats.creates_per_prompt.values()) == {1}
    return figures(name, waits, used, user_held, span, 1.0)


def run_one_process(name: str, reserved: int | None, items: int, seed: int) -> dict[str, Any]:
    loop = looptime.new_event_loop()
    try:
        return loop.run_until_complete(one_process(name, reserved, items, seed))
    finally:
        loop.close()


# --- two processes through Redis, real time -------------------------------------------------


async def two_processes(
    name: str, reserved: int | None, items: int, seed: int, scale: float, redis: RedisServer
) -> dict[str, Any]:
    key = f"bench-{seed}-{name.replace(' ', '')}-{time.time_ns()}"
    fake = FakeApixo(
        api_key=key,
        period=60.0 / scale,
        generation_time=lognormal(MEAN / scale, 0.3),
        pending_time=0.05,
        balance=1e9,
        seed=seed,
    )
    batch_priority = "normal" if reserved is None else "batch"
    user_priority: sa.Priority = "normal" if reserved is None else "interactive"
    async with fake:
        with tempfile.TemporaryDirectory() as scratch:
            prompts = Path(scratch) / "prompts.jsonl"
            prompts.write_text(
                "".join(
                    json.dumps({"id": f"i{n}", "prompt": f"item {n}"}) + "\n" for n in range(items)
                )
            )
            options = scaled_client_options(scale, redis_url=redis.url, api_key=key)
            base: RedisGovernor = options["governor"]
            governor = RedisGovernor(
                redis.url,
                api_key=key,
                limits=base.limits,
                lease=base.lease,
                uncertain_hold=base.uncertain_hold,
                redis_timeout=base.redis_timeout,
                jitter_margin=max(1.0 / scale, 0.1),
                backoff_base=1.0 / scale,
                backoff_cap=60.0 / scale,
                reserved=reserved or 0,
                lend_after=600.0 / scale,
                starve_after=600.0 / scale,
                trust_empty_redis=True,
            )
            options["governor"] = governor
            async with sa.SoraClient(api_key=key, base_url=fake.url, **options) as client:
                loop = asyncio.get_running_loop()
                batch = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "sora_async", "batch", str(prompts), "-o"),
                    *(str(Path(scratch) / "out"), "--redis-url", redis.url, "--api-key", key),
                    *("--base-url", fake.url, "--time-scale", str(scale), "--json"),
                    *("--priority", batch_priority, "--batch", key),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                while fake.stats.creates < 10:
                    if batch.returncode is not None:
                        out, err = await batch.communicate()
                        raise RuntimeError((out + err).decode(errors="replace"))
                    await asyncio.sleep(0.01)
                done = asyncio.Event()
                used: list[int] = []
                started = loop.time()
                watch = asyncio.ensure_future(sample(governor, 5.0 / scale, used, done))
                crowd = asyncio.ensure_future(users(client, user_priority, done, scale, seed))
                out, err = await batch.communicate()
                span = loop.time() - started
                done.set()
                waits, user_held = await crowd
                await watch
                assert batch.returncode == 0, (out + err).decode(errors="replace")
        stats = fake.stats
    assert set(stats.creates_per_prompt.values()) == {1}
    row = figures(name, waits, used, user_held, span, scale)
    row["429s"] = stats.rate_limited
    return row


async def run_two_processes(items: int, seed: int, scale: float) -> list[dict[str, Any]]:
    rows = []
    with RedisServer() as redis:
        for name, reserved in CONFIGS:
            rows.append(await two_processes(name, reserved, items, seed, scale, redis))
            print(rows[-1], flush=True)
    return rows


def table(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        title,
        "",
        "| config | users | slot wait p50 | p99 | max | batch utilisation | total utilisation |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['users']} | {row['wait_p50_s']:.2f} s | "
            f"{row['wait_p99_s']:.2f} s | {row['wait_max_s']:.2f} s | "
            f"{row['batch_utilisation']:.3f} | {row['total_utilisation']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--redis-items", type=int, default=300)
    parser.add_argument("--scale", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--parts", default="one,two", help="one (one process), two (through Redis), or both"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    found = RESULTS / "priority.json"
    # A part not run keeps its figures from the last run.
    results = json.loads(found.read_text()) if found.exists() else {}
    if "one" in parts:
        one = []
        for name, reserved in CONFIGS:
            one.append(run_one_process(name, reserved, args.items, args.seed))
            print(one[-1], flush=True)
        results["one_process"] = one
    if "two" in parts:
        results["two_processes"] = asyncio.run(
            run_two_processes(args.redis_items, args.seed, args.scale)
        )
    RESULTS.mkdir(exist_ok=True)
    found.write_text(json.dumps(results, indent=2) + "\n")
    one, two = results.get("one_process", []), results.get("two_processes", [])
    print(table(f"One process, virtual time, {args.items} prompts:", one))
    print()
    print(
        table(
            f"Two processes through Redis, time / {args.scale:g}, {args.redis_items} prompts:", two
        )
    )


if __name__ == "__main__":
    main()
