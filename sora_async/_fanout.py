"""Fan-out: many requests through one client, pulled lazily, one per free task slot."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.abc

from ._errors import (
    AuthenticationError,
    InputError,
    InsufficientCreditsError,
    RedisUnavailableError,
    SoraError,
    unwrap_sora_errors,
)
from ._governor import Governor
from ._models import Result
from ._priority import Priority

Prepared = TypeVar("Prepared")
# With several models, how many requests may wait for slots per model while the
# others keep pulling (a model whose slots are full must not stall the rest).
_LOOKAHEAD = 16

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
    priority: Priority = "normal",
) -> AsyncIterator[Outcome]:
    """Yield an Outcome per request as each finishes.

    ``prepare`` validates a request into a create body (InputError: an Outcome, no
    slot spent); a slot of its governor is then taken and ``run`` creates and awaits
    the result with it. Requests of one governor take its slots in order; while one
    model's slots are all taken, the requests of others still go ahead. The work runs
    in ``group`` (the client's), so it may outlive an abandoned iterator only until
    the iterator is closed. AuthenticationError and RedisUnavailableError (no permit
    for anyone) stop everything and are raised; InsufficientCreditsError stops new
    creates, lets the others finish, then is raised. Whatever else escapes the work
    (the caller's iterable raised, say) is raised by the iterator, never by the
    client's background work.
    """
    send, receive = anyio.create_memory_object_stream[Outcome](math.inf)
    fatal: list[SoraError] = []
    escaped: list[Exception] = []
    batch = anyio.CancelScope()

    def stop_all(error: SoraError) -> None:
        fatal.append(error)
        batch.cancel()

    async def work(request: Any, body: Prepared) -> None:
        try:
            video = await run(body)
        except (AuthenticationError, RedisUnavailableError) as exc:
            stop_all(exc)
        except InsufficientCreditsError as exc:
            fatal.append(exc)  # the feeder sees it and stops creating
            await send.send(Outcome(request=request, error=exc))
        except SoraError as exc:
            failed_id: str | None = getattr(exc, "task_id", None)
            await send.send(Outcome(request=request, error=exc, task_id=failed_id))
        else:
            await send.send(Outcome(request=request, video=video, task_id=video.task_id))

    # Requests pulled but still waiting for a slot, in one queue per governor: a
    # model whose slots are all taken must not hold back the requests of another.
    queues: dict[int, collections.deque[tuple[Any, Prepared]]] = {}
    moved = asyncio.Event()  # a waiting request got its slot (or gave up)

    def waiting() -> int:
        return sum(len(queue) for queue in queues.values())

    def lookahead() -> int:
        # One model: one request waits, as many as there are slots run (pulled lazily).
        # Several: room for some to wait per model while the others keep pulling.
        return 1 if len(queues) <= 1 else _LOOKAHEAD * len(queues)

    async def serve(
        workers: anyio.abc.TaskGroup,
        governor: Governor,
        queue: collections.deque[tuple[Any, Prepared]],
    ) -> None:
        # Hands the governor's slots to its queue in order, first come, first served.
        while queue:
            request, body = queue[0]
            try:
                await governor.acquire_slot(priority)
            except SoraError as exc:  # no slot for anyone (Redis unreachable)
                stop_all(exc)
                return
            if fatal:
                governor.release_slot(priority=priority)
                queue.clear()
            else:
                queue.popleft()
                workers.start_soon(work, request, body)
            moved.set()

    async def feed() -> None:
        try:
            await pull()
        except Exception as exc:  # raised by the iterator below, not in the client's group
            escaped.append(exc)

    async def pull() -> None:
        with batch:
            async with send, anyio.create_task_group() as workers:
                async for request in _aiter(requests):
                    try:
                        body = prepare(request)
                    except InputError as exc:
                        await send.send(Outcome(request=request, error=exc))
                        continue
                    governor = governor_for(body)
                    queue = queues.setdefault(id(governor), collections.deque())
                    queue.append((request, body))
                    if len(queue) == 1:
                        workers.start_soon(serve, workers, governor, queue)
                    while waiting() >= lookahead() and not fatal:
                        moved.clear()
                        await moved.wait()
                    if fatal:
                        break

    group.start_soon(feed)
    try:
        async with receive:
            async for outcome in receive:
                yield outcome
    finally:
        batch.cancel()
    if fatal:
        raise fatal[0]
    if escaped:
        with unwrap_sora_errors():
            raise escaped[0]


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
