"""Many OS processes, one key, one real redis-server: the fake service's counters judge.

Each worker is the real command line (``sora-async batch --shard K/N --redis-url``) in
its own process, at limits compressed 30 times (60 requests per 2 s, 10 tasks). The
fake service runs in the test's own process; only its counters are asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import sora_async as sa
from sora_async.testing import FakeApixo, RedisServer, fixed, lognormal

pytestmark = [pytest.mark.looptime(False), pytest.mark.timeout(150)]

SCALE = 30.0  # 60 requests per 2 s, generations of about 6 s


@pytest.fixture
async def service() -> AsyncIterator[FakeApixo]:
    """The fake service at the real limits, every timing divided by SCALE."""
    async with FakeApixo(
        period=60.0 / SCALE,
        generation_time=lognormal(180.0 / SCALE, 0.3),
        pending_time=0.05,
        balance=1e9,
        seed=11,
    ) as fake:
        yield fake


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds: it reads what other processes wrote, so look often."""
    while not condition():  # noqa: ASYNC110 - no event crosses a process boundary
        await asyncio.sleep(0.05)


def write_prompts(folder: Path, count: int) -> Path:
    """Write ``count`` prompts with ids to a JSONL file."""
    path = folder / "prompts.jsonl"
    lines = [
        json.dumps({"id": f"item-{i:03d}", "prompt": f"prompt number {i}", "duration": 10})
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def start_worker(
    fake: FakeApixo, redis_url: str, prompts: Path, out: Path, shard: str, scale: float = SCALE
) -> asyncio.subprocess.Process:
    """Start one ``sora-async batch`` worker process on its shard."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sora_async",
        "batch",
        str(prompts),
        "-o",
        str(out),
        "--shard",
        shard,
        "--time-scale",
        str(scale),
        "--redis-url",
        redis_url,
        "--api-key",
        fake.api_key,
        "--base-url",
        fake.url,
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str]:
    """Wait for a worker; return its exit code and what it logged."""
    _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode(errors="replace")


def running_task_ids(journal: Path) -> list[str]:
    """Return the task ids a worker's journal holds as created and not yet finished."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT task_id FROM items WHERE state = 'running'").fetchall()
    except sqlite3.OperationalError:  # not written yet
        return []
    return [task_id for (task_id,) in rows if task_id]


async def slots_left(redis_url: str, fake: FakeApixo) -> int:
    """Return how many slot records the key still has in Redis."""
    prefix = sa.RedisGovernor(redis_url, api_key=fake.api_key).prefix
    connection = aioredis.from_url(redis_url)
    try:
        return int(await connection.hlen(f"{prefix}:slots"))
    finally:
        await connection.aclose()


def assert_limits_held(fake: FakeApixo, prompts: int) -> None:
    """The key's limits held, nothing was paid twice, every prompt was made once."""
    stats = fake.stats
    assert stats.rate_limited == 0, (stats.rate_limited_by_kind, stats.concurrency_limited)
    assert stats.max_requests_in_window <= 60
    assert stats.max_concurrent_tasks <= 10
    assert len(stats.creates_per_prompt) == prompts
    assert max(stats.creates_per_prompt.values()) == 1


def videos(out: Path) -> int:
    """Return how many MP4 files the workers saved."""
    return len(list(out.glob("*.mp4")))


async def test_eight_processes_share_a_key_and_adopt_a_killed_ones_tasks(
    service: FakeApixo, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Eight worker processes share one key: 0 429s, the window and the 10 tasks hold.
    One is killed with SIGKILL while its tasks run: a live worker adopts them and polls
    them to their end; the killed shard, run again, finishes without creating twice."""
    prompts = write_prompts(tmp_path, 24)
    out = tmp_path / "out"
    workers = [
        await start_worker(service, redis_server.url, prompts, out, f"{k}/8") for k in range(1, 9)
    ]
    journal = out / ".sora-async-journal-1of8.sqlite"
    await until(lambda: journal.exists() and bool(running_task_ids(journal)))
    # A task is adopted once its slot names it in Redis, a moment after the journal does;
    # a process killed in between leaves an uncertain slot, which only its rerun resumes.
    await asyncio.sleep(0.5)
    orphans = running_task_ids(journal)
    workers[0].send_signal(signal.SIGKILL)
    results = [await finish(worker) for worker in workers[1:]]
    assert [code for code, _ in results] == [0] * 7, results
    logs = "".join(log for _, log in results)
    for task_id in orphans:
        assert f"adopting task {task_id}" in logs
    rerun = await start_worker(service, redis_server.url, prompts, out, "1/8")
    assert (await finish(rerun))[0] == 0
    assert_limits_held(service, 24)
    assert videos(out) == 24
    assert await slots_left(redis_server.url, service) == 0


async def test_redis_restarts_mid_run_with_and_without_its_data(
    service: FakeApixo, tmp_path: Path
) -> None:
    """Redis restarts twice mid-run, first keeping its data, then losing it: the workers
    wait while it is down, resume when it is back (after losing the data, once every
    live worker has re-registered its tasks), and the limits hold throughout; nothing
    is paid twice and every video is saved."""
    prompts = write_prompts(tmp_path, 20)
    out = tmp_path / "out"
    with RedisServer(persist=True) as server:
        workers = [
            await start_worker(service, server.url, prompts, out, f"{k}/4") for k in range(1, 5)
        ]
        await until(lambda: service.stats.creates >= 6)
        await asyncio.to_thread(server.restart, down_for=1.0, keep_data=True)
        await until(lambda: service.stats.creates >= 12)
        await asyncio.to_thread(server.restart, down_for=1.0, keep_data=False)
        results = [await finish(worker) for worker in workers]
        assert [code for code, _ in results] == [0] * 4, results
        assert_limits_held(service, 20)
        assert videos(out) == 20
        assert await slots_left(server.url, service) == 0
        logs = "".join(log for _, log in results)
        assert "Redis lost the governor's data" in logs


def journal_states(journal: Path) -> dict[str, int]:
    """Return how many items of a worker's journal are in each state."""
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())


async def test_a_worker_killed_while_its_create_waits_for_a_permit_leaves_nothing_uncertain(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A worker on a key that Redis does not know waits one window (12 s here) before
    its first request. SIGKILLed at a random moment while its first create holds a slot
    (taken after one 3-s lease) and waits for that permit, it leaves every item queued,
    none uncertain; run again, it creates every prompt exactly once and saves every video."""
    scale = 5.0
    seed = random.randrange(2**32)
    moment = random.Random(seed).uniform(0.0, 4.0)
    prompts = write_prompts(tmp_path, 4)
    out = tmp_path / "out"
    journal = out / ".sora-async-journal-1of1.sqlite"
    async with FakeApixo(
        api_key=f"unknown-to-redis-{secrets.token_hex(8)}",
        period=60.0 / scale,
        generation_time=fixed(2.0),
        pending_time=0.05,
        balance=1e9,
        seed=5,
    ) as fake:
        worker = await start_worker(fake, redis_server.url, prompts, out, "1/1", scale)
        slots = 0
        while not slots:  # its first create holds a slot: from here on it waits for a permit
            await asyncio.sleep(0.05)
            slots = await slots_left(redis_server.url, fake)
        await asyncio.sleep(moment)
        sent = fake.stats.requests
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
        left = journal_states(journal)
        context = f"seed {seed}: killed {moment:.2f} s after the slot was taken"
        assert sent == 0, f"{context}, but it had sent {sent} requests"
        assert left == {"queued": 4}, f"{context}; journal {left}"
        code, log = await finish(
            await start_worker(fake, redis_server.url, prompts, out, "1/1", scale)
        )
        assert code == 0, f"{context}; rerun: {log}"
        assert journal_states(journal) == {"downloaded": 4}, context
        assert_limits_held(fake, 4)
        assert videos(out) == 4
