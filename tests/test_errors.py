"""One place maps service answers to exceptions, whether the HTTP status or the body says so."""

from __future__ import annotations

import asyncio
import sys
import traceback

import anyio
import pytest

import sora_async as sa
from sora_async._errors import error_from_response, sora_error_in, unwrap_sora_errors

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup


@pytest.mark.parametrize(
    ("http_status", "code", "message", "expected"),
    [
        (401, 401, "Invalid or missing API key", sa.AuthenticationError),
        (200, 401, "Invalid or missing API key", sa.AuthenticationError),
        (402, 402, "Insufficient balance", sa.InsufficientCreditsError),
        (400, 400, "Insufficient credits", sa.InsufficientCreditsError),
        (200, 400, "Insufficient credits", sa.InsufficientCreditsError),
        (
            400,
            400,
            "Content violates provider policy, please adjust the prompt",
            sa.ContentPolicyError,
        ),
        (403, 403, "Content violates policy", sa.ContentPolicyError),
        (403, 403, "Forbidden: key lacks permission", sa.PermissionDeniedError),
        (404, 404, "Task not found", sa.NotFoundError),
        (400, 400, "Invalid parameters", sa.InvalidRequestError),
        (200, 400, "Invalid parameters", sa.InvalidRequestError),
        (422, 422, "Unprocessable", sa.InvalidRequestError),
        (429, 429, "Rate limit exceeded", sa.RateLimitError),
        (200, 429, "Rate limit exceeded", sa.RateLimitError),
        (500, 500, "Internal error", sa.ServerError),
        (200, 503, "Unavailable", sa.ServerError),
        (502, 200, "Bad gateway", sa.ServerError),
    ],
)
def test_every_documented_error_maps_to_its_class(
    http_status: int, code: int, message: str, expected: type[sa.APIError]
) -> None:
    """The class follows the error code from either the HTTP status or the body."""
    error = error_from_response(http_status, code, message, None)
    assert type(error) is expected
    assert isinstance(error, sa.SoraError)
    assert error.message == message
    assert error.code == (code if code >= 400 else http_status)


def test_error_text_carries_the_services_detail() -> None:
    """A 400 with data.error shows that detail in the message."""
    error = error_from_response(400, 400, "Bad request", {"error": "Missing required field"})
    assert "Missing required field" in str(error)


def outage(port: int) -> sa.RedisUnavailableError:
    """A RedisUnavailableError raised from a connection error, as the governor raises it."""
    try:
        try:
            raise ConnectionRefusedError(f"connecting to 127.0.0.1:{port}")
        except ConnectionRefusedError as exc:
            raise sa.RedisUnavailableError(f"Redis at redis://127.0.0.1:{port}/0 down") from exc
    except sa.RedisUnavailableError as error:
        return error


async def test_a_task_groups_sora_error_leaves_as_itself() -> None:
    """Two children of a task group fail with RedisUnavailableError: the first one
    raised leaves as itself, its own cause kept, the group as its context; its
    traceback prints without the group (whose leaves share the cause)."""
    first, second = outage(1), outage(2)

    async def fail(error: BaseException, delay: float) -> None:
        await asyncio.sleep(delay)
        raise error

    with pytest.raises(sa.RedisUnavailableError) as caught, unwrap_sora_errors():
        async with anyio.create_task_group() as group:
            group.start_soon(fail, first, 0.0)
            group.start_soon(fail, second, 0.0)
            await asyncio.sleep(1)
    assert caught.value is first
    assert isinstance(first.__cause__, ConnectionRefusedError)
    assert isinstance(first.__context__, BaseExceptionGroup)
    printed = "".join(traceback.format_exception(first))
    assert printed.rstrip().endswith("Redis at redis://127.0.0.1:1/0 down")
    assert "ExceptionGroup" not in printed


async def test_a_group_holding_anything_else_stays_a_group() -> None:
    """A bug (an error that is not a SoraError) beside a SoraError: the group is raised
    unchanged, so that nothing is hidden."""

    async def fail(error: BaseException) -> None:
        raise error

    with pytest.raises(ExceptionGroup) as caught, unwrap_sora_errors():
        async with anyio.create_task_group() as group:
            group.start_soon(fail, outage(1))
            group.start_soon(fail, KeyError("bug"))
            await asyncio.sleep(1)
    assert len(caught.value.exceptions) == 2


def test_the_sora_error_of_nested_groups_with_cancellations() -> None:
    """Nested groups are flattened and cancellations skipped: the first SoraError
    stands for the group; cancellations alone, or a bug, stand for nothing."""
    error = outage(1)
    cancelled = asyncio.CancelledError()
    nested = BaseExceptionGroup("outer", [cancelled, ExceptionGroup("inner", [error, outage(2)])])
    assert sora_error_in(nested) is error
    assert sora_error_in(BaseExceptionGroup("only", [cancelled])) is None
    assert sora_error_in(ExceptionGroup("bug", [error, RuntimeError("bug")])) is None
    with pytest.raises(ValueError, match="plain"), unwrap_sora_errors():
        raise ValueError("plain")  # not a group: untouched
