"""The Redis governor in one process: settings, key names, Redis outages, shared news.

Real time against a real redis-server (Redis keeps the clock). The claims about
several OS processes are proven in test_shared_key.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import pytest
import redis.asyncio as aioredis
from aiohttp import web

import sora_async as sa
import sora_async.webhook
from sora_async.testing import FakeApixo, RedisServer, fixed

pytestmark = [pytest.mark.looptime(False), pytest.mark.timeout(60)]


@pytest.fixture
async def service() -> AsyncIterator[FakeApixo]:
    """The fake service at the real limits; generations take one second."""
    async with FakeApixo(generation_time=fixed(1.0), pending_time=0.05) as fake:
        yield fake


def governor_for(url: str, fake: FakeApixo, **options: Any) -> sa.RedisGovernor:
    """A Redis governor for the fake's key; every test has a fake of its own, a key no
    one else used, so an empty Redis can be trusted."""
    options.setdefault("lease", 1.0)
    return sa.RedisGovernor(url, api_key=fake.api_key, trust_empty_redis=True, **options)


def client_for(fake: FakeApixo, governor: sa.RedisGovernor, **options: Any) -> sa.SoraClient:
    """A client of ``fake`` through ``governor``, expecting one-second generations."""
    options.setdefault("poll_policy", sa.PollPolicy(prior_mean=1.0, min_interval=0.2))
    return sa.SoraClient(api_key=fake.api_key, base_url=fake.url, governor=governor, **options)


@pytest.mark.parametrize(
    ("url", "options", "field"),
    [
        ("http://localhost:6379", {}, "url"),
        ("", {}, "url"),
        ("redis://localhost", {"create_reserve": 60}, "create_reserve"),
        ("redis://localhost", {"lease": 0}, "lease"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(
    url: str, options: dict[str, Any], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad URL or setting raises InputError naming it, before anything connects."""
    monkeypatch.delenv("SORA_ASYNC_REDIS_URL", raising=False)
    with pytest.raises(sa.InputError) as caught:
        sa.RedisGovernor(url, api_key="k", **options)
    assert caught.value.field == field


def test_no_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key's identity is required: without a key there is nothing to share."""
    monkeypatch.delenv("APIXO_API_KEY", raising=False)
    with pytest.raises(sa.InputError, match="api_key"):
        sa.RedisGovernor("redis://localhost")


async def test_key_names_carry_a_hash_of_the_key_never_the_key(
    service: FakeApixo, redis_server: RedisServer
) -> None:
    """After a generation, every Redis key of the governor starts with its prefix, a hash
    of the API key and the model; the key appears in no key name, value or repr."""
    governor = governor_for(redis_server.url, service)
    async with client_for(service, governor) as client:
        await client.generate(sa.TextToVideo(prompt="a red kite", duration=10), timeout=20)
        connection = aioredis.from_url(redis_server.url, decode_responses=True)
        try:
            names = [name async for name in connection.scan_iter(f"{governor.prefix}*")]
            values = [await connection.dump(name) for name in names]
        finally:
            await connection.aclose()
    assert names
    assert all(service.api_key not in name for name in names)
    assert all(service.api_key.encode() not in (value or b"") for value in values)
    assert service.api_key not in repr(governor)
    other_model = sa.RedisGovernor(redis_server.url, api_key=service.api_key, model="sora-2")
    assert other_model.prefix != governor.prefix


async def grants_in_redis(url: str, governor: sa.RedisGovernor) -> int:
    """Return how many request grants ``governor``'s budget holds in Redis now."""
    connection = aioredis.from_url(url)
    try:
        return int(await connection.zcard(f"{governor.prefix}:grants"))
    finally:
        await connection.aclose()


