"""Callback delivery of the fake APIXO service, received by a real aiohttp server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sora_async.testing import FakeApixo, fixed

KEY = "test-key"
SORA = "sora-2-pro"


@dataclass
class Hit:
    """One POST the receiver got: server time, path, headers and raw body."""

    at: float
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook endpoint on loopback that records every POST and answers as told."""

    #: Status of the n-th answer; 200 once the list runs out.
    answers: list[int] = field(default_factory=list)
    #: Seconds to wait before the n-th answer; none once the list runs out.
    stalls: list[float] = field(default_factory=list)
    clock: Callable[[], float] = lambda: 0.0
    hits: list[Hit] = field(default_factory=list)
    origin: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        n = len(self.hits)
        self.hits.append(Hit(self.clock(), request.path, dict(request.headers), body))
        if n < len(self.stalls):
            await asyncio.sleep(self.stalls[n])
        return web.Response(status=self.answers[n] if n < len(self.answers) else 200, text="ok")

    def url(self, name: str = "hook") -> str:
        return f"{self.origin}/{name}"

    def times(self) -> list[float]:
        return [hit.at for hit in self.hits]


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    """Serve ``receiver`` on a free loopback port in the test's loop."""
    app = web.Application()
    app.router.add_post("/{name}", receiver.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        receiver.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield receiver
    finally:
        await runner.cleanup()


class Api:
    """Raw API calls to the fake, as a client library would send them."""

    def __init__(self, fake: FakeApixo, http: aiohttp.ClientSession) -> None:
        self.fake, self.http = fake, http

    async def create(self, prompt: str = "a cat", callback_url: str | None = None) -> str:
        body: dict[str, Any] = {"input": {"prompt": prompt, "duration": 10}}
        if callback_url is not None:
            body |= {"request_type": "callback", "callback_url": callback_url}
        url = f"{self.fake.url}/generateTask/{SORA}"
        async with self.http.post(url, json=body) as response:
            answer = await response.json()
        assert answer["code"] == 200, answer
        task_id: str = answer["data"]["taskId"]
        return task_id

    async def status(self, task_id: str) -> bytes:
        url = f"{self.fake.url}/statusTask/{SORA}"
        async with self.http.get(url, params={"taskId": task_id}) as response:
            return await response.read()


@contextlib.asynccontextmanager
async def running(
    receiver: Receiver | None = None, **knobs: Any
) -> AsyncIterator[tuple[FakeApixo, Api, Receiver]]:
    """Start a receiver, then a fake (120-s generations unless told) and an API session."""
    knobs.setdefault("generation_time", fixed(120.0))
    async with (
        receiving(receiver or Receiver()) as hook,
        FakeApixo(**knobs) as fake,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http,
    ):
        hook.clock = fake.now
        yield fake, Api(fake, http), hook


# -- what arrives, and when ------------------------------------------------------------


@pytest.mark.looptime
async def test_success_callback_is_the_status_envelope_at_the_end_time() -> None:
    """A callback task's POST arrives at its end with exactly the status endpoint's body."""
    async with running(generation_time=fixed(100.0)) as (fake, api, hook):
        await asyncio.sleep(3.0)
        task_id = await api.create("a red kite", hook.url())
        await asyncio.sleep(99.0)
        assert hook.hits == []
        await asyncio.sleep(2.0)
        [hit] = hook.hits
        assert hit.at == pytest.approx(103.0, abs=1e-3)
        assert hit.path == "/hook"
        assert hit.headers["Content-Type"] == "application/json"
        assert not [name for name in hit.headers if "signature" in name.lower()]
        assert hit.body == await api.status(task_id)
        assert hit.json["code"] == 200
        assert hit.json["message"] == "success"
        data = hit.json["data"]
        assert set(data) == {
            "taskId",
            "state",
            "resultJson",
            "createTime",
            "completeTime",
            "costTime",
        }
        assert (data["taskId"], data["state"], data["costTime"]) == (task_id, "success", 100_000)
        assert json.loads(data["resultJson"]) == {
            "resultUrls": [f"{fake.origin}/files/{task_id}.mp4"]
        }
        assert fake.tasks[task_id].first_seen_done_at == pytest.approx(103.0, abs=1e-3)
        stats = fake.stats
        assert (stats.callbacks_attempted, stats.callbacks_delivered) == (1, 1)
        assert stats.callbacks_failed_attempts == stats.callbacks_lost == 0


@pytest.mark.looptime
async def test_failed_callback_carries_fail_code_and_message() -> None:
    """A [fail:CODE] callback task's POST is the failed envelope: failCode, failMsg, no URL."""
    async with running(generation_time=fixed(30.0)) as (_, api, hook):
        task_id = await api.create("sad [fail:SensitiveContent] cat", hook.url())
        await asyncio.sleep(31.0)
        [hit] = hook.hits
        assert hit.body == await api.status(task_id)
        data = hit.json["data"]
        assert set(data) == {"taskId", "state", "failCode", "failMsg", "createTime", "completeTime"}
        assert (data["state"], data["failCode"]) == ("failed", "SensitiveContent")
        assert data["failMsg"]


@pytest.mark.looptime
async def test_async_tasks_get_no_post() -> None:
    """Tasks made with request_type async are never called back, even past their end."""
    async with running() as (fake, api, hook):
        body = {"request_type": "async", "callback_url": hook.url(), "input": {"prompt": "quiet"}}
        async with api.http.post(f"{fake.url}/generateTask/{SORA}", json=body) as response:
            assert response.status == 200
        await api.create("also quiet")
        await asyncio.sleep(600.0)
        assert hook.hits == []
        assert fake.stats.callbacks_attempted == fake.stats.callbacks_lost == 0


@pytest.mark.looptime
async def test_knobs_changed_at_run_time_apply_to_tasks_ending_later() -> None:
    """callback_delay set as an attribute after the create delays that task's first POST."""
    async with running(generation_time=fixed(50.0)) as (fake, api, hook):
        await api.create("late", hook.url())
        fake.callback_delay = 7.0
        await asyncio.sleep(100.0)
        assert hook.times() == [pytest.approx(57.0, abs=1e-3)]


# -- retries -------------------------------------------------------------------------


@pytest.mark.looptime
async def test_two_errors_then_200_makes_three_attempts_with_growing_delays() -> None:
    """A receiver answering 500, 500, 200 is tried at end, +5 s, +15 s more; then delivered."""
    async with running(Receiver(answers=[500, 500])) as (fake, api, hook):
        task_id = await api.create("flaky", hook.url())
        await asyncio.sleep(400.0)
        assert hook.times() == [pytest.approx(t, abs=1e-3) for t in (120.0, 125.0, 140.0)]
        assert len({hit.body for hit in hook.hits}) == 1
        stats = fake.stats
        assert (stats.callbacks_attempted, stats.callbacks_delivered) == (3, 1)
        assert (stats.callbacks_failed_attempts, stats.callbacks_lost) == (2, 0)
        assert fake.tasks[task_id].first_seen_done_at == pytest.approx(140.0, abs=1e-3)


@pytest.mark.looptime
async def test_receiver_that_never_answers_200_gets_four_attempts_then_is_lost() -> None:
    """After the first try and 3 retries (5, 15, 45 s apart) the callback is given up."""
    async with running(Receiver(answers=[503] * 10)) as (fake, api, hook):
        task_id = await api.create("doomed", hook.url())
        await asyncio.sleep(1000.0)
        expected = (120.0, 125.0, 140.0, 185.0)
        assert hook.times() == [pytest.approx(t, abs=1e-3) for t in expected]
        stats = fake.stats
        assert (stats.callbacks_attempted, stats.callbacks_failed_attempts) == (4, 4)
        assert (stats.callbacks_delivered, stats.callbacks_lost) == (0, 1)
        assert fake.tasks[task_id].first_seen_done_at is None


@pytest.mark.looptime
async def test_slow_receiver_is_timed_out_and_retried() -> None:
    """An answer later than callback_timeout (30 s) counts as a failure and is retried."""
    async with running(Receiver(stalls=[40.0])) as (fake, api, hook):
        task_id = await api.create("slow", hook.url())
        await asyncio.sleep(200.0)
        # 120: first try, cut at 150; retry 5 s later, answered at once.
        assert hook.times() == [pytest.approx(t, abs=1e-3) for t in (120.0, 155.0)]
        assert (fake.stats.callbacks_failed_attempts, fake.stats.callbacks_delivered) == (1, 1)
        assert fake.tasks[task_id].first_seen_done_at == pytest.approx(155.0, abs=1e-3)


# -- losses, duplicates, jitter ----------------------------------------------------------


@pytest.mark.looptime
async def test_full_loss_sends_nothing() -> None:
    """With callback_loss=1.0 no callback is POSTed, and each task counts as lost."""
    async with running(callback_loss=1.0) as (fake, api, hook):
        ids = [await api.create(f"lost {n}", hook.url()) for n in range(3)]
        await asyncio.sleep(600.0)
        assert hook.hits == []
        assert (fake.stats.callbacks_lost, fake.stats.callbacks_attempted) == (3, 0)
        assert all(fake.tasks[task_id].first_seen_done_at is None for task_id in ids)


@pytest.mark.looptime
async def test_duplicate_is_a_second_identical_post_a_little_later() -> None:
    """With callback_duplicates=1.0 a delivered callback arrives again, 1-10 s later."""
    async with running(callback_duplicates=1.0) as (fake, api, hook):
        await api.create("twice", hook.url())
        await asyncio.sleep(300.0)
        first, second = hook.hits
        assert first.body == second.body
        assert first.at == pytest.approx(120.0, abs=1e-3)
        assert 1.0 <= second.at - first.at <= 10.0
        stats = fake.stats
        assert (stats.callbacks_duplicated, stats.callbacks_delivered) == (1, 2)
        assert stats.callbacks_attempted == 2


@pytest.mark.looptime
async def test_jitter_reorders_deliveries_of_tasks_ending_close_together() -> None:
    """Tasks ending 1 s apart, with 30 s of jitter, are called back out of order (seed 0)."""
    async with running(callback_jitter=30.0, seed=0) as (fake, api, hook):
        ids = []
        for n in range(6):
            ids.append(await api.create(f"task {n}", hook.url(f"hook{n}")))
            await asyncio.sleep(1.0)
        await asyncio.sleep(300.0)
        order = [int(hit.path.removeprefix("/hook")) for hit in hook.hits]
        assert sorted(order) == list(range(6))
        assert order != sorted(order)
        for hit in hook.hits:
            end = fake.tasks[ids[int(hit.path.removeprefix("/hook"))]].complete_at
            assert end <= hit.at <= end + 30.0


@pytest.mark.looptime
async def test_finish_delivers_at_once_and_not_again_at_the_planned_end() -> None:
    """finish() moves the end to now: the callback is POSTed then, once."""
    async with running(generation_time=fixed(1000.0)) as (fake, api, hook):
        task_id = await api.create("cut short", hook.url())
        await asyncio.sleep(10.0)
        fake.finish(task_id, "failed", fail_code="PROCESSING_TIMEOUT")
        await asyncio.sleep(0.01)
        assert hook.times() == [pytest.approx(10.0, abs=1e-3)]
        await asyncio.sleep(1100.0)
        [hit] = hook.hits
        assert hit.json["data"]["failCode"] == "PROCESSING_TIMEOUT"
        assert hit.json["data"]["completeTime"] - hit.json["data"]["createTime"] == 10_000
        assert fake.stats.callbacks_attempted == 1


# -- life cycle and forging --------------------------------------------------------------


def _delivery_tasks() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if "CallbackSender" in getattr(task.get_coro(), "__qualname__", "")
    ]


