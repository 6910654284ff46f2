"""Priorities on one key in one process: a user's request before the batch, reserved
slots (and their lending), and no starvation. Virtual time, the real client against
the fake service at the real limits."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import sora_async as sa
import sora_async.otel
from sora_async.testing import FakeApixo, fixed
from tests.test_otel import points

pytestmark = pytest.mark.looptime


def prompt(name: str) -> sa.TextToVideo:
    return sa.TextToVideo(prompt=name, duration=10)


async def test_an_interactive_create_takes_the_next_free_slot_before_waiting_batch_ones() -> None:
    async with FakeApixo(generation_time=fixed(100), balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            reader = InMemoryMetricReader()
            sora_async.otel.instrument(client, meter_provider=MeterProvider([reader]))
            loop = asyncio.get_running_loop()
            for n in range(10):  # the key's 10 slots, ending a second apart
                await client.submit(prompt(f"running {n}"), priority="batch")
                await asyncio.sleep(1)
            done: dict[str, float] = {}

            async def create(name: str, priority: sa.Priority) -> None:
                await client.submit(prompt(name), priority=priority)
                done[name] = loop.time()

            async with asyncio.TaskGroup() as group:
                for n in range(4):
                    group.create_task(create(f"batch {n}", "batch"))
                    await asyncio.sleep(0.5)
                assert client.snapshot().slot_waiters_by_priority == {
                    "interactive": 0,
                    "normal": 0,
                    "batch": 4,
                }
                group.create_task(create("user", "interactive"))
                await asyncio.sleep(0.5)
                assert client.snapshot().slot_waiters_by_priority["interactive"] == 1
                assert client.snapshot().slots_by_priority == {
                    "interactive": 0,
                    "normal": 0,
                    "batch": 10,
                }
                waiting = {
                    point.attributes["sora_async.priority"]: point.value
                    for point in points(reader)["sora_async.slots.waiters.by_priority"]
                }
                assert waiting == {"interactive": 1, "normal": 0, "batch": 4}
                while "user" not in done:  # noqa: ASYNC110 - the client's own progress
                    await asyncio.sleep(1)
                held = client.snapshot().slots_by_priority
                assert held == {"interactive": 1, "normal": 0, "batch": 9}
                used = {
                    point.attributes["sora_async.priority"]: point.value
                    for point in points(reader)["sora_async.slots.usage.by_priority"]
                }
                assert used == held
        stats = fake.stats
    # The batch's creates came first, yet the first slot that freed went to the user.
    assert done["user"] < min(done[f"batch {n}"] for n in range(4))
    assert [done[f"batch {n}"] for n in range(4)] == sorted(done[f"batch {n}"] for n in range(4))
    assert stats.concurrency_limited == 0
    assert stats.max_concurrent_tasks == 10


async def test_reserved_slots_let_a_user_start_at_once_while_a_batch_fills_the_key() -> None:
    governor = sa.LocalGovernor(sa.Limits(), reserved=1, lend_after=600)
    async with FakeApixo(generation_time=fixed(100), balance=1e6) as fake:
        async with sa.SoraClient(
            api_key=fake.api_key, base_url=fake.url, governor=governor
        ) as client:
            loop = asyncio.get_running_loop()
            await client.generate(prompt("first user"), priority="interactive")
            held: list[tuple[float, int]] = []

            async def watch() -> None:
                while True:
                    held.append((loop.time(), governor.slots_in_use))
                    await asyncio.sleep(1)

            async def batch() -> None:
                requests = (prompt(f"item {n}") for n in range(100))
                async for outcome in client.generate_many(requests, priority="batch"):
                    assert outcome.error is None

            watcher = asyncio.ensure_future(watch())
            night = asyncio.ensure_future(batch())
            await asyncio.sleep(300)
            asked = loop.time()
            await client.submit(prompt("second user"), priority="interactive")
            user_wait = loop.time() - asked
            await night
            watcher.cancel()
        stats = fake.stats
    started = held[0][0]
    # The batch keeps the last slot free while users came in the last 600 s ...
    assert max(n for t, n in held if t < started + 290) == 9
    assert user_wait < 2.0  # ... so the second user started at once,
    # ... and is lent it once they stopped coming.
    assert max(n for t, n in held if t > started + 1000) == 10
    assert stats.concurrency_limited == 0
    assert set(stats.creates_per_prompt.values()) == {1}


async def test_a_batch_keeps_moving_under_a_flood_of_users() -> None:
    governor = sa.LocalGovernor(sa.Limits(), starve_after=300)
    async with FakeApixo(generation_time=fixed(100), balance=1e6) as fake:
        async with sa.SoraClient(
            api_key=fake.api_key, base_url=fake.url, governor=governor
        ) as client:
            loop = asyncio.get_running_loop()
            flooding = True

            async def user(n: int) -> None:
                round_ = 0
                while flooding:
                    await client.generate(prompt(f"user {n} {round_}"), priority="interactive")
                    round_ += 1

            users = [asyncio.ensure_future(user(n)) for n in range(15)]  # always some waiting
            await asyncio.sleep(5)
            asked = loop.time()
            await client.submit(prompt("batch item"), priority="batch")
            batch_wait = loop.time() - asked
            flooding = False
            await asyncio.gather(*users)
        stats = fake.stats
    # Strict priority would keep it waiting as long as users come; after waiting 300 s
    # it is served with them, in order of arrival: within one more turnover.
    assert 300 <= batch_wait < 300 + 110
    assert stats.concurrency_limited == 0


async def test_an_unknown_priority_is_refused_before_any_request() -> None:
    async with FakeApixo() as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            with pytest.raises(sa.InputError) as caught:
                await client.submit(prompt("x"), priority="urgent")  # type: ignore[arg-type]
            assert caught.value.field == "priority"
            with pytest.raises(sa.InputError):
                client.generate_many([prompt("y")], priority="high")  # type: ignore[arg-type]
        assert fake.stats.requests == 0
    with pytest.raises(sa.InputError) as caught:
        sa.LocalGovernor(sa.Limits(), reserved=10)
    assert caught.value.field == "reserved"
