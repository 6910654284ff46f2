"""A service and a batch on one key see one ledger: the FastAPI example under uvicorn
and ``sora-async batch --redis-url`` as real processes on one real redis-server, both
recording their tasks in the key's RedisStore, and ``sora-async top`` counting both."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sora_async.testing import FakeApixo, RedisServer, fixed
from tests.processes import app_env, app_process, free_port
from tests.workers import SCALE, scaled_fake, start_worker, top, top_rows, until, write_prompts

pytestmark = [pytest.mark.looptime(False), pytest.mark.timeout(120)]


@contextlib.asynccontextmanager
async def service_beside_batch(
    fake: FakeApixo, redis_url: str, folder: Path, prompts: int, batch: str
) -> AsyncIterator[httpx.AsyncClient]:
    """Run the FastAPI example under uvicorn and a CLI batch of ``prompts`` named
    ``batch`` on ``fake``'s key and one Redis; yield the app's HTTP client, and on the
    way out wait for the batch, which must end with exit code 0."""
    port = free_port()
    env = app_env(
        fake.url,
        fake.api_key,
        f"http://127.0.0.1:{port}",
        SORA_ASYNC_REDIS_URL=redis_url,
        APIXO_LIMITS=f"60/{60.0 / SCALE}/10",
    )
    async with app_process(env, port=port) as app, app.http() as http:
        worker = await start_worker(
            fake, redis_url, write_prompts(folder, prompts), folder / "out", None, "--batch", batch
        )
        yield http
        out, err = await worker.communicate()
        assert worker.returncode == 0, (out + err).decode(errors="replace")


async def test_a_service_and_a_batch_on_one_key_record_into_one_ledger(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """While a batch of 20 runs, the FastAPI example serves 3 videos on the same key:
    `top` shows the batch and the service side by side as they run, and at the end
    20 succeeded in the batch, 3 for the service, nothing in flight; every prompt
    created once, inside the key's limits."""
    # A key of its own: its ledger on the session's Redis holds this test's tasks alone.
    async with scaled_fake(seed=41, api_key=secrets.token_hex(8)) as fake:
        async with service_beside_batch(fake, redis_server.url, tmp_path, 20, "night") as http:
            await until(lambda: fake.stats.creates >= 4)
            made = [await http.post("/videos", json={"prompt": f"kite {n}"}) for n in range(3)]
            assert [answer.status_code for answer in made] == [200] * 3, made[0].text
            running = await top_rows(redis_server.url, fake.api_key)
            assert set(running) == {"(service)", "night"}
            assert running["(service)"]["waiting"] is None
            assert running["(service)"]["in_flight"] + running["(service)"]["succeeded"] == 3
            night = running["night"]
            assert night["waiting"] + night["in_flight"] + night["succeeded"] <= 20
            assert night["in_flight"] + night["succeeded"] >= 4
            for answer in made:
                task_id = answer.json()["task_id"]
                done = await http.get(f"/videos/{task_id}", params={"timeout": 60})
                assert done.status_code == 200, done.text
        ended = await top_rows(redis_server.url, fake.api_key)
    assert ended["night"] | {"name": "-"} == {
        "name": "-",
        "waiting": 0,
        "in_flight": 0,
        "succeeded": 20,
        "failed": 0,
        "uncertain": 0,
    }
    assert ended["(service)"]["succeeded"] == 3
    assert ended["(service)"]["in_flight"] == 0
    stats = fake.stats
    assert stats.rate_limited == 0
    assert stats.max_requests_in_window <= 60
    assert stats.max_concurrent_tasks <= 10
    assert stats.creates == 23
    assert set(stats.creates_per_prompt.values()) == {1}


async def in_flight(redis_url: str, api_key: str) -> int:
    """Return the tasks in flight on the key's ledger, every batch and the service."""
    return sum(row["in_flight"] for row in (await top_rows(redis_url, api_key)).values())


async def test_the_service_requests_overtake_a_running_batch_on_the_same_key(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """A batch of 24 fills the key's 10 slots (videos of 8 s); the FastAPI example's
    requests are interactive with a reserve of one slot: the first takes the next slot
    that frees ahead of the batch's waiting creates, and from then on the batch leaves a
    slot free, so the next requests start at once, one create per prompt, no 429."""
    fake = FakeApixo(
        api_key=secrets.token_hex(8),
        period=60.0 / SCALE,
        generation_time=fixed(8.0),
        pending_time=0.05,
        balance=1e9,
    )
    async with (
        fake,
        service_beside_batch(fake, redis_server.url, tmp_path, 24, "overtaken") as http,
    ):
        await until(lambda: fake.stats.creates >= 10)  # the batch holds every slot
        loop = asyncio.get_running_loop()
        waits = []
        for n in range(4):
            if n:
                # Wait for the reserve to be whole: a video ended, and the batch,
                # whose next create waits for a slot, left that one free.
                while (await in_flight(redis_server.url, fake.api_key)) > 9:  # noqa: ASYNC110 - another process
                    await asyncio.sleep(0.2)
            asked = loop.time()
            answer = await http.post("/videos", json={"prompt": f"user {n}"})
            assert answer.status_code == 200, answer.text
            waits.append(loop.time() - asked)
            figures = await top(redis_server.url, fake.api_key)
            running = {row["name"]: row for row in figures["work"]}
            assert running["overtaken"]["in_flight"] <= 9  # a slot stays the users'
            assert figures["slots_by_priority"]["batch"] <= 9
            assert figures["slots_by_priority"]["interactive"] >= 1
    # The first user waited for a batch video to end (the first ten end together,
    # 8 s after their creates); the others found the reserved slot free, although
    # the batch had a create waiting for a slot all along.
    assert waits[0] < 8.0 + 1.0, waits
    assert max(waits[1:]) < 1.0, waits
    stats = fake.stats
    assert stats.rate_limited == 0
    assert stats.max_concurrent_tasks <= 10
    assert stats.creates == 28
    assert set(stats.creates_per_prompt.values()) == {1}