async def test_every_model_of_a_client_on_redis_is_on_redis(redis_server: RedisServer) -> None:
    """A client given a RedisGovernor generates on two models: the other model's lane gets
    a RedisGovernor of its own (same Redis and key, that model's own limits and names,
    the default's settings), and every request of each model was granted in Redis under
    its own model's names. With shared_budget every model spends the one governor."""
    async with FakeApixo(
        api_key=secrets.token_hex(8), generation_time=fixed(1.0), pending_time=0.05
    ) as fake:
        default = governor_for(redis_server.url, fake, redis_timeout=7.0, uncertain_hold=9.0)
        banana_limits = sa.Limits(requests=30, concurrent_tasks=2)
        async with client_for(fake, default, model_limits={"nano-banana": banana_limits}) as client:
            await client.generate(sa.TextToVideo(prompt="a kite", duration=10), timeout=20)
            await client.generate(sa.NanoBanana(prompt="a pear"), timeout=20)
            banana = client.governor_for("nano-banana")
        assert isinstance(banana, sa.RedisGovernor)
        assert banana is not default
        assert (banana.model, banana.limits, banana.url) == (
            "nano-banana",
            banana_limits,
            default.url,
        )
        named = sa.RedisGovernor(redis_server.url, api_key=fake.api_key, model="nano-banana")
        assert banana.prefix == named.prefix != default.prefix
        assert (banana.lease, banana.redis_timeout, banana.uncertain_hold) == (1.0, 7.0, 9.0)
        assert banana._settings == default._settings  # jitter margin, back-off, trust...
        sent = fake.stats.max_requests_in_window_by_model  # all of them: one window
        assert set(sent) == {"sora-2-pro", "nano-banana"}
        assert await grants_in_redis(redis_server.url, default) == sent["sora-2-pro"]
        assert await grants_in_redis(redis_server.url, banana) == sent["nano-banana"]

    async with FakeApixo(
        api_key=secrets.token_hex(8), generation_time=fixed(1.0), pending_time=0.05
    ) as fake:
        default = governor_for(redis_server.url, fake)
        async with client_for(fake, default, shared_budget=True) as client:
            await client.generate(sa.TextToVideo(prompt="a kite", duration=10), timeout=20)
            await client.generate(sa.NanoBanana(prompt="a pear"), timeout=20)
            assert client.governor_for("nano-banana") is default
        named = sa.RedisGovernor(redis_server.url, api_key=fake.api_key, model="nano-banana")
        assert await grants_in_redis(redis_server.url, named) == 0
        assert await grants_in_redis(redis_server.url, default) == fake.stats.requests


async def test_unreachable_redis_sends_nothing_and_raises_after_the_deadline(
    service: FakeApixo,
) -> None:
    """With Redis down, a generation waits for its permit, then raises
    RedisUnavailableError: the fake service saw no request at all."""
    server = RedisServer()  # never started: nothing listens on its port
    governor = governor_for(server.url, service, lease=0.5, redis_timeout=1.0)
    async with client_for(service, governor) as client:
        with pytest.raises(sa.RedisUnavailableError, match="Redis"):
            await client.generate(sa.TextToVideo(prompt="a red kite", duration=10))
    assert service.stats.requests == 0
    server.close()


async def test_work_resumes_when_redis_comes_back(service: FakeApixo) -> None:
    """A generation that waits on a stopped Redis goes on when Redis starts again,
    and its video is made exactly once."""
    server = RedisServer()
    governor = governor_for(server.url, service, lease=0.5, redis_timeout=30)
    try:
        async with client_for(service, governor) as client:
            generation = asyncio.ensure_future(
                client.generate(sa.TextToVideo(prompt="a red kite", duration=10), timeout=30)
            )
            await asyncio.sleep(1.0)
            assert service.stats.requests == 0
            await asyncio.to_thread(server.start)
            video = await generation
    finally:
        server.close()
    assert video.urls
    assert service.stats.creates == 1


async def test_an_empty_redis_makes_the_first_requests_wait_one_round_not_a_window(
    service: FakeApixo, redis_server: RedisServer
) -> None:
    """Redis holds nothing for the key: live processes may have sent requests in the
    last window, so the first request waits one re-registration round (1 s), in which
    they write them back, and not the whole 61-s window; trusted (nothing else used the
    key), it goes at once."""
    limits = sa.Limits(requests=10, period=60.0)
    cautious = sa.RedisGovernor(redis_server.url, api_key=secrets.token_hex(8), limits=limits)
    trusting = governor_for(redis_server.url, service, limits=limits)
    loop = asyncio.get_running_loop()
    for governor, least, most in ((cautious, 0.9, 2.5), (trusting, 0.0, 0.5)):
        start = loop.time()
        await governor.request("create")
        assert least <= loop.time() - start <= most
        await governor.aclose()