@pytest.mark.looptime
async def test_close_with_deliveries_pending_leaves_nothing_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """close() cancels waiting, backing-off and in-flight deliveries without a warning."""
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        receiver = Receiver(answers=[500], stalls=[0.0, 500.0])
        async with receiving(receiver) as hook:
            fake = FakeApixo(generation_time=fixed(1000.0), callback_timeout=100.0)
            await fake.start()
            hook.clock = fake.now
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
                api = Api(fake, http)
                ids = [await api.create(name, hook.url(name)) for name in "abcd"]
            fake.finish(ids[0])  # answered 500: backing off until 5
            await asyncio.sleep(1.0)
            fake.finish(ids[1])  # stalled: in flight
            await asyncio.sleep(0.5)
            fake.callback_delay = 100.0
            fake.finish(ids[2])  # in its callback_delay; d waits for its end at 1000
            await asyncio.sleep(1.0)
            assert [hit.path for hit in hook.hits] == ["/a", "/b"]
            assert len(_delivery_tasks()) >= 3  # a, b, c (and wait_for's inner task)
            await fake.close()
            await fake.close()
            assert _delivery_tasks() == []
            await asyncio.sleep(2000.0)
            assert len(hook.hits) == 2
        gc.collect()
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records] == []
    assert asyncio.all_tasks() == {asyncio.current_task()}


