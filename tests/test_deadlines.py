"""Deadlines that hold: wait, status and generate answer by their ``timeout``, the wait for
a request permit or a task slot included, and an unknown id costs at most one request."""

from __future__ import annotations

import asyncio
import logging

import pytest

import sora_async as sa
from sora_async.testing import FakeApixo, fixed

pytestmark = pytest.mark.looptime


def prompts(count: int, label: str = "deadline") -> list[sa.TextToVideo]:
    return [sa.TextToVideo(prompt=f"{label} {i}", duration=10) for i in range(count)]


def unknown_lookups(fake: FakeApixo) -> int:
    """Return the status requests the fake saw for ids it never made."""
    known = sum(task.polls for task in fake.tasks.values())
    return fake.stats.requests_by_kind["status"] - known


async def test_lookups_of_unknown_ids_beside_a_busy_governor_answer_by_their_deadline() -> None:
    """120 waits and status calls for unknown ids with timeout=5, beside ten generations and
    sixty queued status calls of other users: each answers within 6 s (NotFoundError, or
    TaskTimeoutError when no permit came in time), each costs at most one request, their
    queue places are given back, and the generations go on inside the limits."""
    loop = asyncio.get_running_loop()
    async with FakeApixo(generation_time=fixed(120.0), balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            ids = [await client.submit(request) for request in prompts(10)]
            backlog = [asyncio.ensure_future(client.status(ids[i % 10])) for i in range(60)]
            await asyncio.sleep(1.0)  # the backlog is in line for permits

            async def look(number: int) -> tuple[str, float]:
                task_id = f"task_{number:016x}"
                started = loop.time()
                try:
                    if number % 2:
                        await client.status(task_id, timeout=5)
                    else:
                        await client.wait(task_id, timeout=5)
                except (sa.TaskTimeoutError, sa.NotFoundError) as exc:
                    return type(exc).__name__, loop.time() - started
                return "answered", loop.time() - started

            answers = await asyncio.gather(*(look(number) for number in range(120)))
            lookups = unknown_lookups(fake)
            not_found = sum(kind == "NotFoundError" for kind, _ in answers)
            # The places of the 120 were given back: once the backlog is served, a
            # new lookup waits only for the pacing.
            await asyncio.gather(*backlog)
            started = loop.time()
            await client.status(ids[0], timeout=5)
            prompt_answer = loop.time() - started
            videos = await asyncio.gather(*(client.wait(task_id) for task_id in ids))
        stats = fake.stats
    assert {kind for kind, _ in answers} <= {"TaskTimeoutError", "NotFoundError"}
    assert max(seconds for _, seconds in answers) <= 6.0
    assert lookups == not_found <= 120  # one request for each answered, none for the rest
    assert prompt_answer < 5.0  # a pacing step or two, not 120 abandoned places
    assert [video.task_id for video in videos] == ids
    assert stats.rate_limited == 0
    assert stats.max_requests_in_window <= 60


async def test_an_unknown_id_with_free_permits_costs_exactly_one_request() -> None:
    """With permits free, wait() and status() of an unknown id raise NotFoundError after
    exactly one status request each (a 404 is not retried)."""
    fake = FakeApixo()
    async with fake, sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        with pytest.raises(sa.NotFoundError):
            await client.wait("task_0000000000000001", timeout=5)
        assert (unknown_lookups(fake), fake.stats.requests) == (1, 1)
        with pytest.raises(sa.NotFoundError):
            await client.status("task_0000000000000002")
        assert (unknown_lookups(fake), fake.stats.requests) == (2, 2)


async def test_generate_waiting_for_a_slot_times_out_without_a_create() -> None:
    """With every slot busy, generate(timeout=5) raises TaskTimeoutError without a task id
    after 5 s; nothing was created for it and its place in the slot line is given back."""
    loop = asyncio.get_running_loop()
    async with FakeApixo(generation_time=fixed(120.0), balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            ids = [await client.submit(request) for request in prompts(10)]
            started = loop.time()
            with pytest.raises(sa.TaskTimeoutError) as caught:
                await client.generate(sa.TextToVideo(prompt="too late"), timeout=5)
            waited = loop.time() - started
            assert (client.governor.slot_waiters, client.governor.slots_in_use) == (0, 10)
            await asyncio.gather(*(client.wait(task_id) for task_id in ids))
        stats = fake.stats
    assert (caught.value.task_id, caught.value.timeout) == (None, 5)
    assert 5.0 <= waited <= 6.0
    assert stats.creates == 10
    assert "too late" not in stats.creates_per_prompt


async def test_generate_times_out_with_the_task_id_once_the_task_exists() -> None:
    """generate(timeout=30) of a 120-s video raises TaskTimeoutError naming the task after
    30 s; the task stays tracked and wait() later returns its video."""
    fake = FakeApixo(generation_time=fixed(120.0))
    async with fake, sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        with pytest.raises(sa.TaskTimeoutError) as caught:
            await client.generate(sa.TextToVideo(prompt="slow one"), timeout=30)
        assert fake.now() <= 31.0
        task_id = caught.value.task_id
        assert task_id is not None
        assert caught.value.timeout == 30
        video = await client.wait(task_id)
    assert video.task_id == task_id
    assert fake.stats.creates == 1


async def test_a_create_in_flight_at_the_deadline_runs_on_and_is_never_made_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A create whose answer is slower than generate's timeout: TaskTimeoutError without a
    task id at the deadline, but the create runs to its end, its task is tracked (its slot
    held) and its id logged; one task for the prompt, polled to its end."""
    async with FakeApixo(generation_time=fixed(60.0)) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            fake.inject("slow", on="create", delay=10.0)
            with caplog.at_level(logging.WARNING, logger="sora_async"):
                with pytest.raises(sa.TaskTimeoutError) as caught:
                    await client.generate(sa.TextToVideo(prompt="answer late"), timeout=5)
                assert caught.value.task_id is None
                await asyncio.sleep(10.0)
            (task_id,) = fake.tasks
            assert client.scheduler.is_tracked(task_id)
            assert client.governor.slots_in_use == 1
            assert task_id in caplog.text
            video = await client.wait(task_id)
        stats = fake.stats
    assert video.task_id == task_id
    assert stats.creates_per_prompt["answer late"] == 1


async def test_a_bad_timeout_is_refused_before_any_request(fake: FakeApixo) -> None:
    """A negative or non-numeric timeout raises InputError naming it; nothing is sent."""
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        for call in (
            client.status("task_1", timeout=-1),
            client.wait("task_1", timeout=-0.5),
            client.generate(sa.TextToVideo(prompt="x"), timeout=float("nan")),
        ):
            with pytest.raises(sa.InputError) as caught:
                await call
            assert caught.value.field == "timeout"
    assert fake.stats.requests == 0


async def test_tasks_we_do_not_know_cut_our_slots_not_our_rate() -> None:
    """Another client left 10 tasks running on the key (a restarted process, say); ours
    then generates 10 videos. The service refuses only creates, our rate factor stays
    1.0, our slot limit falls to 1 while their tasks hold the key's slots and climbs
    back to 10 once they end, and no window holds more than 60 requests."""
    loop = asyncio.get_running_loop()
    fake = FakeApixo(generation_time=fixed(120.0), balance=1e6)
    async with fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as other:
            theirs = [await other.submit(request) for request in prompts(10, "theirs")]
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            governor = client.governor
            seen: list[tuple[float, float, int]] = []

            async def watch() -> None:
                while True:
                    seen.append((loop.time(), governor.rate_factor, governor.slot_limit))
                    await asyncio.sleep(1.0)

            watcher = asyncio.ensure_future(watch())
            outcomes = [o async for o in client.generate_many(prompts(10, "ours"))]
            watcher.cancel()
            last_limit = governor.slot_limit
        stats = fake.stats
        ours = [fake.tasks[o.task_id] for o in outcomes if o.task_id is not None]
    their_end = max(fake.tasks[task_id].complete_at for task_id in theirs)
    assert all(o.ok for o in outcomes)
    assert stats.rate_limited == stats.concurrency_limited == stats.rate_limited_by_kind["create"]
    # The first ten creates went out together; then one probe at a time, backing off.
    assert stats.rate_limited <= 10 + 8
    assert {factor for _, factor, _ in seen} == {1.0}
    assert {limit for at, _, limit in seen if 5 < at < their_end} == {1}
    assert last_limit == 10
    assert min(task.created_at for task in ours) - their_end < 60.0
    assert stats.max_requests_in_window <= 60
    assert stats.max_concurrent_tasks <= 10
    print(
        f"creates refused: {stats.rate_limited}; ours started "
        f"{min(t.created_at for t in ours) - their_end:.1f} s after theirs ended"
    )
