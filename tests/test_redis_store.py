"""The task store on Redis: idempotency keys and adopted tasks across OS processes.

A worker process creates tasks under idempotency keys and is SIGKILLed; a client in
the test's process, on the same Redis, finds each key's task (no second create),
adopts the tasks through its RedisGovernor and writes their ends in the records.
Real time, a real redis-server, the fake service's counters judge.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap

import pytest
import redis.asyncio as aioredis

import sora_async as sa
from sora_async.testing import FakeApixo, RedisServer, fixed

pytestmark = [pytest.mark.looptime(False), pytest.mark.timeout(60)]

KEYS = [f"order-{n}" for n in range(4)]

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import sora_async as sa

    async def main(redis_url, base_url, api_key):
        governor = sa.RedisGovernor(redis_url, api_key=api_key, lease=1.0, trust_empty_redis=True)
        store = sa.RedisStore(redis_url, api_key=api_key)
        async with sa.SoraClient(
            api_key=api_key, base_url=base_url, governor=governor, store=store
        ) as client:
            for key in sys.argv[4:]:
                task_id = await client.submit(sa.TextToVideo(prompt=key), idempotency_key=key)
                print(key, task_id, flush=True)
            await asyncio.sleep(3600)  # holding the tasks until killed

    asyncio.run(main(*sys.argv[1:4]))
    """
)


def test_bad_settings_are_refused_naming_the_field() -> None:
    with pytest.raises(sa.InputError) as caught:
        sa.RedisStore("http://localhost", api_key="k")
    assert caught.value.field == "url"
    with pytest.raises(sa.InputError) as caught:
        sa.RedisStore("redis://localhost", api_key="k", keep=0)
    assert caught.value.field == "keep"


async def test_keys_and_tasks_outlive_a_killed_process(redis_server: RedisServer) -> None:
    async with FakeApixo(generation_time=fixed(2.0), pending_time=0.05) as fake:
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            redis_server.url,
            fake.url,
            fake.api_key,
            *KEYS,
            stdout=asyncio.subprocess.PIPE,
        )
        assert worker.stdout is not None
        made = {}
        for _ in KEYS:
            key, task_id = (await worker.stdout.readline()).decode().split()
            made[key] = task_id
        worker.send_signal(signal.SIGKILL)
        await worker.wait()

        governor = sa.RedisGovernor(redis_server.url, api_key=fake.api_key, lease=1.0)
        store = sa.RedisStore(redis_server.url, api_key=fake.api_key)
        async with sa.SoraClient(
            api_key=fake.api_key,
            base_url=fake.url,
            governor=governor,
            store=store,
            poll_policy=sa.PollPolicy(prior_mean=2.0, min_interval=0.2),
        ) as client:
            again = {
                key: await client.submit(sa.TextToVideo(prompt=key), idempotency_key=key)
                for key in KEYS
            }
            assert again == made
            videos = await asyncio.gather(
                *(client.wait(task_id, timeout=20) for task_id in again.values())
            )
            assert [video.task_id for video in videos] == list(made.values())
            with pytest.raises(sa.IdempotencyConflictError):
                await client.submit(sa.TextToVideo(prompt="another"), idempotency_key=KEYS[0])
        assert fake.stats.creates == len(KEYS)
        assert fake.stats.rate_limited == 0

    redis = aioredis.from_url(redis_server.url)
    try:
        states = set()
        for task_id in made.values():
            key = await redis.get(f"{store.prefix}:task:{task_id}")
            record = json.loads(await redis.get(f"{store.prefix}:record:{key.decode()}"))
            states.add(record["state"])
        assert states == {"succeeded"}
        assert await redis.scard(f"{store.prefix}:unfinished") == 0
    finally:
        await redis.aclose()
