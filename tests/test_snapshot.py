"""client.snapshot(): every figure read against the fake service's own counters."""

from __future__ import annotations

import asyncio
import secrets

import msgspec
import pytest

import sora_async as sa
from sora_async.testing import FakeApixo, RedisServer, fixed

pytestmark = pytest.mark.looptime


def prompts(n: int) -> list[sa.TextToVideo]:
    return [sa.TextToVideo(prompt=f"snapshot {i}", duration=10) for i in range(n)]


async def test_snapshot_figures_match_the_service_counters() -> None:
    """With a neighbour holding 3 slots of the key, the snapshot's slots, window use,
    429s, queue and tasks agree with what the service saw; after the batch, its polls
    per task and learned generation time agree with the service's tasks."""
    async with FakeApixo(generation_time=fixed(120.0), balance=1e6) as fake:
        fake.add_neighbour(requests_per_minute=20, tasks=3)
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            empty = client.snapshot()
            assert (empty.slots_in_use, empty.requests_in_window, empty.rate_limited) == (0, 0, 0)
            assert (empty.slot_limit, empty.request_limit, empty.rate_factor) == (10, 60, 1.0)

            async def drain() -> list[sa.Outcome]:
                return [o async for o in client.generate_many(prompts(12))]

            batch = asyncio.ensure_future(drain())
            await asyncio.sleep(50.0)  # inside the first window, before any task ends
            seen = client.snapshot()
            stats = fake.stats
            assert seen.rate_limited == stats.rate_limited > 0
            assert seen.requests_in_window == stats.requests
            assert seen.rate_limited == stats.concurrency_limited  # the neighbour's slots
            assert seen.tasks_in_flight == fake.unfinished_tasks() == stats.creates
            # A create retried after a 429 keeps its slot: slots are the service's tasks
            # plus those creates. generate_many pulls lazily: one more create waits.
            assert seen.tasks_in_flight <= seen.slots_in_use <= 10
            assert seen.slot_waiters == 1
            assert seen.slot_limit < 10
            # Refusals with our window far from full: the neighbour's slots, not the rate.
            assert seen.rate_factor == 1.0
            assert seen.tasks_finished == 0
            outcomes = await batch
            done = client.snapshot()
        stats = fake.stats
        ends = [t.complete_time - t.create_time for t in fake.tasks.values()]
    assert all(o.ok for o in outcomes)
    assert done.tasks_finished == 12 == stats.creates
    assert (done.tasks_in_flight, done.slots_in_use, done.slot_waiters) == (0, 0, 0)
    # A poll refused with 429 (the neighbour's share of the window) is sent again.
    assert done.polls == stats.requests_by_kind["status"] - stats.rate_limited_by_kind["status"]
    assert done.polls_per_finished == pytest.approx(done.polls / 12)
    assert done.rate_limited == stats.rate_limited
    # Learned from the service's 12 times (120 s), blended with the 180-s prior.
    served = sum(ends) / len(ends) / 1000
    assert served <= done.generation_mean < (served + sa.PollPolicy().prior_mean) / 2
    assert done.generation_p90 >= done.generation_mean * 0.9
    assert done.callback_loss is None  # no callbacks: nothing to lose
    assert done.models == {"sora-2-pro": msgspec.structs.replace(done.models["sora-2-pro"])}
    assert done.models["sora-2-pro"].slots_in_use == 0
    decoded = msgspec.json.decode(msgspec.json.encode(done), type=sa.Snapshot)
    assert decoded == done


async def test_a_client_without_callbacks_shows_no_callback_loss() -> None:
    """Without a callback_url the snapshot's callback_loss is None (null in JSON), for
    every model, not a figure that would read as "every callback lost"."""
    async with (
        FakeApixo(generation_time=fixed(60.0), balance=1e6) as fake,
        sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client,
    ):
        await client.generate(sa.Veo31(prompt="no callbacks here"))
        seen = client.snapshot()
    assert seen.callback_loss is None
    assert {m.callback_loss for m in seen.models.values()} == {None}
    assert set(seen.models) == {"sora-2-pro", "veo-3-1"}
    assert msgspec.json.decode(msgspec.json.encode(seen))["callback_loss"] is None


@pytest.mark.looptime(False)
@pytest.mark.timeout(15)
async def test_a_shared_key_shows_the_figures_of_every_process(redis_server: RedisServer) -> None:
    """Two clients sharing a key through Redis each see the key's 429s and slots, summed
    over both, as the service counted them."""
    # A key of its own: the session's Redis holds other tests' keys.
    key = secrets.token_hex(8)
    async with FakeApixo(api_key=key, generation_time=fixed(30.0), pending_time=0.05) as fake:
        fake.inject("rate_limit", on="balance", times=2, retry_after=0.0)

        def client() -> sa.SoraClient:
            governor = sa.RedisGovernor(
                redis_server.url, api_key=fake.api_key, trust_empty_redis=True, lease=1.0
            )
            return sa.SoraClient(api_key=fake.api_key, base_url=fake.url, governor=governor)

        async with client() as first, client() as second:
            await first.balance()  # a 429, then the retry is answered
            await second.balance()
            for i, each in enumerate((first, second, first, second)):
                await each.submit(prompts(4)[i])
            await asyncio.sleep(0.5)  # a lease renewal (every lease/3) reads the key back
            await first.balance()
            await second.balance()
            views = [first.snapshot(), second.snapshot()]
            for view in views:
                assert view.rate_limited == fake.stats.rate_limited == 2
                assert view.slots_in_use == fake.unfinished_tasks() == 4
            # A watcher that takes nothing reads the same key-wide figures.
            watcher = sa.RedisGovernor(redis_server.url, api_key=fake.api_key)
            try:
                await watcher.refresh()
            finally:
                await watcher.aclose()
            assert watcher.rate_limited_seen == fake.stats.rate_limited == 2
            assert watcher.slots_in_use == fake.unfinished_tasks() == 4
            assert watcher.requests_in_window() == fake.stats.requests
            assert (watcher.slot_waiters, watcher.slot_limit) == (0, 10)
            assert watcher.rate_factor == views[0].rate_factor < 1.0
