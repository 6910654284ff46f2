"""Chaos mode of the fake service, and a soak of the client under it: thousands of
generations with a fifth of all requests faulty, in virtual time at the real limits."""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
from pathlib import Path

import aiohttp
import pytest

import sora_async as sa
from benchmarks.batch_one_process import write_prompts
from sora_async.testing import FakeApixo, Fault, fixed, lognormal
from sora_async.testing._damage import STATUS_DAMAGES
from sora_async.testing._media import build_mp4

pytestmark = pytest.mark.looptime

#: Faults after which a create's fate is unknown to the client (it may have made a task).
AMBIGUOUS = ("reset", "reset_after_create", "slow", "broken_json", "server_error", "error_in_200")
#: What an item may end with under chaos: a refusal after the transport's deadline, an
#: uncertain create, a task that failed or answered nonsense.
CLEAR_ERRORS = {"SubmitUncertainError", "TaskFailedError", "ProtocolError", "RateLimitError"}
SOAK = int(os.environ.get("SOAK", "800"))  # benchmarks/chaos.py runs 2,000
BATCH_SOAK = 400


def open_fds() -> int:
    """Return how many file descriptors this process holds (after collecting garbage, so
    that an earlier test's unreferenced event loop is not counted and then closed)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def client_objects() -> int:
    """Return how many live objects of the client's own classes exist (not the fake's)."""
    gc.collect()
    count = 0
    for obj in gc.get_objects():
        module = getattr(type(obj), "__module__", None)
        if isinstance(module, str) and module.startswith("sora_async"):
            count += not module.startswith("sora_async.testing")
    return count


async def test_chaos_draws_every_kind_at_the_rate_seeded() -> None:
    """chaos=0.2 faults about a fifth of requests (plus 429 storms), from every kind that
    applies, and the same seed draws the same faults."""
    seen: list[collections.Counter[str]] = []
    for _ in range(2):
        async with (
            FakeApixo(generation_time=fixed(1.0), chaos=0.2, seed=7) as fake,
            aiohttp.ClientSession() as session,
        ):
            headers = {"Authorization": f"Bearer {fake.api_key}"}
            for _ in range(600):
                # Keep under the rate limit so every request is admitted.
                await asyncio.sleep(1.1)
                try:
                    async with session.get(
                        f"{fake.url}/apikeys/current-balance",
                        headers=headers,
                        timeout=aiohttp.ClientTimeout(total=5),
                    ) as response:
                        await response.read()
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
            seen.append(fake.stats.faults)
    first, second = seen
    assert first == second
    drawn = sum(n for kind, n in first.items() if kind != "rate_limit")
    assert 0.12 * 600 < drawn < 0.25 * 600
    balance_faults = {f.value for f in Fault} - {f.value for f in STATUS_DAMAGES}
    assert set(first) == balance_faults - {"corrupt_file"}
    assert first["rate_limit"] > first["reset"]  # a storm is several 429s in a row


async def test_chaos_faults_limits_the_kinds_drawn() -> None:
    """chaos_faults=[...] draws only those kinds: at chaos=1 every request gets one."""
    async with (
        FakeApixo(chaos=1.0, chaos_faults=["error_in_200"]) as fake,
        aiohttp.ClientSession() as session,
    ):
        headers = {"Authorization": f"Bearer {fake.api_key}"}
        for _ in range(5):
            url = f"{fake.url}/apikeys/current-balance"
            async with session.get(url, headers=headers) as response:
                assert response.status == 200
                assert (await response.json())["code"] >= 500
        assert fake.stats.faults == {"error_in_200": 5}


async def test_chaos_must_be_a_share() -> None:
    """A chaos rate outside [0, 1] is refused, at construction and at run time."""
    with pytest.raises(ValueError, match="chaos"):
        FakeApixo(chaos=1.5)
    fake = FakeApixo(chaos=0.1)
    with pytest.raises(ValueError, match="chaos"):
        fake.chaos = -0.1
    fake.chaos = 0.3
    assert fake.chaos == 0.3


# Fewer idle loop cycles before the clock jumps: a soak waits on timers for hours of
# virtual time, and that spinning, not the work, would be most of its real time.
SOAK_LOOP = pytest.mark.looptime(noop_cycles=8)


@SOAK_LOOP
@pytest.mark.timeout(300)
async def test_soak_generate_many_under_chaos() -> None:
    """2,000 generations with chaos=0.2: each is delivered (its own prompt's task) or ends
    with a clear error; uncertain only after an ambiguous create fault; 0 duplicate
    creates; never over the limits; tasks, descriptors and memory back to flat."""
    tasks_before, fds_before = len(asyncio.all_tasks()), open_fds()
    policy = sa.PollPolicy(keep_results=100)
    errors: collections.Counter[str] = collections.Counter()
    delivered = 0
    memory: dict[int, int] = {}
    async with FakeApixo(
        generation_time=lognormal(180, 0.4), failure_rate=0.05, seed=11, balance=1e9, chaos=0.2
    ) as fake:
        async with sa.SoraClient(
            api_key=fake.api_key, base_url=fake.url, poll_policy=policy
        ) as client:
            requests = (sa.TextToVideo(prompt=f"soak {i}", duration=10) for i in range(SOAK))
            done = 0
            async for outcome in client.generate_many(requests):
                done += 1
                if outcome.video is not None:
                    delivered += 1
                    assert fake.tasks[outcome.video.task_id].prompt == outcome.request.prompt
                    assert outcome.video.urls == (
                        f"{fake.origin}/files/{outcome.video.task_id}.mp4",
                    )
                else:
                    assert outcome.error is not None
                    assert str(outcome.error)
                    errors[type(outcome.error).__name__] += 1
                if done in (SOAK // 2, SOAK):
                    memory[done] = client_objects()
        stats = fake.stats
    assert delivered + sum(errors.values()) == SOAK
    assert set(errors) <= CLEAR_ERRORS, errors
    assert delivered > 0.7 * SOAK
    assert errors["SubmitUncertainError"] <= sum(stats.create_faults[k] for k in AMBIGUOUS)
    assert max(stats.creates_per_prompt.values()) == 1
    assert stats.max_requests_in_window <= 60
    assert stats.max_concurrent_tasks <= 10
    assert memory[SOAK] <= memory[SOAK // 2] + 50, memory
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == tasks_before
    assert open_fds() == fds_before


@SOAK_LOOP
@pytest.mark.timeout(300)
async def test_soak_run_batch_under_chaos(tmp_path: Path) -> None:
    """A batch with chaos=0.2, rerun until nothing is left to do: each item ends
    downloaded (bytes equal to the video the fake made), failed or uncertain, with the
    reason; 0 duplicate creates; never over the limits; nothing torn or leaked."""
    source = write_prompts(tmp_path / "prompts.jsonl", BATCH_SOAK)
    out = tmp_path / "out"
    tasks_before, fds_before = len(asyncio.all_tasks()), open_fds()
    async with FakeApixo(
        generation_time=lognormal(180, 0.4), failure_rate=0.05, seed=12, balance=1e9, chaos=0.2
    ) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, out)
            for _ in range(3):  # what a user does after a passing fault: run it again
                if not {"queued", "succeeded"} & set(report.counts):
                    break
                report = await sa.run_batch(client, source, out)
        stats = fake.stats
        tasks = fake.tasks
    assert set(report.counts) <= {"downloaded", "failed", "uncertain"}, report.counts
    for row in report.rows:
        if row.state is sa.ItemState.DOWNLOADED:
            record = tasks[str(row.task_id)]
            assert record.prompt == json.loads(row.request)["prompt"]
            (file,) = row.files
            whole = build_mp4(record.task_id, record.duration, record.width, record.height)
            assert Path(file).read_bytes() == whole
        else:
            assert row.error
    assert not list(out.glob(".*.part"))
    assert report.counts["downloaded"] > 0.7 * BATCH_SOAK
    assert report.counts.get("uncertain", 0) <= sum(stats.create_faults[k] for k in AMBIGUOUS)
    assert max(stats.creates_per_prompt.values()) == 1
    assert stats.max_requests_in_window <= 60
    assert stats.max_concurrent_tasks <= 10
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == tasks_before
    assert open_fds() == fds_before
