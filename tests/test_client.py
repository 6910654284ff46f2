"""SoraClient against the fake service: the calls, the errors, retries, and the key kept secret."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

import sora_async as sa
from sora_async.testing import FakeApixo

pytestmark = pytest.mark.looptime

PROMPT = sa.TextToVideo(prompt="a red kite over the sea", duration=10, size="1280*720")


async def test_generate_returns_a_video_from_the_fake(
    client: sa.SoraClient, fake: FakeApixo
) -> None:
    """submit, status, wait and generate give a Video whose URL the fake serves."""
    task_id = await client.submit(PROMPT)
    status = await client.status(task_id)
    assert status.state in (sa.TaskState.PENDING, sa.TaskState.PROCESSING)
    video = await client.wait(task_id)
    assert video.task_id == task_id
    assert video.url == f"{fake.origin}/files/{task_id}.mp4"
    again = await client.generate(
        sa.ImageToVideo(prompt="the sea moves", image_urls=("https://example.com/a.jpg",))
    )
    assert again.task_id != task_id
    assert fake.stats.creates == 2
    assert fake.stats.rate_limited == 0


async def test_wait_on_a_task_from_elsewhere_adopts_it(
    client: sa.SoraClient, fake: FakeApixo
) -> None:
    """wait() on a task id this client did not create polls it to its end."""
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as other:
        task_id = await other.submit(PROMPT)
    video = await client.wait(task_id)
    assert video.task_id == task_id
    assert fake.stats.creates_per_prompt[PROMPT.prompt] == 1


async def test_failed_task_raises_with_its_fail_code(client: sa.SoraClient) -> None:
    """A task that fails raises TaskFailedError carrying the service's (unknown) code."""
    with pytest.raises(sa.TaskFailedError) as caught:
        await client.generate(sa.TextToVideo(prompt="a cat [fail:SensitiveContent]"))
    assert caught.value.fail_code == "SensitiveContent"
    assert caught.value.task_id


async def test_wrong_key_raises_authentication_error(fake: FakeApixo) -> None:
    """A wrong key gives AuthenticationError after one request, and no retry."""
    async with sa.SoraClient(api_key="wrong", base_url=fake.url) as client:
        with pytest.raises(sa.AuthenticationError):
            await client.submit(PROMPT)
        with pytest.raises(sa.AuthenticationError):
            await client.balance()  # refused locally: the key is known bad
    assert fake.stats.unauthorized == 1
    assert fake.stats.creates == 0


async def test_bad_duration_spends_no_request(client: sa.SoraClient, fake: FakeApixo) -> None:
    """A bad input raises InputError naming the field before any request is sent."""
    with pytest.raises(sa.InputError, match="duration"):
        await client.generate(sa.TextToVideo(prompt="x", duration=7))
    with pytest.raises(sa.InputError, match="request"):
        await client.submit("a prompt")  # type: ignore[arg-type]
    assert fake.stats.requests == 0


async def test_content_violation_and_credits(client: sa.SoraClient, fake: FakeApixo) -> None:
    """The seed's two 400 messages raise their own classes; nothing is retried."""
    with pytest.raises(sa.ContentPolicyError):
        await client.submit(sa.TextToVideo(prompt="something [violate]"))
    fake.set_balance(0.01)
    with pytest.raises(sa.InsufficientCreditsError):
        await client.submit(PROMPT)
    assert fake.stats.requests_by_kind["create"] == 2
    assert await client.balance() == pytest.approx(0.01)


async def test_http_200_with_error_body_raises(client: sa.SoraClient, fake: FakeApixo) -> None:
    """HTTP 200 whose body code is 400 is an error, and not retried."""
    fake.inject("error_in_200", on="create", status=400)
    with pytest.raises(sa.InvalidRequestError):
        await client.submit(PROMPT)
    assert fake.stats.requests_by_kind["create"] == 1


async def test_unknown_task_is_not_found(client: sa.SoraClient) -> None:
    """status() of an unknown task id raises NotFoundError."""
    with pytest.raises(sa.NotFoundError):
        await client.status("task_doesnotexist")


async def test_429_storm_is_ridden_out(client: sa.SoraClient, fake: FakeApixo) -> None:
    """A burst of 429s on creates and polls is retried after pauses; nothing is paid twice."""
    fake.inject("rate_limit", on="create", times=3)
    fake.inject("rate_limit", on="status", times=3, retry_after=2.0)
    video = await client.generate(PROMPT)
    assert video.urls
    assert fake.stats.rate_limited == 6
    assert fake.stats.creates_per_prompt[PROMPT.prompt] == 1