@contextlib.asynccontextmanager
async def receiver(client: sa.SoraClient, sock: socket.socket) -> AsyncIterator[None]:
    """Serve ``client``'s callback receiver on ``sock``."""
    runner = web.AppRunner(
        sora_async.webhook.aiohttp_app(client), access_log=None, handle_signals=False
    )
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield
    finally:
        await runner.cleanup()


async def test_a_callback_received_by_another_client_wakes_the_waiter(
    redis_server: RedisServer,
) -> None:
    """The provider's callback lands on a client that does not track the task; through
    Redis the client that does is told at once, confirms with one status request and
    wakes its waiter, long before its own polling would have looked."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/apixo/callback"
    secret = secrets.token_urlsafe(16)
    async with FakeApixo(generation_time=fixed(1.0), pending_time=0.05) as fake:

        def client(poll_policy: sa.PollPolicy) -> sa.SoraClient:
            governor = governor_for(redis_server.url, fake)
            return client_for(
                fake, governor, callback_url=url, callback_secret=secret, poll_policy=poll_policy
            )

        # The waiter would not poll for minutes: only the shared callback can wake it.
        slow = sa.PollPolicy(prior_mean=600.0, min_interval=60.0)
        async with client(slow) as waiter, client(slow) as other, receiver(other, sock):
            video = await waiter.generate(sa.TextToVideo(prompt="a kite", duration=10), timeout=20)
        assert video.urls
        assert fake.stats.callbacks_delivered >= 1
        assert fake.stats.requests_by_kind["status"] == 1  # the confirmation, no poll
    sock.close()


def success_claim(task_id: str, url: str) -> bytes:
    """A callback's body claiming that ``task_id`` succeeded with the video at ``url``."""
    result = json.dumps({"resultUrls": [url]})
    data = {"taskId": task_id, "state": "success", "resultJson": result}
    return json.dumps({"code": 200, "msg": "success", "data": data}).encode()


def own_token(fake: FakeApixo, task_id: str) -> str:
    """The callback token that ``task_id``'s create sent (in its callback URL)."""
    task_url = fake.tasks[task_id].callback_url
    assert task_url is not None
    return parse_qs(urlsplit(task_url).query)["token"][0]


def callback_client(redis_server: RedisServer, fake: FakeApixo, secret: str) -> sa.SoraClient:
    """A client on Redis whose tasks' callbacks go nowhere (the test delivers them) and
    who polls at most every 600 s: ends come by the callbacks the test hands it."""
    governor = governor_for(redis_server.url, fake)
    slow = sa.PollPolicy(prior_mean=1800.0, min_interval=600.0)
    url = "http://127.0.0.1:9/apixo/callback"
    return client_for(fake, governor, callback_url=url, callback_secret=secret, poll_policy=slow)


async def test_a_relayed_claim_must_carry_the_tasks_own_token(
    redis_server: RedisServer,
) -> None:
    """A claim that lands on a client not tracking the task is relayed through Redis
    with its token's nonce; the client that tracks the task drops a claim signed with
    the bare secret (no request) and confirms one with the task's own token (one)."""
    secret = secrets.token_urlsafe(16)
    async with FakeApixo(generation_time=fixed(600.0), callback_loss=1.0) as fake:

        def client() -> sa.SoraClient:
            return callback_client(redis_server, fake, secret)

        async with client() as tracker, client() as other:
            task_id = await tracker.submit(sa.TextToVideo(prompt="a kite", duration=10))
            await asyncio.sleep(1.0)
            before = fake.stats.requests_by_kind["status"]
            body = success_claim(task_id, "https://attacker.example/x")
            assert sora_async.webhook.handle_callback(other, body, secret) == 200
            await asyncio.sleep(1.0)
            dropped = fake.stats.requests_by_kind["status"] - before
            own = own_token(fake, task_id)
            assert sora_async.webhook.handle_callback(other, body, own) == 200
            await asyncio.sleep(1.0)
            confirmed = fake.stats.requests_by_kind["status"] - before
            forged = tracker.scheduler.forged_claims
            unsettled = tracker.scheduler.result(task_id) is None
    assert dropped == 0
    assert forged == 1
    assert 1 <= confirmed <= 2  # a confirmation (and its recheck): the claim is refuted
    assert unsettled