@pytest.mark.looptime
async def test_forge_callback_posts_arbitrary_bytes_and_returns_the_status() -> None:
    """forge_callback sends any bytes to any URL, uncounted, and returns the answer's status."""
    async with running(Receiver(answers=[200, 418])) as (fake, _, hook):
        assert (
            await fake.forge_callback(hook.url("x"), b'{"code":200,"data":{"taskId":"t"}}') == 200
        )
        assert await fake.forge_callback(hook.url("y"), b"not json") == 418
        assert [hit.body for hit in hook.hits] == [
            b'{"code":200,"data":{"taskId":"t"}}',
            b"not json",
        ]
        assert hook.hits[1].headers["Content-Type"] == "application/json"
        assert fake.stats.callbacks_attempted == 0
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed_port = sock.getsockname()[1]
        with pytest.raises(aiohttp.ClientConnectionError):
            await fake.forge_callback(f"http://127.0.0.1:{closed_port}/x", b"{}")


@pytest.mark.parametrize(
    "knobs",
    [
        {"callback_loss": 1.5},
        {"callback_duplicates": -0.1},
        {"callback_timeout": 0.0},
        {"callback_retry_delays": (5.0, -1.0)},
        {"callback_delay": -1.0},
        {"callback_jitter": -1.0},
    ],
)
def test_bad_callback_knobs_are_refused(knobs: dict[str, Any]) -> None:
    """Probabilities outside [0, 1], negative delays and a zero timeout raise ValueError."""
    with pytest.raises(ValueError, match="callback"):
        FakeApixo(**knobs)
