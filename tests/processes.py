"""Real processes for tests of the FastAPI example: the fake service and uvicorn.

``fake_process(...)`` runs ``python -m sora_async.testing`` and reads its counters
over HTTP (``GET /fake/stats``); ``app_process(env, ...)`` runs
``python -m uvicorn examples.fastapi_app:app`` with ``env`` (on top of this
environment, without its ``APIXO_*``, ``SORA_ASYNC_*`` and ``SORA_APP_*``), keeps its
log lines (stdout and stderr, in order) and stops it by a signal, timing the exit.
``fake_and_app`` starts both at once. A restart is a second ``app_process`` with the
same environment and port (the callback URL names the port)::

    async with fake_and_app(("--generation", "fixed:30")) as (fake, app, env):
        ...
        await app.stop(signal.SIGKILL)
        async with app_process(env, port=app.address[1]) as again:
            ...
        stats = await fake.stats()  # while the fake runs
    assert stats["rate_limited"] == 0
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
APP_KEY = "app-key-" + "k" * 24  # the app's own API key, for its callers
STARTED = "Application startup complete"


def free_port() -> int:
    """Return a loopback port free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """Return this process's environment without the app's settings, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("APIXO_", "SORA_ASYNC_", "SORA_APP_"))
    }
    return env | extra


async def collect(stream: asyncio.StreamReader, lines: list[str]) -> None:
    """Keep a process's log lines (and keep its pipe from filling up)."""
    async for raw in stream:
        lines.append(raw.decode(errors="replace").rstrip())


async def stop_process(process: asyncio.subprocess.Process, sig: int, limit: float) -> float:
    """Send ``sig`` and return the seconds until the process exited (SIGKILL after
    ``limit`` seconds, and the time says so)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    if process.returncode is None:
        process.send_signal(sig)
    try:
        await asyncio.wait_for(process.wait(), limit)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
    return loop.time() - started


@dataclass
class FakeProcess:
    """The fake service in a process of its own; its counters read over HTTP."""

    process: asyncio.subprocess.Process
    url: str
    api_key: str

    @property
    def origin(self) -> str:
        """Return ``http://host:port`` of the fake (its files are served there)."""
        return self.url.split("/api/", 1)[0]

    async def stats(self) -> dict[str, Any]:
        """Return the fake's counters (``FakeStats`` fields and ``unfinished_tasks``)."""
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.get(f"{self.origin}/fake/stats")
        answer.raise_for_status()
        counters: dict[str, Any] = answer.json()
        return counters


@contextlib.asynccontextmanager
async def fake_process(
    *options: str, port: int = 0, api_key: str | None = None
) -> AsyncIterator[FakeProcess]:
    """Run ``python -m sora_async.testing *options`` on ``port`` (0: any) with ``api_key``
    (default: a fresh one) until the block ends."""
    api_key = secrets.token_hex(8) if api_key is None else api_key
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sora_async.testing", "--port", str(port), "--api-key", api_key),
        *options,
        cwd=ROOT,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        printed: dict[str, str] = {}
        while "APIXO_API_KEY" not in printed:
            line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
            assert line, "the fake service stopped at start"
            name, _, value = line.strip().partition("=")
            printed[name] = value
        yield FakeProcess(process, printed["APIXO_BASE_URL"], api_key)
    finally:
        await stop_process(process, signal.SIGTERM, 5)


@dataclass
class AppProcess:
    """``examples.fastapi_app`` under uvicorn in a process of its own."""

    process: asyncio.subprocess.Process
    origin: str
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        """Return the app's host and port."""
        host, port = self.origin.removeprefix("http://").split(":")
        return host, int(port)

    @property
    def log(self) -> str:
        """Return everything the process printed so far, stdout and stderr."""
        return "\n".join(self.lines)

    def http(self, key: str | None = APP_KEY, **options: Any) -> httpx.AsyncClient:
        """Return an HTTP client for the app, sending ``key`` as a Bearer token."""
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.AsyncClient(base_url=self.origin, headers=headers, timeout=30, **options)

    async def stop(self, sig: int = signal.SIGTERM, limit: float = 30.0) -> float:
        """Send ``sig``; return the seconds until the process exited."""
        return await stop_process(self.process, sig, limit)


def app_env(base_url: str, api_key: str, origin: str, **extra: str) -> dict[str, str]:
    """Return the app's environment for the fake at ``base_url``: callbacks on at
    ``origin``, a secret of its own and this module's ``APP_KEY`` (``extra`` on top)."""
    return {
        "APIXO_API_KEY": api_key,
        "APIXO_BASE_URL": base_url,
        "APIXO_CALLBACK_URL": f"{origin}/apixo/callback",
        "APIXO_CALLBACK_SECRET": secrets.token_urlsafe(16),
        "SORA_APP_API_KEYS": APP_KEY,
    } | extra


@contextlib.asynccontextmanager
async def app_process(
    env: dict[str, str],
    *options: str,
    port: int | None = None,
    started: int = 1,
    preexec_fn: Callable[[], Any] | None = None,
) -> AsyncIterator[AppProcess]:
    """Run ``python -m uvicorn examples.fastapi_app:app`` on loopback with ``env`` and
    uvicorn ``options``; wait until ``started`` lifespans ran (one per worker). SIGTERM
    (then SIGKILL) at the end of the block if it still runs."""
    port = free_port() if port is None else port
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "uvicorn", "examples.fastapi_app:app"),
        *("--host", "127.0.0.1", "--port", str(port), *options),
        cwd=ROOT,
        env=clean_env(**env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=preexec_fn,
    )
    app = AppProcess(process, f"http://127.0.0.1:{port}")
    assert process.stdout is not None
    reading = asyncio.ensure_future(collect(process.stdout, app.lines))
    try:
        for _ in range(600):
            if sum(STARTED in line for line in app.lines) >= started:
                break
            if process.returncode is not None:
                await reading
                raise AssertionError("uvicorn stopped at start:\n" + app.log)
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("uvicorn did not start:\n" + app.log)
        yield app
    finally:
        await stop_process(process, signal.SIGTERM, 15)
        await reading


@contextlib.asynccontextmanager
async def fake_and_app(
    fake_options: tuple[str, ...],
    *app_options: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], Any] | None = None,
) -> AsyncIterator[tuple[FakeProcess, AppProcess, dict[str, str]]]:
    """Start the fake (``fake_options``) and the app (uvicorn ``app_options``; its
    environment from :func:`app_env`, ``env`` on top; ``preexec_fn`` run in its process
    before uvicorn starts) at once; yield both and the app's environment. Both are
    stopped at the end of the block, if still running."""
    fake_port, app_port = free_port(), free_port()
    api_key = secrets.token_hex(8)
    base_url = f"http://127.0.0.1:{fake_port}/api/v1"
    app_environment = app_env(base_url, api_key, f"http://127.0.0.1:{app_port}", **(env or {}))
    async with contextlib.AsyncExitStack() as stack:
        # Both start together: the app's start sends nothing to the service.
        fake_entering = fake_process(*fake_options, port=fake_port, api_key=api_key)
        app_entering = app_process(
            app_environment, *app_options, port=app_port, preexec_fn=preexec_fn
        )
        fake_started = asyncio.ensure_future(stack.enter_async_context(fake_entering))
        app_started = asyncio.ensure_future(stack.enter_async_context(app_entering))
        await asyncio.wait([fake_started, app_started])
        yield fake_started.result(), app_started.result(), app_environment
