"""Callbacks end to end: the fake service POSTs to an aiohttp receiver of the real client.

Everything runs in virtual time on loopback: the fake (and its callback deliveries),
the receiver from ``sora_async.webhook.aiohttp_app`` and the client, at the real limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

import sora_async as sa
import sora_async.webhook
from sora_async.testing import FakeApixo, TaskRecord, fixed

pytestmark = pytest.mark.looptime

CALLBACK_PATH = "/apixo/callback"
FORGED_URL = "https://attacker.example/forged.mp4"


@contextlib.asynccontextmanager
async def callback_client(
    fake: FakeApixo, *, base_url: str | None = None, **options: Any
) -> AsyncIterator[sa.SoraClient]:
    """Open a client in callback mode (API at ``base_url``, default the fake's) and its
    aiohttp receiver on a loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    client = sa.SoraClient(
        api_key=fake.api_key,
        base_url=base_url or fake.url,
        callback_url=f"http://127.0.0.1:{port}{CALLBACK_PATH}",
        **options,
    )
    app = sora_async.webhook.aiohttp_app(client)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        async with client:
            yield client
    finally:
        await runner.cleanup()
        sock.close()


def receiver_url(client: sa.SoraClient, token: str | None) -> str:
    """Return the receiver's URL with ``token`` (none if None) in the query."""
    assert client.callback_url is not None
    return client.callback_url if token is None else f"{client.callback_url}?token={token}"


def own_token(fake: FakeApixo, task_id: str) -> str:
    """Return the callback token the client sent with ``task_id``'s create (as a leaked
    callback URL would give it away)."""
    url = fake.tasks[task_id].callback_url
    assert url is not None
    return parse_qs(urlsplit(url).query)["token"][0]


def envelope(task_id: str, state: str = "success", url: str = FORGED_URL) -> bytes:
    """Return a status envelope as a callback carries it (here: made up by a forger)."""
    data: dict[str, Any] = {"taskId": task_id, "state": state, "createTime": 1_700_000_000_000}
    if state == "success":
        data["resultJson"] = json.dumps({"resultUrls": [url]})
        data["completeTime"] = 1_700_000_010_000
    elif state == "failed":
        data |= {"failCode": "NSFW", "failMsg": "forged", "completeTime": 1_700_000_010_000}
    return json.dumps({"code": 200, "message": "success", "data": data}).encode()


def prompts(count: int) -> list[sa.TextToVideo]:
    return [sa.TextToVideo(prompt=f"video {i}", duration=10) for i in range(count)]


def utilisation(tasks: Iterable[TaskRecord], slots: int = 10) -> float:
    """Busy slot-time from the first create to the last / (slots x that span).

    As benchmarks/utilization.py: while prompts wait for a slot, every idle
    slot-second is the client's waste; the drain at the end is nobody's.
    """
    records = list(tasks)
    first = min(t.created_at for t in records)
    last = max(t.created_at for t in records)
    busy = sum(max(0.0, min(t.complete_at, last) - max(t.created_at, first)) for t in records)
    return busy / (slots * (last - first))


def true_url(fake: FakeApixo, task_id: str) -> str:
    return f"{fake.origin}/files/{task_id}.mp4"


# --- many videos ---------------------------------------------------------------------------


async def test_500_videos_with_callbacks_fill_every_slot_at_few_requests() -> None:
    """With callbacks, 500 videos at the real limits: all delivered, no 429, never over
    60 requests a minute or 10 tasks, one create per prompt, under 4 status requests a
    video (polling alone needs ~17), and task slots busy at least 99% of the time."""
    async with FakeApixo(seed=5, balance=1e9) as fake:
        async with callback_client(fake) as client:
            outcomes = [o async for o in client.generate_many(prompts(500))]
        stats = fake.stats
        tasks = list(fake.tasks.values())
    assert len(outcomes) == 500
    assert all(o.video is not None and o.error is None for o in outcomes)
    assert all(o.video.url == true_url(fake, o.video.task_id) for o in outcomes if o.video)
    assert stats.rate_limited == 0
    assert stats.max_requests_in_window <= 60
    assert stats.max_concurrent_tasks <= 10
    assert stats.creates == 500
    assert set(stats.creates_per_prompt.values()) == {1}
    assert stats.callbacks_delivered == 500
    assert stats.callbacks_lost == 0
    assert stats.requests_by_kind["status"] / 500 < 4
    figure = utilisation(tasks)
    print(f"slot utilisation with callbacks: {figure:.4f}")
    assert figure >= 0.995


async def test_lost_callbacks_are_caught_by_polling() -> None:
    """With 30% of callbacks lost, every video still arrives, inside the limits, and the
    slots stay busy at least 97% of the time (polling catches the lost ones)."""
    async with FakeApixo(seed=6, balance=1e9, callback_loss=0.3) as fake:
        async with callback_client(fake) as client:
            outcomes = [o async for o in client.generate_many(prompts(500))]
            loss = client.scheduler.callback_loss
        stats = fake.stats
        tasks = list(fake.tasks.values())
    assert len(outcomes) == 500
    assert all(o.ok for o in outcomes)
    assert stats.callbacks_lost > 100  # the fake really dropped about 150
    assert stats.rate_limited == 0
    assert stats.max_requests_in_window <= 60
    assert stats.max_concurrent_tasks <= 10
    assert set(stats.creates_per_prompt.values()) == {1}
    assert 0.2 < loss < 0.4  # the client learned how many go missing
    figure = utilisation(tasks)
    print(f"slot utilisation with 30% of callbacks lost: {figure:.4f}")
    assert figure >= 0.98


# --- forged, broken, repeated callbacks ------------------------------------------------------


async def test_the_snapshot_shows_the_learned_callback_loss() -> None:
    """A client with callbacks shows the share of lost callbacks it has learned in its
    snapshot (per model too): a number, lower once callbacks arrive."""
    async with FakeApixo(seed=3, balance=1e9) as fake, callback_client(fake) as client:
        before = client.snapshot().callback_loss
        outcomes = [o async for o in client.generate_many(prompts(20))]
        after = client.snapshot()
    assert all(o.ok for o in outcomes)
    assert isinstance(before, float)
    assert after.callback_loss is not None
    assert after.callback_loss < before
    assert after.models["sora-2-pro"].callback_loss == after.callback_loss


async def test_forged_success_never_becomes_the_result() -> None:
    """A made-up success callback for a running task, whatever its token, never ends
    the task: wait() returns the true video at the true end. A wrong token is refused
    (403); the secret or another task's token is dropped at no cost; only the task's
    own token (its callback URL leaked) costs status requests: a confirmation and at
    most one recheck (the status could lag a true callback)."""
    loop = asyncio.get_running_loop()
    async with FakeApixo(generation_time=fixed(120.0)) as fake:
        async with callback_client(fake) as client:
            task_id = await client.submit(sa.TextToVideo(prompt="real one", duration=10))
            await asyncio.sleep(10)
            polls = fake.tasks[task_id].polls
            body = envelope(task_id)
            assert await fake.forge_callback(receiver_url(client, None), body) == 403
            assert await fake.forge_callback(receiver_url(client, "guess"), body) == 403
            await asyncio.sleep(1)
            assert fake.tasks[task_id].polls == polls  # refused unread: no request spent
            # The secret itself, or another task's token, is no claim on this task:
            # taken (200) and dropped without a request.
            assert client.callback_secret is not None
            other = await client.submit(sa.TextToVideo(prompt="another one", duration=10))
            polls = fake.tasks[task_id].polls
            for token in (client.callback_secret, own_token(fake, other)):
                assert await fake.forge_callback(receiver_url(client, token), body) == 200
            await asyncio.sleep(1)
            assert fake.tasks[task_id].polls == polls
            # Even its own token (say its URL leaked) cannot end it: it is confirmed.
            right = receiver_url(client, own_token(fake, task_id))
            assert await fake.forge_callback(right, body) == 200
            failed = envelope(task_id, "failed")
            assert await fake.forge_callback(right, failed) == 200
            await asyncio.sleep(5)
            assert client.scheduler.result(task_id) is None
            assert client.governor.slots_in_use == 2
            assert fake.tasks[task_id].polls <= polls + 2
            video = await client.wait(task_id)
            ended = fake.now()
        record = fake.tasks[task_id]
    assert video.url == true_url(fake, task_id)
    assert video.urls == (true_url(fake, task_id),)
    assert ended >= record.complete_at
    assert ended - record.complete_at < 5  # the true callback ended it at once
    assert loop.time() >= 120


async def test_bad_callbacks_get_clear_answers_and_change_nothing() -> None:
    """Unknown task id: 200 and nothing changes (no request spent); a body that is not
    JSON or not an envelope (nested thousands deep included): 400; a body over 64 KiB:
    413; a wrong token: 403 before the body is even read."""
    async with FakeApixo(generation_time=fixed(120.0)) as fake, callback_client(fake) as client:
        task_id = await client.submit(sa.TextToVideo(prompt="real one", duration=10))
        await asyncio.sleep(5)
        requests = fake.stats.requests
        assert client.callback_secret is not None
        right = receiver_url(client, client.callback_secret)
        assert await fake.forge_callback(right, envelope("task_not_ours")) == 200
        assert await fake.forge_callback(right, b"<html>not json</html>") == 400
        assert await fake.forge_callback(right, b'{"code": 200, "data": [1, 2]}') == 400
        assert await fake.forge_callback(right, b'{"code": 200, "data": {"taskId": 1}}') == 400
        broken = b'{"code":200,"data":{"taskId":"t","state":"success","resultJson":"{"}}'
        assert await fake.forge_callback(right, broken) == 400
        deep = b"[" * 3000 + b"]" * 3000  # 6 KB: msgspec would raise RecursionError
        assert await fake.forge_callback(right, deep) == 400
        assert await fake.forge_callback(right, b'{"code": 200, "data": ' + deep + b"}") == 400
        deep_result = {"taskId": task_id, "state": "success", "resultJson": "[" * 3000}
        body = json.dumps({"code": 200, "data": deep_result}).encode()
        assert await fake.forge_callback(right, body) == 400
        huge = envelope(task_id)[:-1] + b', "pad": "' + b"x" * (64 * 1024) + b'"}'
        assert await fake.forge_callback(right, huge) == 413
        assert await fake.forge_callback(receiver_url(client, "bad"), b"junk") == 403
        await asyncio.sleep(5)
        assert fake.stats.requests == requests  # none of them cost a request
        assert client.scheduler.in_flight == 1
        assert client.scheduler.result(task_id) is None
        video = await client.wait(task_id)
    assert video.url == true_url(fake, task_id)


async def test_duplicate_and_late_callbacks_are_harmless() -> None:
    """Every callback delivered twice, plus stale 'processing' and forged copies after
    the end: each video is delivered once, true, and no later callback changes it."""
    fake = FakeApixo(generation_time=fixed(60.0), callback_duplicates=1.0)
    async with fake, callback_client(fake) as client:
        items = prompts(12)
        outcomes = [o async for o in client.generate_many(items)]
        await asyncio.sleep(30)  # every duplicate arrives
        assert fake.stats.callbacks_duplicated == 12
        assert client.callback_secret is not None
        right = receiver_url(client, client.callback_secret)
        first = outcomes[0].task_id
        assert first is not None
        requests = fake.stats.requests
        for state in ("processing", "pending", "failed", "success"):
            assert await fake.forge_callback(right, envelope(first, state)) == 200
        assert fake.stats.requests == requests  # a finished task needs no confirming
        assert client.scheduler.result(first) is not None
        video = await client.wait(first)
    assert len(outcomes) == 12
    assert all(o.video and o.video.url == true_url(fake, o.video.task_id) for o in outcomes)
    assert video.url == true_url(fake, first)
    assert set(fake.stats.creates_per_prompt.values()) == {1}


async def test_out_of_order_callbacks_before_the_end_are_harmless() -> None:
    """'pending' and 'processing' callbacks for a running task (late, out of order)
    neither end it nor cost a request; the true end still arrives."""
    async with FakeApixo(generation_time=fixed(90.0)) as fake, callback_client(fake) as client:
        task_id = await client.submit(sa.TextToVideo(prompt="in order", duration=10))
        await asyncio.sleep(20)
        requests = fake.stats.requests
        assert client.callback_secret is not None
        right = receiver_url(client, client.callback_secret)
        for state in ("processing", "pending", "processing"):
            assert await fake.forge_callback(right, envelope(task_id, state)) == 200
        await asyncio.sleep(1)
        assert fake.stats.requests == requests
        assert client.scheduler.in_flight == 1
        video = await client.wait(task_id)
    assert video.url == true_url(fake, task_id)


# --- trust and speed -------------------------------------------------------------------------


@pytest.mark.parametrize(("confirm", "status_requests"), [(False, 0), (True, 1)])
async def test_trusted_callbacks_settle_tasks_without_status_requests(
    confirm: bool, status_requests: int
) -> None:
    """With confirm_callbacks=False, a callback bearing the right token ends the task at
    once without any status request (with the default, one request confirms it); either
    way wait() returns the true video at the true end and the slot is free again."""
    fake = FakeApixo(generation_time=fixed(30.0))
    async with fake, callback_client(fake, confirm_callbacks=confirm) as client:
        task_id = await client.submit(sa.TextToVideo(prompt="trusted", duration=10))
        video = await client.wait(task_id)
        ended = fake.now()
        assert client.governor.slots_in_use == 0
    record = fake.tasks[task_id]
    assert video.url == true_url(fake, task_id)
    assert record.polls == status_requests
    assert fake.stats.requests_by_kind["status"] == status_requests
    assert fake.stats.callbacks_delivered == 1
    assert 0 <= ended - record.complete_at < 1.5


async def test_trusted_callback_frees_the_slot_for_the_next_create() -> None:
    """With confirm_callbacks=False and all ten slots busy, the 11th create goes out
    as soon as the first task's callback arrives."""
    fake = FakeApixo(generation_time=fixed(30.0))
    async with fake, callback_client(fake, confirm_callbacks=False) as client:
        outcomes = [o async for o in client.generate_many(prompts(11))]
    assert all(o.ok for o in outcomes)
    created = sorted(fake.tasks.values(), key=lambda task: task.created_at)
    assert created[0].polls == 0  # ended by its callback alone
    assert 0 <= created[10].created_at - created[0].complete_at < 0.5


async def test_trusted_mode_still_refuses_wrong_tokens() -> None:
    """With confirm_callbacks=False, a forged callback without the right token is refused
    (403) and the task ends only at its true end, with its true video."""
    fake = FakeApixo(generation_time=fixed(60.0))
    async with fake, callback_client(fake, confirm_callbacks=False) as client:
        task_id = await client.submit(sa.TextToVideo(prompt="trusting", duration=10))
        await asyncio.sleep(5)
        assert await fake.forge_callback(receiver_url(client, "nope"), envelope(task_id)) == 403
        assert await fake.forge_callback(receiver_url(client, None), envelope(task_id)) == 403
        video = await client.wait(task_id)
        ended = fake.now()
    assert video.url == true_url(fake, task_id)
    assert ended >= fake.tasks[task_id].complete_at


async def test_callback_is_answered_before_the_confirming_request() -> None:
    """The receiver answers a callback at once, not after its confirming status request:
    with status answers 60 s slow and a 5-s callback deadline, no delivery fails."""
    loop = asyncio.get_running_loop()
    async with FakeApixo(generation_time=fixed(120.0), callback_timeout=5.0) as fake:
        async with callback_client(fake) as client:
            task_id = await client.submit(sa.TextToVideo(prompt="slow confirm", duration=10))
            await asyncio.sleep(10)
            fake.inject("slow", on="status", delay=60.0, times=5)
            assert client.callback_secret is not None
            right = receiver_url(client, client.callback_secret)
            sent = loop.time()
            assert await fake.forge_callback(right, envelope(task_id)) == 200
            assert loop.time() - sent < 1.0  # its confirmation takes 60 s
            video = await client.wait(task_id)
        stats = fake.stats
    assert video.url == true_url(fake, task_id)
    assert stats.callbacks_delivered == 1
    assert stats.callbacks_failed_attempts == 0


async def test_callback_body_sent_in_pieces_is_read_whole() -> None:
    """A callback whose body arrives in several TCP pieces (chunked) is read whole and
    taken (200), and one over 64 KiB sent in pieces is refused with 413."""
    async with FakeApixo(generation_time=fixed(120.0)) as fake, callback_client(fake) as client:
        task_id = await client.submit(sa.TextToVideo(prompt="pieces", duration=10))
        assert client.callback_secret is not None
        right = receiver_url(client, client.callback_secret)
        body = envelope(task_id, "processing")

        async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
            for start in range(0, len(data), size):
                yield data[start : start + size]
                await asyncio.sleep(0.1)

        async with aiohttp.ClientSession() as session:
            async with session.post(right, data=pieces(body, 16)) as response:
                small = response.status
            async with session.post(right, data=pieces(b"x" * 70_000, 4096)) as response:
                large = response.status
    assert (small, large) == (200, 413)


@contextlib.asynccontextmanager
async def slow_network(
    fake: FakeApixo, hold: float, window: tuple[float, float]
) -> AsyncIterator[str]:
    """Relay the API to ``fake``; hold back the answer of the first status request that
    arrives within ``window`` (loop time) for ``hold`` seconds after the fake made it.

    Yields the relay's base URL. Nothing of the client is replaced: this is latency.
    """
    loop = asyncio.get_running_loop()
    held: list[float] = []

    async def relay(request: web.Request) -> web.Response:
        arrived = loop.time()
        headers = {"Authorization": request.headers.get("Authorization", "")}
        target = fake.origin + request.rel_url.path_qs
        body = await request.read()
        async with session.request(request.method, target, headers=headers, data=body) as answer:
            content, status = await answer.read(), answer.status
        if "/statusTask/" in request.path and not held and window[0] <= arrived < window[1]:
            held.append(arrived)
            await asyncio.sleep(hold)
        return web.Response(body=content, status=status, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    async with aiohttp.ClientSession() as session:
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            port = runner.addresses[0][1]
            yield f"http://127.0.0.1:{port}/api/v1"
        finally:
            await runner.cleanup()
    assert held, "no status request was held: the scenario did not happen"


async def test_callback_during_an_answer_in_flight_is_not_forgotten() -> None:
    """A callback that arrives while a status answer made before the task ended is still
    on its way is acted on: the task is confirmed as soon as that stale answer lands,
    not left to the slow safety net, and not counted as a lost callback."""
    fake = FakeApixo(generation_time=fixed(100.0))
    async with (
        fake,
        slow_network(fake, hold=15.0, window=(95.0, 100.0)) as api,
        callback_client(fake, base_url=api) as client,
    ):
        prior_loss = client.scheduler.callback_loss
        task_id = await client.submit(sa.TextToVideo(prompt="mid-poll", duration=10))
        await asyncio.sleep(95.0 - fake.now())
        # An early callback (say, a provider glitch) makes the client confirm at 95 s;
        # the answer, "processing", is held on the wire until 110 s. At 100 s the
        # task ends and its true callback arrives while that answer is on its way.
        right = receiver_url(client, own_token(fake, task_id))
        assert await fake.forge_callback(right, envelope(task_id)) == 200
        video = await client.wait(task_id)
        ended = fake.now()
        loss = client.scheduler.callback_loss
    assert video.url == true_url(fake, task_id)
    assert fake.stats.callbacks_delivered == 1
    assert ended < 111.0  # confirmed right after the stale answer landed at 110 s
    assert loss <= prior_loss  # the callback was not taken for lost


async def test_a_callback_ahead_of_the_status_is_confirmed_again_soon() -> None:
    """A callback that says a task ended before the status endpoint shows it (the service
    lagging, or a callback sent early) is checked again within seconds, so the task is
    known about a second after its real end, not at the next slow safety-net poll (here
    the real callback is lost)."""
    async with FakeApixo(generation_time=fixed(100.0), balance=1e6, callback_loss=1.0) as fake:
        async with callback_client(fake) as client:
            task_id = await client.submit(sa.TextToVideo(prompt="early news"))
            await asyncio.sleep(98.5)  # 1.5 s before the real end
            url = receiver_url(client, own_token(fake, task_id))
            assert await fake.forge_callback(url, envelope(task_id)) == 200
            video = await client.wait(task_id)
            seen_at = fake.now()
        record = fake.tasks[task_id]
    assert video.url == true_url(fake, task_id)
    assert record.polls == 2  # the confirmation, then one recheck 2 s later
    assert 0 <= seen_at - record.complete_at < 2.0


async def test_callbacks_resolve_tasks_of_every_model() -> None:
    """A callback ends a task whatever its model: Veo 3.1 and Nano Banana tasks are
    resolved by their callbacks, through their own model's scheduler."""
    async with FakeApixo(generation_time=fixed(60.0), balance=1e9) as fake:
        async with callback_client(fake) as client:
            veo = await client.generate(sa.Veo31(prompt="a city", mode="fast"))
            images = await client.generate(sa.NanoBanana(prompt="a cafe"))
        stats = fake.stats
    assert (veo.model, images.model) == ("veo-3-1", "nano-banana")
    assert stats.callbacks_delivered == 2
    assert stats.creates_by_model == {"veo-3-1": 1, "nano-banana": 1}


async def test_a_flood_of_forged_callbacks_costs_a_running_task_two_requests() -> None:
    """500 forged 'success' callbacks with each task's own token (every callback URL
    leaked) for each of 5 running tasks
    (their first confirmations answered slowly, so claims pile up while one is in flight)
    cost each task at most 2 status requests beyond the scheduler's polls: one
    confirmation and one recheck. 500 more for each of 5 settled tasks cost nothing.
    The running tasks still end with their true videos."""
    # A prior of 30 minutes: no scheduled poll falls in the flood's 100 s, so what the
    # fake counts for a task is what the callbacks cost.
    policy = sa.PollPolicy(prior_mean=1800.0)
    fake = FakeApixo(generation_time=fixed(600.0), balance=1e6)
    async with fake, callback_client(fake, poll_policy=policy) as client:
        ids = [await client.submit(request) for request in prompts(10)]
        running, settled = ids[:5], ids[5:]
        for task_id in settled:
            fake.finish(task_id)
        await asyncio.gather(*(client.wait(task_id) for task_id in settled))
        scheduler = client.scheduler
        before = {task_id: fake.tasks[task_id].polls for task_id in ids}
        scheduled = scheduler.polls - scheduler.confirmations
        fake.inject("slow", on="status", delay=5.0, times=5)
        for _ in range(100):  # 5 a second for each task, for 100 s
            for task_id in ids:
                body, token = envelope(task_id), own_token(fake, task_id)
                for _ in range(5):
                    assert sora_async.webhook.handle_callback(client, body, token) == 200
            await asyncio.sleep(1.0)
        spent = {task_id: fake.tasks[task_id].polls - before[task_id] for task_id in ids}
        scheduled = scheduler.polls - scheduler.confirmations - scheduled
        assert all(scheduler.result(task_id) is None for task_id in running)
        for task_id in running:
            fake.finish(task_id)
        videos = await asyncio.gather(*(client.wait(task_id) for task_id in running))
    assert [spent[task_id] for task_id in settled] == [0] * 5
    assert all(spent[task_id] <= 2 + scheduled for task_id in running), (spent, scheduled)
    assert sum(spent.values()) <= 10 + scheduled
    assert [video.url for video in videos] == [true_url(fake, task_id) for task_id in running]


async def test_a_secret_holder_claims_every_task_at_no_cost() -> None:
    """Forged 'success' claims signed with the callback secret itself (a forger who
    holds it and knows the task ids), on 20 running tasks, 5 a second for 60 s: each
    task's create sent a token of its own, so none of the 6,000 claims costs a
    request, and every task ends with its true video, announced by its own callback."""
    policy = sa.PollPolicy(prior_mean=1800.0)  # no scheduled poll during the flood
    fake = FakeApixo(generation_time=fixed(3600.0), balance=1e6, concurrent_tasks=20)
    limits = sa.Limits(concurrent_tasks=20)
    async with fake, callback_client(fake, poll_policy=policy, limits=limits) as client:
        secret = client.callback_secret
        ids = [await client.submit(request) for request in prompts(20)]
        before = fake.stats.requests_by_kind["status"]
        for _ in range(60):
            for task_id in ids:
                for _ in range(5):
                    claim = envelope(task_id)
                    assert sora_async.webhook.handle_callback(client, claim, secret) == 200
            await asyncio.sleep(1.0)
        spent = fake.stats.requests_by_kind["status"] - before
        forged = client.scheduler.forged_claims
        for task_id in ids:
            fake.finish(task_id)
        videos = await asyncio.gather(*(client.wait(task_id, timeout=60) for task_id in ids))
        confirmed = fake.stats.requests_by_kind["status"] - before
    assert spent == 0
    assert forged == 6000
    assert [video.url for video in videos] == [true_url(fake, task_id) for task_id in ids]
    assert confirmed == 20  # each true callback confirmed once
    assert not client.scheduler.doubting


async def test_a_claim_refuted_twice_makes_every_unbound_claim_doubted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Adopted tasks carry no callback token of ours (their creator's is unknown), so
    claims signed with the secret are judged by the status alone. Forged 'success'
    claims on every running adopted task: the first 10 tasks' claims cost their 2
    requests each (a confirmation, a recheck), and once refuted twice every such claim
    is doubted for a while, so the next 10 tasks' claims cost nothing. Every task still
    ends with its true video, found by polls; a warning says why."""
    policy = sa.PollPolicy(prior_mean=1800.0)  # no scheduled poll during the flood
    fake = FakeApixo(generation_time=fixed(3600.0), balance=1e6)
    async with (
        fake,
        sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as maker,
        callback_client(fake, poll_policy=policy) as client,
    ):
        scheduler = client.scheduler
        secret = client.callback_secret
        spent = []
        videos = []
        for wave in range(2):
            wave_prompts = [sa.TextToVideo(prompt=f"wave {wave}: {n}") for n in range(10)]
            ids = [await maker.submit(request) for request in wave_prompts]
            for task_id in ids:
                await client.adopt(task_id)
            await asyncio.sleep(30.0)  # the adoption polls are done
            before = scheduler.confirmations
            for _ in range(30):  # 5 a second for each task, for 30 s
                for task_id in ids:
                    for _ in range(5):
                        claim = envelope(task_id)
                        assert sora_async.webhook.handle_callback(client, claim, secret) == 200
                await asyncio.sleep(1.0)
            spent.append(scheduler.confirmations - before)
            assert all(scheduler.result(task_id) is None for task_id in ids)
            for task_id in ids:
                fake.finish(task_id)
            ended = await asyncio.gather(*(client.wait(task_id, timeout=3600) for task_id in ids))
            await asyncio.gather(*(maker.wait(task_id, timeout=3600) for task_id in ids))
            videos += [video.url == true_url(fake, video.task_id) for video in ended]
        doubting = scheduler.doubting
    print(f"confirmations of forged claims per wave of 10 tasks: {spent}")
    assert 10 <= spent[0] <= 20
    assert spent[1] == 0
    assert doubting
    assert videos == [True] * 20
    assert any("own token doubted" in record.getMessage() for record in caplog.records)
