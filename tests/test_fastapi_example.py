"""examples/fastapi_app.py served by uvicorn against the fake service, in real time.

The fake makes videos in one second; the app's callback route receives the fake's
callbacks; the test drives the app over HTTP like any user of it would.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import string
import sys
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
import uvicorn
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st
from uvicorn.logging import AccessFormatter

import examples.fastapi_app
import sora_async as sa
from examples.fastapi_app import (
    AppSettings,
    RedactSecrets,
    SummariseRepeats,
    app_settings_from_env,
    client_from_env,
    create_app,
)
from sora_async.testing import FakeApixo, fixed

# Real time, but quick: the fake's window is generous and generations take 1 s.
LIMITS = sa.Limits(requests=600, period=60.0, concurrent_tasks=10)
SECRET = "the-app-callback-secret"
APP_KEY = "the-app-key-for-its-callers"


@pytest.fixture
async def fake() -> AsyncIterator[FakeApixo]:
    """The fake service with one-second generations and a 600-a-minute key."""
    async with FakeApixo(
        generation_time=fixed(1.0), pending_time=0.1, requests=600, balance=1e6
    ) as server:
        yield server


@pytest.fixture
async def app_url(fake: FakeApixo) -> AsyncIterator[str]:
    """Serve create_app() with uvicorn on a free loopback port, its client in callback mode."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    origin = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def client_factory() -> sa.SoraClient:
        return sa.SoraClient(
            api_key=fake.api_key,
            base_url=fake.url,
            limits=LIMITS,
            callback_url=f"{origin}/apixo/callback",
            callback_secret=SECRET,
        )

    app = create_app(client_factory, api_keys=[APP_KEY])
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while not server.started:
            assert not serving.done(), "uvicorn stopped during startup"
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield origin
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        sock.close()