@pytest.mark.parametrize("fault", ["server_error", "reset", "broken_json", "error_in_200"])
async def test_status_faults_are_retried(
    client: sa.SoraClient, fake: FakeApixo, fault: str
) -> None:
    """Status calls are retried through 5xx, resets, broken JSON and 200-wrapped 500s."""
    task_id = await client.submit(PROMPT)
    fake.inject(fault, on="status", times=2, status=500)  # type: ignore[arg-type]
    status = await client.status(task_id)
    assert status.task_id == task_id
    assert fake.stats.faults[fault] == 2


async def test_slow_status_times_out_and_is_retried(fake: FakeApixo) -> None:
    """An attempt slower than the timeout is abandoned and retried."""
    retry = sa.RetryPolicy(timeout=5.0)
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url, retry=retry) as client:
        task_id = await client.submit(PROMPT)
        fake.inject("slow", on="status", delay=30.0)
        status = await client.status(task_id)
    assert status.task_id == task_id
    assert fake.stats.requests_by_kind["status"] == 2


async def test_503_on_create_is_retried_once_made(client: sa.SoraClient, fake: FakeApixo) -> None:
    """A 503 means no task was made: the create is retried and makes exactly one."""
    fake.inject("server_error", on="create", status=503, times=2)
    await client.submit(PROMPT)
    assert fake.stats.requests_by_kind["create"] == 3
    assert fake.stats.creates_per_prompt[PROMPT.prompt] == 1


@pytest.mark.parametrize(
    ("fault", "status"),
    [("reset_after_create", 503), ("broken_json", 503), ("server_error", 500), ("reset", 503)],
)
async def test_ambiguous_create_is_never_repeated(
    client: sa.SoraClient, fake: FakeApixo, fault: str, status: int
) -> None:
    """A create whose fate is unknown raises SubmitUncertainError and is not sent again."""
    fake.inject(fault, on="create", status=status)  # type: ignore[arg-type]
    with pytest.raises(sa.SubmitUncertainError):
        await client.submit(PROMPT)
    assert fake.stats.requests_by_kind["create"] == 1
    # The slot is held for the task that may exist: 9 remain for new creates.
    assert client.governor.slots_in_use == 1


async def test_resubmit_policy_creates_again(fake: FakeApixo) -> None:
    """on_uncertain='resubmit' opts in to a second create after an ambiguous one."""
    async with sa.SoraClient(
        api_key=fake.api_key, base_url=fake.url, on_uncertain="resubmit"
    ) as client:
        fake.inject("reset_after_create", on="create")
        task_id = await client.submit(PROMPT)
    assert task_id in fake.tasks
    assert fake.stats.creates_per_prompt[PROMPT.prompt] == 2


async def test_refused_connection_is_retried_then_reported() -> None:
    """Nothing listening: creates are retried (no task can exist), then TransportError."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    retry = sa.RetryPolicy(attempts=3)
    async with sa.SoraClient(
        api_key="k", base_url=f"http://127.0.0.1:{port}/api/v1", retry=retry
    ) as client:
        with pytest.raises(sa.TransportError, match="cannot connect"):
            await client.submit(PROMPT)
        assert client.governor.slots_in_use == 0


async def test_the_key_never_leaks(fake: FakeApixo, caplog: pytest.LogCaptureFixture) -> None:
    """The key appears in no repr, log line or exception text, even on errors."""
    secret = fake.api_key
    caplog.set_level(logging.DEBUG, logger="sora_async")
    fake.inject("server_error", on="status", times=1)
    fake.inject("rate_limit", on="create", times=1)
    async with sa.SoraClient(api_key=secret, base_url=fake.url) as client:
        assert secret not in repr(client)
        task_id = await client.submit(PROMPT)
        await client.status(task_id)
        with pytest.raises(sa.NotFoundError) as caught:
            await client.status("nope")
    assert secret not in str(caught.value)
    assert secret not in caplog.text
    async with sa.SoraClient(api_key="another-secret", base_url=fake.url) as client:
        with pytest.raises(sa.AuthenticationError) as refused:
            await client.balance()
    assert "another-secret" not in str(refused.value)
    assert "another-secret" not in caplog.text


async def test_configuration_from_environment(
    fake: FakeApixo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APIXO_API_KEY and APIXO_BASE_URL configure a client built without arguments."""
    monkeypatch.setenv("APIXO_API_KEY", fake.api_key)
    monkeypatch.setenv("APIXO_BASE_URL", fake.url)
    async with sa.SoraClient() as client:
        assert await client.balance() == pytest.approx(900.0)