async def test_an_end_another_process_saw_reaches_the_tasks_creator(
    redis_server: RedisServer,
) -> None:
    """A web worker awaits another worker's task; the callback (with the task's own
    token) lands on the waiting worker, which confirms it and settles: the creator takes
    that end from Redis without a token of its own (it was seen, not claimed), ends the
    task and frees its slot."""
    secret = secrets.token_urlsafe(16)
    async with FakeApixo(generation_time=fixed(2.0), callback_loss=1.0) as fake:

        def client() -> sa.SoraClient:
            return callback_client(redis_server, fake, secret)

        async with client() as creator, client() as waiter:
            task_id = await creator.submit(sa.TextToVideo(prompt="a kite", duration=10))
            waiting = asyncio.ensure_future(waiter.wait(task_id))
            await asyncio.sleep(3.0)  # ended on the service; nobody polls again for 600 s
            body = success_claim(task_id, f"{fake.origin}/files/x.mp4")
            own = own_token(fake, task_id)
            assert sora_async.webhook.handle_callback(waiter, body, own) == 200
            video = await asyncio.wait_for(waiting, 5.0)
            await asyncio.sleep(0.5)
            creators_end = creator.scheduler.result(task_id)
            creators_slots = creator.governor.slots_in_use
            forged = creator.scheduler.forged_claims
    assert video.urls
    assert creators_end is not None
    assert creators_slots == 0
    assert forged == 0


async def test_a_create_finds_room_while_another_process_floods_polls(
    redis_server: RedisServer,
) -> None:
    """One process keeps polling as fast as it may; another's create still goes at once:
    polls are paced across processes and never take the window's last places, which
    stay for creates and confirmations."""
    key = secrets.token_hex(8)
    limits = sa.Limits(requests=10, period=2.0)

    def governor() -> sa.RedisGovernor:
        return sa.RedisGovernor(
            redis_server.url, api_key=key, limits=limits, jitter_margin=0.2, trust_empty_redis=True
        )

    poller, creator = governor(), governor()
    loop = asyncio.get_running_loop()

    async def poll_forever() -> None:
        while True:
            await poller.request("status")

    flood = asyncio.ensure_future(poll_forever())
    try:
        await asyncio.sleep(3.0)  # the window is as full as polls may make it
        start = loop.time()
        await creator.request("create")
        waited = loop.time() - start
    finally:
        flood.cancel()
        await asyncio.gather(flood, return_exceptions=True)
        await poller.aclose()
        await creator.aclose()
    assert waited < 0.2  # a poll would wait for the window to roll: up to 2.2 s


async def test_processes_polling_one_key_take_turns(redis_server: RedisServer) -> None:
    """Three processes polling as fast as they may share the polls evenly: they wait in
    one line, first come first served, so none loses race after race to the others."""
    key = secrets.token_hex(8)
    limits = sa.Limits(requests=20, period=1.0)
    governors = [
        sa.RedisGovernor(
            redis_server.url, api_key=key, limits=limits, jitter_margin=0.1, trust_empty_redis=True
        )
        for _ in range(3)
    ]
    order: list[int] = []

    async def poll_until_done(index: int, group: anyio.abc.TaskGroup) -> None:
        while len(order) < 30:
            await governors[index].request("status")
            order.append(index)
        group.cancel_scope.cancel()

    try:
        # anyio, as the client does: its cancellation is re-delivered until it lands
        # (Python 3.11's asyncio.wait_for, inside redis-py, can swallow one).
        async with anyio.create_task_group() as group:
            for index in range(3):
                group.start_soon(poll_until_done, index, group)
    finally:
        for governor in governors:
            await governor.aclose()
    shares = [order[:30].count(i) for i in range(3)]
    assert max(shares) - min(shares) <= 2, order  # lost races used to give 14/10/6
    # Between two polls of one process, each of the others polls at most twice.
    for i in range(3):
        turns = [at for at, who in enumerate(order[:30]) if who == i]
        assert max(b - a for a, b in itertools.pairwise(turns)) <= 5, order