@pytest.fixture
async def http(app_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the app, with one of its API keys."""
    headers = {"Authorization": f"Bearer {APP_KEY}"}
    async with httpx.AsyncClient(base_url=app_url, timeout=30, headers=headers) as session:
        yield session


async def test_post_then_get_returns_the_video_url(
    fake: FakeApixo, http: httpx.AsyncClient
) -> None:
    """POST /videos answers a task id; GET /videos/{id} answers the video's URL as soon
    as the fake's callback reached the app (one confirming status request, no polling)."""
    created = await http.post(
        "/videos", json={"prompt": "a red kite", "duration": 10, "size": "1280*720"}
    )
    assert created.status_code == 200, created.text
    task_id = created.json()["task_id"]
    assert fake.tasks[task_id].request_type == "callback"
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = await http.get(f"/videos/{task_id}", params={"timeout": 30})
    assert got.status_code == 200, got.text
    assert got.json() == {
        "task_id": task_id,
        "url": f"{fake.origin}/files/{task_id}.mp4",
        "urls": [f"{fake.origin}/files/{task_id}.mp4"],
    }
    assert loop.time() - started < 5
    assert fake.stats.callbacks_delivered >= 1
    assert fake.tasks[task_id].polls == 1  # the confirmation of the callback


async def test_status_returns_the_snapshot(fake: FakeApixo, http: httpx.AsyncClient) -> None:
    """GET /status answers the client's snapshot as JSON: the task just created holds a
    slot, and the requests the service counted are in the window."""
    created = await http.post("/videos", json={"prompt": "a status kite"})
    assert created.status_code == 200, created.text
    got = await http.get("/status")
    assert got.status_code == 200, got.text
    status = msgspec.json.decode(got.content, type=sa.Snapshot)
    assert (status.slots_in_use, status.tasks_in_flight) == (1, fake.unfinished_tasks())
    assert status.requests_in_window == fake.stats.requests == 1
    assert (status.slot_limit, status.request_limit, status.rate_limited) == (10, 600, 0)
    assert set(status.models) == {"sora-2-pro"}


async def test_bad_input_is_422_naming_the_field(fake: FakeApixo, http: httpx.AsyncClient) -> None:
    """A bad duration or size, or a wrong type, is refused with 422 naming the field,
    and no task is created."""
    for body, field in [
        ({"prompt": "kite", "duration": 7}, "duration"),
        ({"prompt": "kite", "size": "640*480"}, "size"),
        ({"prompt": "kite", "duration": "ten"}, "duration"),
        ({"prompt": "   "}, "prompt"),
        ({"duration": 10}, "prompt"),
        ({"prompt": "kite", "sizes": "1280*720"}, "sizes"),
    ]:
        answer = await http.post("/videos", json=body)
        assert answer.status_code == 422, (body, answer.text)
        locations = [error["loc"] for error in answer.json()["detail"]]
        assert any(location[-1] == field for location in locations), (body, answer.text)
    assert fake.stats.creates == 0


async def test_unknown_task_id_is_404(http: httpx.AsyncClient) -> None:
    """GET /videos/{id} for a task id the service does not know answers 404."""
    answer = await http.get("/videos/task_doesnotexist", params={"timeout": 5})
    assert answer.status_code == 404, answer.text
    assert answer.json()["detail"]["task_id"] == "task_doesnotexist"


async def test_deadline_passed_is_504_and_the_task_goes_on(
    fake: FakeApixo, http: httpx.AsyncClient
) -> None:
    """GET with a deadline shorter than the generation answers 504; the task keeps
    running, and a later GET with time enough answers the video."""
    fake.generation_time = fixed(3.0)
    task_id = (await http.post("/videos", json={"prompt": "a slow one"})).json()["task_id"]
    early = await http.get(f"/videos/{task_id}", params={"timeout": 0.2})
    assert early.status_code == 504, early.text
    assert early.json()["detail"]["task_id"] == task_id
    later = await http.get(f"/videos/{task_id}", params={"timeout": 30})
    assert later.status_code == 200, later.text
    assert later.json()["url"] == f"{fake.origin}/files/{task_id}.mp4"


async def test_failed_generation_is_502_with_the_fail_code(http: httpx.AsyncClient) -> None:
    """A generation that fails answers 502 carrying the service's fail code."""
    created = await http.post("/videos", json={"prompt": "a kite [fail:NSFW]", "duration": 10})
    answer = await http.get(f"/videos/{created.json()['task_id']}", params={"timeout": 30})
    assert answer.status_code == 502, answer.text
    assert answer.json()["detail"]["fail_code"] == "NSFW"


async def test_bad_timeout_is_422(http: httpx.AsyncClient) -> None:
    """A timeout that is not a positive number of seconds is refused with 422."""
    for timeout in ("0", "-1", "soon"):
        answer = await http.get("/videos/task_x", params={"timeout": timeout})
        assert answer.status_code == 422, answer.text


async def test_callback_route_refuses_a_wrong_token(fake: FakeApixo, app_url: str) -> None:
    """The app's callback route is mounted: it refuses a callback without the app's
    secret (403) and one too large to be a callback (413)."""
    body = b'{"code": 200, "data": {"taskId": "t", "state": "success"}}'
    assert await fake.forge_callback(f"{app_url}/apixo/callback?token=guess", body) == 403
    assert await fake.forge_callback(f"{app_url}/apixo/callback", body) == 403
    assert await fake.forge_callback(f"{app_url}/apixo/callback", b"x" * 70_000) == 413


def test_environment_picks_the_shared_or_the_split_governor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With SORA_ASYNC_REDIS_URL every worker governs the whole key through Redis, every
    model on Redis (one budget for all with SORA_ASYNC_SHARED_BUDGET=1); without it
    APIXO_WORKERS=N gives each 1/N of APIXO_LIMITS. Bad settings are refused naming the
    variable."""
    for name in (
        "APIXO_CALLBACK_URL",
        "APIXO_CALLBACK_SECRET",
        "SORA_ASYNC_REDIS_URL",
        "SORA_ASYNC_SHARED_BUDGET",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("APIXO_API_KEY", "test-key")
    monkeypatch.setenv("APIXO_LIMITS", "30/6/8")
    monkeypatch.setenv("APIXO_WORKERS", "4")
    split = client_from_env()
    assert isinstance(split.governor, sa.LocalGovernor)
    assert split.limits == sa.Limits(requests=7, period=6.0, concurrent_tasks=2)
    monkeypatch.setenv("SORA_ASYNC_REDIS_URL", "redis://127.0.0.1:6379/0")
    shared = client_from_env()
    assert isinstance(shared.governor, sa.RedisGovernor)
    assert shared.governor.limits == sa.Limits(requests=30, period=6.0, concurrent_tasks=8)
    # Every model is on Redis, each on its own budget unless SORA_ASYNC_SHARED_BUDGET=1.
    veo = shared.governor_for("veo-3-1")
    assert isinstance(veo, sa.RedisGovernor)
    assert veo.prefix != shared.governor.prefix
    monkeypatch.setenv("SORA_ASYNC_SHARED_BUDGET", "1")
    one_budget = client_from_env()
    assert one_budget.governor_for("veo-3-1") is one_budget.governor
    monkeypatch.setenv("SORA_ASYNC_SHARED_BUDGET", "maybe")
    with pytest.raises(ValueError, match="SORA_ASYNC_SHARED_BUDGET"):
        client_from_env()
    monkeypatch.delenv("SORA_ASYNC_SHARED_BUDGET")
    monkeypatch.setenv("APIXO_CALLBACK_URL", "http://127.0.0.1:8000/apixo/callback")
    with pytest.raises(ValueError, match="APIXO_CALLBACK_SECRET"):
        client_from_env()
    for limits in ("60/60", "60/minute/10", "1/60/10"):
        monkeypatch.setenv("APIXO_LIMITS", limits)
        with pytest.raises(ValueError, match="APIXO_LIMITS"):
            client_from_env()


async def test_callback_route_refuses_deeply_nested_json(fake: FakeApixo, app_url: str) -> None:
    """A callback body nested thousands of levels deep is refused with 400, not a 500."""
    deep = b"[" * 3000 + b"]" * 3000
    for body in (deep, b'{"code": 200, "message": "", "data": ' + deep + b"}"):
        url = f"{app_url}/apixo/callback?token={SECRET}"
        assert await fake.forge_callback(url, body) == 400


def test_client_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's poll policy, timeouts, uncertain hold and download cap are set from
    environment variables; a bad value is refused naming the variable."""
    settings = {
        "APIXO_API_KEY": "k",
        "APIXO_POLL_PRIOR_MEAN": "90",
        "APIXO_POLL_INTERVAL": "5",
        "APIXO_WAIT_TIMEOUT": "120",
        "APIXO_REQUEST_TIMEOUT": "20",
        "APIXO_RETRY_DEADLINE": "100",
        "APIXO_UNCERTAIN_HOLD": "900",
        "APIXO_ON_UNCERTAIN": "resubmit",
        "APIXO_MAX_DOWNLOAD_BYTES": "1000000",
    }
    for name in ("APIXO_CALLBACK_URL", "SORA_ASYNC_REDIS_URL", "APIXO_LIMITS", "APIXO_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    client = client_from_env()
    assert client.scheduler.policy.prior_mean == 90
    assert client.scheduler.policy.min_interval == 5
    assert client.wait_timeout == 120
    assert client.uncertain_hold == 900
    assert client.on_uncertain == "resubmit"
    assert client.max_download_bytes == 1_000_000
    for name, bad in [("APIXO_WAIT_TIMEOUT", "soon"), ("APIXO_ON_UNCERTAIN", "maybe")]:
        monkeypatch.setenv(name, bad)
        with pytest.raises(sa.InputError, match=name):
            client_from_env()
        monkeypatch.setenv(name, settings[name])


def test_app_settings_are_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an API key of its own the app refuses to start unless SORA_APP_AUTH=off
    says the routes may be open; a contradiction, a short key or a bad value is refused
    naming the variable. uvicorn's import of ``app`` then stops with one line, no
    traceback."""
    for name in ("SORA_APP_API_KEYS", "SORA_APP_AUTH", "SORA_APP_LOG_REPEAT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"SORA_APP_API_KEYS is unset.*SORA_APP_AUTH=off"):
        app_settings_from_env()
    monkeypatch.setenv("SORA_APP_AUTH", "off")
    assert app_settings_from_env() == AppSettings(api_keys=(), auth=False, log_repeat=10.0)
    monkeypatch.setenv("SORA_APP_API_KEYS", f" {APP_KEY} ,, {APP_KEY}-2 ")
    with pytest.raises(ValueError, match="SORA_APP_AUTH=off contradicts SORA_APP_API_KEYS"):
        app_settings_from_env()
    monkeypatch.setenv("SORA_APP_AUTH", "on")
    monkeypatch.setenv("SORA_APP_LOG_REPEAT", "2.5")
    assert app_settings_from_env() == AppSettings(
        api_keys=(APP_KEY, f"{APP_KEY}-2"), auth=True, log_repeat=2.5
    )
    for name, bad, rule in [
        ("SORA_APP_API_KEYS", "short", "SORA_APP_API_KEYS: each key must be at least 16"),
        ("SORA_APP_AUTH", "maybe", "SORA_APP_AUTH must be on or off"),
        ("SORA_APP_LOG_REPEAT", "0", "SORA_APP_LOG_REPEAT"),
    ]:
        with monkeypatch.context() as patch:
            patch.setenv(name, bad)
            with pytest.raises(ValueError, match=rule):
                app_settings_from_env()
    monkeypatch.delenv("SORA_APP_API_KEYS")
    monkeypatch.setenv("APIXO_API_KEY", "k")
    with pytest.raises(SystemExit) as stopped:
        _ = examples.fastapi_app.app
    assert str(stopped.value.code).startswith("error: SORA_APP_API_KEYS is unset")


async def test_routes_are_open_only_when_auth_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """With SORA_APP_AUTH=off, GET /status answers without a key; with keys it answers
    401 without one (and 200 with it), and the 401 asks for a Bearer token."""
    monkeypatch.delenv("SORA_APP_API_KEYS", raising=False)
    monkeypatch.setenv("SORA_APP_AUTH", "off")

    def client_factory() -> sa.SoraClient:
        return sa.SoraClient(api_key="k", base_url="http://127.0.0.1:9/api/v1")

    async def status(app: FastAPI, **headers: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            return await http.get("/status", headers=headers)

    assert (await status(create_app(client_factory))).status_code == 200
    closed = create_app(client_factory, api_keys=[APP_KEY])
    refused = await status(closed)
    assert (refused.status_code, refused.headers["WWW-Authenticate"]) == (401, "Bearer")
    assert (await status(closed, authorization=f"Bearer {APP_KEY}")).status_code == 200


def access_line(record: logging.LogRecord) -> str:
    """Format ``record`` as uvicorn's default access log does."""
    return AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(record)


@given(secret=st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=16))
def test_the_secret_is_redacted_from_access_lines_and_tracebacks(secret: str) -> None:
    """A callback's access-log line, a message naming the callback URL and a traceback
    whose exception carries it come out with ``token=***`` and without the secret."""
    redact = RedactSecrets([secret])
    path = f"/apixo/callback?token={secret}&attempt=1"
    access = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", path, "1.1", 200), None,
    )  # fmt: skip
    assert redact.filter(access)
    assert access_line(access) == (
        '127.0.0.1:5000 - "POST /apixo/callback?token=***&attempt=1 HTTP/1.1" 200 OK'
    )
    try:
        raise sa.TransportError(f"cannot reach http://h{path}")
    except sa.TransportError:
        failed = logging.LogRecord(
            "sora_async", logging.ERROR, "", 0, "callback to %s failed", (f"http://h{path}",),
            sys.exc_info(),
        )  # fmt: skip
    assert redact.filter(failed)
    text = logging.Formatter().format(failed)
    assert secret not in text
    assert text.count("token=***") == 2


def test_repeated_errors_are_logged_once_then_summarised() -> None:
    """A thousand identical tracebacks in one period: the first is logged whole, the
    rest are dropped, and the first of the next period says how many were, without
    its traceback. Other messages and INFO lines are not held back."""
    now = [0.0]
    repeats = SummariseRepeats(10.0, clock=lambda: now[0])

    def record(message: str, level: int = logging.ERROR) -> logging.LogRecord:
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            info = sys.exc_info()
        return logging.LogRecord("asyncio", level, "", 0, message, None, info)

    emfile = "socket.accept() out of system resource"
    passed = []
    for step in range(1000):
        now[0] = step * 0.005
        passed += [one for one in [record(emfile)] if repeats.filter(one)]
    assert [one.exc_info is not None for one in passed] == [True]
    assert repeats.filter(record("another error"))
    assert repeats.filter(record("an access line", logging.INFO))
    now[0] = 11.0
    summary = record(emfile)
    assert repeats.filter(summary)
    assert summary.exc_info is None
    assert summary.getMessage() == (
        f"{emfile} (999 more like it in the last 11 s, not logged; the first had the traceback)"
    )
    assert not repeats.filter(record(emfile))