def test_missing_key_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key anywhere: InputError at construction, naming api_key."""
    monkeypatch.delenv("APIXO_API_KEY", raising=False)
    with pytest.raises(sa.InputError, match="api_key"):
        sa.SoraClient()
    with pytest.raises(sa.InputError, match="provider"):
        sa.SoraClient(api_key="k", provider="cheapest")
    with pytest.raises(sa.InputError, match="callback_url"):
        sa.SoraClient(api_key="k", callback_url="ftp://host/cb")
    with pytest.raises(sa.InputError, match="download_concurrency"):
        sa.SoraClient(api_key="k", download_concurrency=0)
    with pytest.raises(sa.InputError, match="wait_timeout"):
        sa.SoraClient(api_key="k", wait_timeout=0)


async def test_use_outside_the_context_raises(fake: FakeApixo) -> None:
    """Calls before entering or after leaving the client raise ClientClosedError."""
    client = sa.SoraClient(api_key=fake.api_key, base_url=fake.url)
    with pytest.raises(sa.ClientClosedError):
        await client.balance()
    async with client:
        await client.balance()
    with pytest.raises(sa.ClientClosedError):
        await client.submit(PROMPT)
    with pytest.raises(sa.ClientClosedError):
        async with client:
            pass
    assert fake.stats.requests == 1


NESTED = b"[" * 5000 + b"]" * 5000  # deeper than any JSON decoder recurses


@contextlib.asynccontextmanager
async def hostile_service(status_body: bytes, http_status: int = 200) -> AsyncIterator[str]:
    """Serve an API that creates tasks normally and answers every status with
    ``status_body``; yield its base URL."""

    async def create(request: web.Request) -> web.Response:
        return web.json_response({"code": 200, "message": "ok", "data": {"taskId": "t1"}})

    async def status(request: web.Request) -> web.Response:
        return web.Response(body=status_body, status=http_status, content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/v1/generateTask/{model}", create)
    app.router.add_get("/api/v1/statusTask/{model}", status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1"
    finally:
        await runner.cleanup()
        sock.close()


@pytest.mark.parametrize(
    ("body", "http_status"),
    [
        (NESTED, 200),
        (b'{"code": 200, "message": "ok", "data": ' + NESTED + b"}", 200),
        (b'{"code": 500, "message": "oops", "data": ' + NESTED + b"}", 500),
        (b'{"code": 400, "message": "bad", "data": ' + NESTED + b"}", 400),
    ],
)
async def test_deeply_nested_answers_are_sora_errors(body: bytes, http_status: int) -> None:
    """A status answer nested thousands of levels deep is an undecodable answer like any
    other: status() raises a SoraError; a waiter ends with ProtocolError once patience
    runs out (an HTTP 200 answer that makes no sense) or TaskTimeoutError at its deadline
    (an error answer, a passing fault); the client closes cleanly (no RecursionError, no
    ExceptionGroup)."""
    async with (
        hostile_service(body, http_status) as url,
        sa.SoraClient(api_key="k", base_url=url) as client,
    ):
        with pytest.raises(sa.SoraError):
            await client.status("t1")
        task_id = await client.submit(PROMPT)
        ending = sa.ProtocolError if http_status == 200 else sa.TaskTimeoutError
        with pytest.raises(ending):
            await client.wait(task_id, timeout=900)


class _Refused(Exception):
    """A caller's hook declining to send."""


async def test_before_create_runs_once_the_permit_is_granted(fake: FakeApixo) -> None:
    """``before_create`` is awaited once the request permit is granted, just before the
    send, not while the create waits for the window; what it raises stops the create
    unsent, frees its slot and is raised by submit. ``after_no_task`` hears of a 429."""
    limits = sa.Limits(requests=5, period=60.0)
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url, limits=limits) as client:
        for _ in range(limits.requests):  # the window is spent: the create waits ~60 s
            await client.balance()
        loop = asyncio.get_running_loop()
        heard: list[tuple[str, float, int]] = []

        async def sending() -> None:
            heard.append(("sending", loop.time(), fake.stats.requests))

        async def no_task() -> None:
            heard.append(("no_task", loop.time(), fake.stats.requests))

        fake.inject("rate_limit", on="create", retry_after=10.0)
        await client.submit(PROMPT, before_create=sending, after_no_task=no_task)
        assert [event for event, _, _ in heard] == ["sending", "no_task", "sending"]
        assert heard[0][1] >= limits.period  # after the wait for the permit
        assert heard[0][2] == limits.requests  # and before its create reached the service
        assert heard[1][2] == heard[2][2] == limits.requests + 1  # the 429, then the retry
        assert heard[2][1] >= heard[1][1] + 10.0

        async def refuse() -> None:
            raise _Refused

        requests = fake.stats.requests
        with pytest.raises(_Refused):
            await client.submit(PROMPT, before_create=refuse)
        assert fake.stats.requests == requests
        assert client.governor.slots_in_use == 1  # the first task's only
    assert fake.stats.creates == 1
