"""The task store on Redis: idempotency keys and adopted tasks across OS processes.

A worker process creates tasks under idempotency keys and is SIGKILLed; a client in
the test's process, on the same Redis, finds each key's task (no second create),
adopts the tasks through its RedisGovernor and writes their ends in the records.
Real time, a real redis-server, the fake service's counters judge.
"""

from __future__ import annotations

import asyncio
import json
import secrets
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


async def test_the_ledger_on_redis_counts_tasks_by_batch_once_each(
    redis_server: RedisServer,
) -> None:
    """Each task is counted once under its batch ("" for the rest), in the state it is
    in, however many times its record is written (queued, submitting, running, end)."""
    api_key = secrets.token_hex(8)  # a ledger of its own on the session's Redis
    async with FakeApixo(api_key=api_key, generation_time=fixed(1.0), pending_time=0.05) as fake:
        governor = sa.RedisGovernor(redis_server.url, api_key=api_key, trust_empty_redis=True)
        store = sa.RedisStore(redis_server.url, api_key=api_key)
        async with sa.SoraClient(
            api_key=api_key,
            base_url=fake.url,
            governor=governor,
            store=store,
            poll_policy=sa.PollPolicy(prior_mean=1.0, min_interval=0.2),
            wait_timeout=20,
        ) as client:
            night = [sa.TextToVideo(prompt=f"night {n}") for n in range(3)]
            night.append(sa.TextToVideo(prompt="night [fail:BOOM]"))
            ids = [await client.submit(request, batch="night") for request in night]
            ids.append(await client.submit(sa.TextToVideo(prompt="service")))
            assert await store.counts() == {"night": {"running": 4}, "": {"running": 1}}
            ended = await asyncio.gather(*(client.wait(i) for i in ids), return_exceptions=True)
            assert sum(isinstance(end, sa.TaskFailedError) for end in ended) == 1
        await store.open()  # the client closed it; a watcher opens its own
        try:
            assert await store.counts() == {
                "night": {"succeeded": 3, "failed": 1},
                "": {"succeeded": 1},
            }
        finally:
            await store.close()
