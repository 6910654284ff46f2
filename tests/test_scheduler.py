"""The governor and scheduler together, at the real limits, as the fake server sees them."""

from __future__ import annotations

import asyncio
import secrets

import pytest

import sora_async as sa
from sora_async.testing import FakeApixo, RedisServer, fixed, lognormal

pytestmark = pytest.mark.looptime


def prompts(count: int, prefix: str = "prompt") -> list[sa.TextToVideo]:
    return [sa.TextToVideo(prompt=f"{prefix} {i}", duration=10) for i in range(count)]


async def test_500_generations_stay_inside_the_limits() -> None:
    """500 videos at the real limits: zero 429s, never over 60 requests in any 60-s window,
    never over 10 unfinished tasks, one create per prompt, every video delivered."""
    async with FakeApixo(generation_time=lognormal(180.0, 0.4), seed=3, balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            outcomes = [o async for o in client.generate_many(prompts(500))]
        stats = fake.stats
    assert len(outcomes) == 500
    assert all(o.video is not None and o.error is None for o in outcomes)
    assert stats.rate_limited == 0
    assert stats.max_requests_in_window <= 60
    assert stats.max_concurrent_tasks == 10  # every slot was used, none over
    assert stats.creates == 500
    assert set(stats.creates_per_prompt.values()) == {1}


@pytest.mark.parametrize("learned", [True, False])
async def test_a_margin_learned_over_a_slow_varying_network_keeps_the_window(
    learned: bool,
) -> None:
    """Requests take 0-0.4 s to reach the service and as long back, 200 short videos fill
    the budget: with the margin learned from those answers (or the fixed 1-s one) the
    service sees 0 429s and never more than 60 requests in any 60-s window; the learned
    margin sits between the slowest answer and 1 s."""
    async with FakeApixo(
        generation_time=lognormal(30.0, 0.3), seed=5, balance=1e6, network_delay=0.4
    ) as fake:
        governor = sa.LocalGovernor(learn_margin=learned)
        async with sa.SoraClient(
            api_key=fake.api_key, base_url=fake.url, governor=governor
        ) as client:
            outcomes = [o async for o in client.generate_many(prompts(200))]
            margin = governor.jitter_margin
        stats = fake.stats
    assert all(o.video is not None for o in outcomes)
    assert stats.rate_limited == 0
    assert stats.max_requests_in_window == 60  # the budget was spent in full
    assert 0.4 < margin < 0.85 if learned else margin == 1.0


async def test_thousands_of_concurrent_callers_are_safe_and_fair(fake: FakeApixo) -> None:
    """Many concurrent generate() calls: within limits, and tasks are created in call order."""
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        requests = prompts(60, "caller")

        async def call(request: sa.TextToVideo) -> sa.Video:
            return await client.generate(request)

        calls = []
        for request in requests:
            calls.append(asyncio.ensure_future(call(request)))
            await asyncio.sleep(0)  # the calls start in order
        videos = await asyncio.gather(*calls)
    assert len({v.task_id for v in videos}) == 60
    created = sorted(fake.tasks.values(), key=lambda task: task.created_at)
    assert [task.prompt for task in created] == [r.prompt for r in requests]
    assert fake.stats.rate_limited == 0
    assert fake.stats.max_concurrent_tasks <= 10


async def test_cancelled_caller_keeps_the_slot_until_the_task_ends(
    fake: FakeApixo, client: sa.SoraClient
) -> None:
    """Cancelling an awaiting caller leaves the task tracked and its slot taken; its result
    is still recorded and can be fetched by task id."""
    caller = asyncio.ensure_future(client.generate(sa.TextToVideo(prompt="cancel me")))
    await asyncio.sleep(10)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert client.governor.slots_in_use == 1
    (task_id,) = fake.tasks
    await asyncio.sleep(200)  # the task (120 s) ends; the scheduler sees it
    assert client.governor.slots_in_use == 0
    video = await client.wait(task_id)
    assert video.task_id == task_id


async def test_cancelled_during_create_still_tracks_the_task(
    fake: FakeApixo, client: sa.SoraClient
) -> None:
    """A caller cancelled while its create is in flight: the task is made once and tracked."""
    fake.inject("slow", on="create", delay=5.0)
    caller = asyncio.ensure_future(client.submit(sa.TextToVideo(prompt="in flight")))
    await asyncio.sleep(1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(10)  # the slow create reaches the server and answers
    assert fake.stats.creates == 1
    assert client.governor.slots_in_use == 1
    await asyncio.sleep(300)
    assert client.governor.slots_in_use == 0


async def test_wait_deadline_raises_and_tracking_goes_on(client: sa.SoraClient) -> None:
    """wait(timeout=...) raises TaskTimeoutError; a later wait still gets the video."""
    task_id = await client.submit(sa.TextToVideo(prompt="slow one"))
    with pytest.raises(sa.TaskTimeoutError):
        await client.wait(task_id, timeout=30)
    assert client.governor.slots_in_use == 1
    video = await client.wait(task_id)
    assert video.task_id == task_id


async def test_failures_do_not_stop_the_batch(fake: FakeApixo, client: sa.SoraClient) -> None:
    """Refused, failed and invalid items each get their Outcome; the rest still finish."""
    items: list[sa.TextToVideo] = [
        *prompts(5),
        sa.TextToVideo(prompt="bad [violate]"),
        sa.TextToVideo(prompt="fails [fail:NSFW]"),
        *prompts(5, "more"),
    ]
    outcomes = {o.request.prompt: o async for o in client.generate_many(items)}
    assert isinstance(outcomes["bad [violate]"].error, sa.ContentPolicyError)
    failed = outcomes["fails [fail:NSFW]"].error
    assert isinstance(failed, sa.TaskFailedError)
    assert failed.fail_code == "NSFW"
    assert sum(o.ok for o in outcomes.values()) == 10


async def test_async_iterable_is_pulled_lazily(client: sa.SoraClient) -> None:
    """generate_many pulls from an async source only as slots free (memory bounded)."""
    pulled = 0

    async def source() -> object:
        nonlocal pulled
        for request in prompts(40, "lazy"):
            pulled += 1
            yield request

    seen = 0
    async for outcome in client.generate_many(source()):  # type: ignore[arg-type]
        seen += 1
        assert outcome.ok
        assert pulled <= seen + 11  # at most the slots (plus the one waiting) ahead
    assert seen == 40


async def test_a_second_program_on_the_key_is_survived() -> None:
    """Another program takes 3 slots and 20 requests a minute: back-off and AIMD carry us
    through, every video arrives, nothing is created twice, and 429s stay few."""
    async with FakeApixo(generation_time=fixed(120.0), balance=1e6) as fake:
        fake.add_neighbour(requests_per_minute=20, tasks=3)
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            outcomes = [o async for o in client.generate_many(prompts(60))]
        stats = fake.stats
    assert [o.error for o in outcomes if not o.ok] == []
    assert set(stats.creates_per_prompt.values()) == {1}
    assert stats.max_concurrent_tasks <= 7
    assert 0 < stats.rate_limited <= 40


async def test_401_mid_batch_stops_everything_fast(fake: FakeApixo) -> None:
    """The key is revoked mid-batch: generate_many raises AuthenticationError after at
    most a handful of refused requests."""
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        seen = 0
        with pytest.raises(sa.AuthenticationError):
            async for _ in client.generate_many(prompts(100)):
                seen += 1
                if seen == 12:
                    fake.api_key = "revoked"
        assert seen >= 12
        creates_before = fake.stats.creates
        await asyncio.sleep(600)
    assert fake.stats.unauthorized <= 3
    assert fake.stats.creates == creates_before


async def test_running_out_of_credits_stops_creates(fake: FakeApixo) -> None:
    """Credits for 12 videos: in-flight tasks finish and are yielded, then
    InsufficientCreditsError is raised and no more creates are tried."""
    fake.set_balance(12 * 3.0)  # 10 s at 0.3 USD/s per video
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        outcomes = []
        with pytest.raises(sa.InsufficientCreditsError):
            async for outcome in client.generate_many(prompts(50)):
                outcomes.append(outcome)
    assert sum(o.ok for o in outcomes) == 12
    assert fake.stats.creates == 12
    assert fake.stats.requests_by_kind["create"] <= 12 + 10


async def test_a_zero_hazard_threshold_still_polls(fake: FakeApixo) -> None:
    """With min_hazard=0 (poll whenever the budget allows) a task whose chance of having
    ended is exactly 0 is still polled later, never forgotten."""
    policy = sa.PollPolicy(min_hazard=0.0, min_interval=0.0, prior_mean=0.01)
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url, poll_policy=policy) as client:
        video = await client.generate(sa.TextToVideo(prompt="zero hazard"), timeout=600)
    assert video.urls


@pytest.mark.looptime(False)
async def test_an_end_one_process_sees_wakes_a_waiter_in_another(
    redis_server: RedisServer,
) -> None:
    """Two clients sharing one key through Redis (two web workers): one creates and polls
    the task, the other awaits it and never polls; the creator's poll that sees the end
    wakes the other's waiter, which spends no request of its own after its first look."""
    async with FakeApixo(
        api_key=secrets.token_hex(8), generation_time=fixed(1.0), pending_time=0.1
    ) as fake:

        def client(governor: sa.RedisGovernor, poll_policy: sa.PollPolicy) -> sa.SoraClient:
            return sa.SoraClient(
                api_key=fake.api_key, base_url=fake.url, governor=governor, poll_policy=poll_policy
            )

        creator_governor = sa.RedisGovernor(
            redis_server.url, api_key=fake.api_key, trust_empty_redis=True
        )
        creator = client(creator_governor, sa.PollPolicy(prior_mean=1.0, min_interval=0.2))
        waiter = client(
            sa.RedisGovernor(redis_server.url, api_key=fake.api_key, trust_empty_redis=True),
            sa.PollPolicy(min_interval=600.0),
        )
        async with creator, waiter:
            task_id = await creator.submit(sa.TextToVideo(prompt="seen elsewhere"))
            video = await waiter.wait(task_id, timeout=20)
            assert creator_governor.slots_held_here == 0  # given back when its poll saw the end
    assert video.task_id == task_id
    assert waiter.scheduler.polls == 0
    assert fake.tasks[task_id].polls == creator.scheduler.polls + 1  # the waiter's one look


async def test_a_task_handed_over_is_still_found_if_its_news_is_lost(
    fake: FakeApixo, client: sa.SoraClient
) -> None:
    """A task another process took over (our lease had lapsed) is not polled here while
    its adopter polls it, but if the news of its end never comes (a lost subscription),
    a poll every two minutes still finds it: its waiter gets the video, not a give-up
    at max_task_age."""
    task_id = await client.submit(sa.TextToVideo(prompt="handed over"))
    client.scheduler_for("sora-2-pro").hand_over(task_id)
    loop = asyncio.get_running_loop()
    started = loop.time()
    video = await client.wait(task_id, timeout=600)
    assert video.task_id == task_id
    assert loop.time() - started <= 125  # it ends at 120 s, seen by the check then
    assert fake.tasks[task_id].polls == 1  # no poll before the check