async def test_tasks_we_do_not_know_cut_the_keys_slots_not_its_rate(
    redis_server: RedisServer,
) -> None:
    """Another program left 10 short tasks on the key; through Redis, ours then generates
    3 videos: the service refuses only creates, the key's shared rate factor stays 1.0,
    the key's shared slot limit falls, and every video arrives."""
    fast = {"requests": 600, "period": 60.0}  # polls paced 0.1 s apart, not 1 s
    async with FakeApixo(generation_time=fixed(0.4), pending_time=0.05, **fast) as service:
        async with sa.SoraClient(api_key=service.api_key, base_url=service.url) as other:
            for number in range(10):
                await other.submit(sa.TextToVideo(prompt=f"theirs {number}", duration=10))
        governor = governor_for(redis_server.url, service, limits=sa.Limits(**fast))
        limits: list[int] = []
        policy = sa.PollPolicy(prior_mean=0.4, min_interval=0.1)
        async with client_for(service, governor, poll_policy=policy) as client:
            requests = [sa.TextToVideo(prompt=f"ours {n}", duration=10) for n in range(3)]
            async for outcome in client.generate_many(requests):
                assert outcome.ok, outcome.error
                limits.append(governor.slot_limit)
            await governor.refresh()
        stats = service.stats
    assert 0 < stats.rate_limited == stats.concurrency_limited
    assert stats.rate_limited == stats.rate_limited_by_kind["create"]
    assert governor.rate_factor == 1.0
    assert min(limits) < 10
    assert stats.max_requests_in_window <= 600


async def test_a_live_process_writes_its_grants_back_after_redis_restarts_empty() -> None:
    """Redis restarts without its data after a live governor was granted 8 of the key's
    10 requests of the minute: within the re-registration round it writes them back,
    so a newcomer gets the 2 left at once after the round, not 10 more, and not after
    the 61-s window."""
    limits = sa.Limits(requests=10, period=60.0)
    key = secrets.token_hex(8)
    loop = asyncio.get_running_loop()
    with RedisServer() as server:

        def governor() -> sa.RedisGovernor:
            return sa.RedisGovernor(server.url, api_key=key, limits=limits, lease=3.0)

        live, newcomer = governor(), governor()
        async with anyio.create_task_group() as group:
            group.start_soon(live.run, NoNews())
            for _ in range(8):
                await live.request("create")
            await asyncio.to_thread(server.restart, down_for=0.3, keep_data=False)
            restarted = loop.time()
            granted: list[float] = []
            with anyio.move_on_after(4.0):
                while True:
                    await newcomer.request("create")
                    granted.append(loop.time() - restarted)
            assert len(granted) == 2, granted
            assert 0.9 <= granted[0] <= 2.5, granted
            connection = aioredis.from_url(server.url)
            try:
                assert await connection.zcard(f"{live.prefix}:grants") == 10
            finally:
                await connection.aclose()
            group.cancel_scope.cancel()
        await live.aclose()
        await newcomer.aclose()


class NoNews:
    """A process that tracks nothing: the governor's news goes nowhere."""

    def adopt(self, task_id: str, model: str) -> None:
        """Ignore an adopted task."""

    def announce(
        self, status: sa.TaskStatus, trusted: bool, nonce: str | None = None, seen: bool = False
    ) -> None:
        """Ignore shared news."""

    def hand_over(self, task_id: str, model: str) -> None:
        """Ignore a task another process took over."""


async def test_releasing_a_task_this_process_no_longer_holds_frees_nothing(
    service: FakeApixo, redis_server: RedisServer
) -> None:
    """A process told that a task ended whose slot it no longer holds (another process
    adopted it while this one's lease had lapsed) frees nothing: not the slot of its
    create still in flight, which would leave that create's task held by no record."""
    governor = governor_for(redis_server.url, service)
    async with anyio.create_task_group() as group:
        group.start_soon(governor.run, NoNews())
        await governor.acquire_slot()
        governor.bind_slot("task_ours", "sora-2-pro")
        await governor.acquire_slot()  # a create in flight: no task yet
        governor.release_slot("task_adopted_by_another")
        await asyncio.sleep(0.2)  # what a release sends reaches Redis in the background
        await governor.refresh()
        assert governor.slots_in_use == 2
        governor.release_slot("task_ours")
        governor.release_slot()
        await asyncio.sleep(0.2)
        await governor.refresh()
        assert governor.slots_in_use == 0
        group.cancel_scope.cancel()
    await governor.aclose()


