"""Property tests of every decoder: generated and mutated envelopes (missing fields, wrong
types, huge strings, nested junk, wrong casing) for create, status, balance and callback
bodies. Only SoraError subclasses escape, never another exception, never a hang."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

import looptime
import msgspec
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sora_async as sa
from sora_async._models import decode_status
from sora_async.webhook import handle_callback

TASK = "task_0123456789abcdef"
URL = "https://cdn.example.com/v.mp4"
SOUND: dict[str, dict[str, Any]] = {
    "pending": {"taskId": TASK, "state": "pending", "createTime": 1767965610929},
    "success": {
        "taskId": TASK,
        "state": "success",
        "resultJson": msgspec.json.encode({"resultUrls": [URL]}).decode(),
        "createTime": 1767965610929,
        "completeTime": 1767965730929,
        "costTime": 120000,
    },
    "failed": {"taskId": TASK, "state": "failed", "failCode": "NSFW", "failMsg": "no"},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
HUGE = "x" * 1_000_000


@st.composite
def mutated(draw: st.DrawFn, sound: dict[str, Any]) -> dict[str, Any]:
    """Return ``sound`` with a few fields dropped, retyped, recased, blown up or nested."""
    data = dict(sound)
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(sorted(data))) if data else "x"
        action = draw(st.sampled_from(["drop", "junk", "case", "huge", "nest", "value-case"]))
        value = data.pop(key, None)
        if action == "junk":
            data[key] = draw(json_values)
        elif action == "case":
            data[draw(st.sampled_from([key.upper(), key.lower(), key.title()]))] = value
        elif action == "huge":
            data[key] = HUGE
        elif action == "nest":
            data[key] = {"value": value, "junk": draw(json_values)}
        elif action == "value-case" and isinstance(value, str):
            data[key] = value.upper()
    return data


status_data = st.sampled_from(sorted(SOUND)).flatmap(lambda state: mutated(SOUND[state]))
data_values = status_data | json_values


@st.composite
def envelopes(draw: st.DrawFn, data: st.SearchStrategy[Any]) -> bytes:
    """Return an answer body: a (maybe mutated) envelope, cut short, or any bytes."""
    form = draw(st.sampled_from(["envelope", "envelope", "envelope", "truncated", "bytes"]))
    if form == "bytes":
        return draw(st.binary(max_size=200))
    envelope = {
        "code": draw(st.sampled_from([200, 200, 200, 400, 404, 429, 500]) | json_values),
        "message": draw(st.text(max_size=20) | json_values),
        "data": draw(data),
    }
    body = msgspec.json.encode(draw(mutated(envelope)))
    if form == "truncated":
        return body[: draw(st.integers(0, max(0, len(body) - 1)))]
    return body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=status_data | json_values)
def test_status_decoder_gives_a_checked_status_or_a_protocol_error(data: Any) -> None:
    """Any status ``data`` decodes to a status of the task asked about (a success with
    absolute http(s) URLs only), or raises ProtocolError naming that task."""
    error: sa.ProtocolError | None = None
    try:
        status = decode_status(msgspec.json.encode(data), TASK)
    except sa.ProtocolError as exc:
        error = exc
    if error is not None:
        assert error.task_id == TASK
        return
    assert status.task_id == TASK
    if status.state is sa.TaskState.SUCCESS:
        assert status.result_urls
        assert all(urlsplit(url).scheme in ("http", "https") for url in status.result_urls)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=envelopes(data_values), token=st.sampled_from(["secret", "wrong", None]))
def test_callback_receiver_answers_every_body(body: bytes, token: str | None) -> None:
    """Whatever a callback carries, the receiver answers an HTTP status and raises nothing."""
    client = sa.SoraClient(
        api_key="k", callback_url="https://example.com/cb", callback_secret="secret"
    )
    assert handle_callback(client, body, token) in (200, 400, 403, 413)


def run_virtual(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on a fresh event loop in virtual time (hypothesis tests are sync)."""
    loop = looptime.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()


async def answer_with(body: bytes, http_status: int, calls: list[str]) -> None:
    """Serve ``body`` (HTTP ``http_status``) to every request; make each call of ``calls``;
    only SoraError may come out, and within an hour of virtual time."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, status=http_status, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    retry = sa.RetryPolicy(attempts=2, deadline=600.0)
    try:
        async with sa.SoraClient(
            api_key="k", base_url=f"http://127.0.0.1:{port}/api/v1", retry=retry
        ) as client:
            for call in calls:
                try:
                    if call == "create":
                        await asyncio.wait_for(client.submit(sa.TextToVideo(prompt="p")), 3600)
                    elif call == "status":
                        status = await asyncio.wait_for(client.status(TASK), 3600)
                        assert status.task_id == TASK
                    else:
                        await asyncio.wait_for(client.balance(), 3600)
                except sa.SoraError:
                    pass
    finally:
        await runner.cleanup()


@pytest.mark.looptime
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=envelopes(data_values | st.dictionaries(st.sampled_from(["taskId", "Id"]), json_values)),
    http_status=st.sampled_from([200, 200, 200, 201, 400, 401, 404, 429, 500, 503]),
)
def test_only_sora_errors_leave_the_transport(body: bytes, http_status: int) -> None:
    """Create, status and balance against a service answering any body: a result or a
    SoraError, never another exception, never a hang."""
    run_virtual(answer_with(body, http_status, ["status", "balance", "create"]))
