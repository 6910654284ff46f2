"""Fan-out: many requests through one client, pulled lazily, one per free task slot."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.abc

from ._errors import AuthenticationError, InputError, InsufficientCreditsError, SoraError
from ._governor import Governor
from ._models import Result

Prepared = TypeVar("Prepared")

__all__ = ["Outcome", "fan_out"]


@dataclass(frozen=True)
class Outcome:
    """What became of one request of a fan-out: exactly one of video / error is set.

    ``video`` holds the result of any model (a :class:`Video` for video models).
    """

    request: Any
    video: Result | None = None
    error: SoraError | None = None
    task_id: str | None = None

    @property
    def ok(self) -> bool:
        """Return whether the request produced a video."""
        return self.video is not None


async def fan_out(
    group: anyio.abc.TaskGroup,
    requests: Iterable[Any] | AsyncIterable[Any],
    *,
    governor_for: Callable[[Prepared], Governor],
    prepare: Callable[[Any], Prepared],
    run: Callable[[Prepared], Awaitable[Result]],
) -> AsyncIterator[Outcome]:
    """Yield an Outcome per request as each finishes.

    ``prepare`` validates a request into a create body (InputError: an Outcome, no
    slot spent); a slot is then taken and ``run`` creates and awaits the video with
    it. The work runs in ``group`` (the client's), so it may outlive an abandoned
    iterator only until the iterator is closed. AuthenticationError stops everything
    and is raised; InsufficientCreditsError stops new creates, lets the others
    finish, then is raised.
    """
    send, receive = anyio.create_memory_object_stream[Outcome](math.inf)
    fatal: list[SoraError] = []
    batch = anyio.CancelScope()

    async def work(request: Any, body: Prepared) -> None:
        try:
            video = await run(body)
        except AuthenticationError as exc:
            fatal.append(exc)
            batch.cancel()
        except InsufficientCreditsError as exc:
            fatal.append(exc)  # the feeder sees it and stops creating
            await send.send(Outcome(request=request, error=exc))
        except SoraError as exc:
            failed_id: str | None = getattr(exc, "task_id", None)
            await send.send(Outcome(request=request, error=exc, task_id=failed_id))
        else:
            await send.send(Outcome(request=request, video=video, task_id=video.task_id))

    async def feed() -> None:
        with batch:
            async with send, anyio.create_task_group() as workers:
                async for request in _aiter(requests):
                    try:
                        body = prepare(request)
                    except InputError as exc:
                        await send.send(Outcome(request=request, error=exc))
                        continue
                    governor = governor_for(body)
                    await governor.acquire_slot()
                    if fatal:
                        governor.release_slot()
                        break
                    workers.start_soon(work, request, body)

    group.start_soon(feed)
    try:
        async with receive:
            async for outcome in receive:
                yield outcome
    finally:
        batch.cancel()
    if fatal:
        raise fatal[0]


async def _aiter(
    items: Iterable[Any] | AsyncIterable[Any],
) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
            await asyncio.sleep(0)  # let other tasks run between pulls of a long list
