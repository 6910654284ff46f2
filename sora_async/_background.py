"""The client's background work, hosted by one task the client owns."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Literal

import anyio
import anyio.abc

from ._errors import ClientClosedError, unwrap_sora_errors

__all__ = ["Background"]

Starter = Callable[[anyio.abc.TaskGroup], object]


class Background:
    """A task group for the work that outlives each call (the create pool, the
    ledger's writes, each model's scheduler).

    It lives in a task of its own, so that the client may be entered and left from
    different tasks (pytest fixtures, server lifespans), and is cancelled and
    awaited when the client is left.
    """

    def __init__(self) -> None:
        self.state: Literal["new", "open", "closed"] = "new"
        self._host: asyncio.Task[None] | None = None
        self._group: anyio.abc.TaskGroup | None = None

    async def start(self, *starters: Starter) -> None:
        """Start the host task and each of ``starters`` in its group."""
        ready = asyncio.Event()

        async def host() -> None:
            async with anyio.create_task_group() as group:
                self._group = group
                for start in starters:
                    start(group)
                ready.set()

        self._host = asyncio.get_running_loop().create_task(host(), name="sora-async background")
        await ready.wait()
        self.state = "open"

    def check_open(self) -> anyio.abc.TaskGroup:
        """Return the group, or raise ClientClosedError when the client is not open
        or its background work stopped."""
        if self.state != "open" or self._group is None or self._host is None:
            raise ClientClosedError(
                "this SoraClient is not open: use it inside 'async with SoraClient(...)'"
            )
        if self._host.done():
            raise ClientClosedError("the client's background work stopped") from (
                self._host.exception() if not self._host.cancelled() else None
            )
        return self._group

    async def stop(self) -> None:
        """Cancel the background work and wait for it."""
        if self._host is not None:
            self._host.cancel()
            # Background work that failed (its task group wrapped the error) raises the
            # SoraError itself here, not an exception group.
            with contextlib.suppress(asyncio.CancelledError), unwrap_sora_errors():
                await self._host