async def test_a_task_waited_on_here_keeps_the_slot_adopted_from_its_stopped_creator(
    redis_server: RedisServer,
) -> None:
    """A process waits on another's task (polled here without a slot of its own); the
    creator stops while the task runs, and this process adopts its slot. That slot stays
    the task's until it ends, so the ten creates sent meanwhile never find the key over
    its ten tasks (the slot used to be given back at once, as if counted twice)."""
    async with FakeApixo(generation_time=fixed(8.0), pending_time=0.05) as fake:
        waiter_governor = governor_for(redis_server.url, fake)
        creator = client_for(fake, governor_for(redis_server.url, fake))
        await creator.__aenter__()
        async with client_for(fake, waiter_governor) as waiter:
            task_id = await creator.submit(sa.TextToVideo(prompt="a kite", duration=10))
            waited = asyncio.ensure_future(waiter.wait(task_id, model="sora-2-pro"))
            await asyncio.sleep(0.3)  # the waiter polls it: tracked, with no slot
            await creator.__aexit__(None, None, None)  # the task runs on
            connection = aioredis.from_url(redis_server.url)
            try:
                slots = f"{waiter_governor.prefix}:slots"
                for _ in range(50):
                    records = [json.loads(raw) for raw in await connection.hvals(slots)]
                    if [record["o"] for record in records] == [waiter_governor.owner]:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.3)  # the adoption reaches the scheduler
                held = [json.loads(raw) for raw in await connection.hvals(slots)]
            finally:
                await connection.aclose()
            prompts = (sa.TextToVideo(prompt=f"a kite {n}", duration=10) for n in range(10))
            outcomes = [outcome async for outcome in waiter.generate_many(prompts)]
            first = await waited
    assert [(record["o"], record["t"]) for record in held] == [(waiter_governor.owner, task_id)]
    assert first.task_id == task_id
    assert all(outcome.error is None for outcome in outcomes)
    assert fake.stats.rate_limited == 0
    assert fake.stats.max_concurrent_tasks <= 10


async def test_a_create_whose_slot_went_while_the_lease_lapsed_takes_another_first(
    service: FakeApixo, redis_server: RedisServer
) -> None:
    """A create waits for its permit (the window is full) while its process stops
    renewing for two leases: another process frees its slot (nothing was sent on it).
    When the process renews again and the permit comes, the create takes a slot first:
    it never goes out on none."""
    limits = sa.Limits(requests=2, period=5.0)
    paused = governor_for(redis_server.url, service, limits=limits, create_reserve=0)
    other = governor_for(redis_server.url, service, limits=limits, create_reserve=0)
    connection = aioredis.from_url(redis_server.url)
    slots = f"{paused.prefix}:slots"
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(other.run, NoNews())
            renewing = anyio.CancelScope()

            async def run_paused() -> None:
                with renewing:
                    await paused.run(NoNews())

            group.start_soon(run_paused)
            for _ in range(2):
                await paused.request("balance")  # the window is full for 5 s
            await paused.acquire_slot()
            create = asyncio.ensure_future(paused.request("create"))
            await asyncio.sleep(0.2)
            renewing.cancel()  # no renewal from here: the lease lapses
            while await connection.hlen(slots):  # noqa: ASYNC110 - Redis, not this loop
                await asyncio.sleep(0.1)  # the other process frees the slot
            group.start_soon(paused.run, NoNews())  # renews again, before the permit
            await asyncio.wait_for(create, 10.0)
            held = [json.loads(raw) for raw in await connection.hvals(slots)]
            group.cancel_scope.cancel()
    finally:
        await connection.aclose()
        await paused.aclose()
        await other.aclose()
    assert [(record["o"], record["w"]) for record in held] == [(paused.owner, 1)]
