"""Short tasks on the hot path: plain asyncio tasks that an anyio task group owns.

anyio's ``start_soon`` wraps each child in a coroutine of its own, a cancel scope and
an event: about four times the CPU of a plain task, and a dozen objects for the
garbage collector. A create and a poll each run in a task of their own, once per
request, so they run in a TaskPool instead: plain tasks that the group still owns.
When the group is cancelled they are cancelled and awaited, and an error that
escapes one fails the group, as it would for any child.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

__all__ = ["TaskPool"]


class TaskPool:
    """Run short tasks for the task group that runs :meth:`run`."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        self._wake = asyncio.Event()  # an error escaped a task, or the pool has drained
        self._closing = False  # close() was called: run() returns once the tasks are done
        self._closed = False  # run() has ended
        self._on_done = self._finished  # bound once, not once per task
        # The context _finished runs in (it reads no context variable): one for all
        # tasks, where add_done_callback would copy the current one for each.
        self._context = contextvars.Context()

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Start ``func(*args)`` in a task of its own (cancelled after its first step if the
        pool has closed, as in a task group that has ended)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(func(*args))
        self._tasks.add(task)
        task.add_done_callback(self._on_done, context=self._context)
        if self._closed:
            loop.call_soon(task.cancel)

    def close(self) -> None:
        """Let :meth:`run` return once every task has ended (none is cancelled)."""
        self._closing = True
        if not self._tasks:
            self._wake.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            error = task.exception()
            if error is not None and self._error is None:
                self._error = error
                self._wake.set()
        if self._closing and not self._tasks:
            self._wake.set()

    async def run(self) -> None:
        """Own the pool's tasks until cancelled (then cancel them and wait for them) or
        closed and drained; raise the first error that escapes one of them."""
        try:
            await self._wake.wait()
            if self._error is not None:
                raise self._error
        finally:
            self._closed = True
            with anyio.CancelScope(shield=True):
                # Let every task take its first step, so that each is inside its own
                # try blocks when cancelled (a task cancelled before it starts runs none).
                await asyncio.sleep(0)
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
