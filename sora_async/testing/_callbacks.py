"""Callback (webhook) delivery of the fake APIXO service: timers, retries, losses.

When a ``request_type=callback`` task ends on the server clock, the provider POSTs
the status envelope of that task to its ``callback_url``. The receiver must answer
HTTP 200 within ``callback_timeout`` seconds, or the POST is retried after each of
``callback_retry_delays``, then given up. Everything runs on the event loop clock
(``loop.call_later`` and ``asyncio.sleep``), so ``looptime`` fast-forwards it.

Knobs of :class:`FakeApixo` (keyword arguments and attributes, read when a task ends):

- ``callback_timeout=30.0``: seconds the receiver has to answer 200.
- ``callback_retry_delays=(5.0, 15.0, 45.0)``: waits before each retry.
- ``callback_loss=0.0``: probability a task's callback is silently never sent.
- ``callback_delay=0.0``: fixed seconds from the task's end to the first POST.
- ``callback_jitter=0.0``: plus uniform 0..jitter seconds (reorders deliveries).
- ``callback_duplicates=0.0``: probability a delivered callback is POSTed once
  more, 1-10 s later (a single attempt, not retried).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Protocol

import aiohttp

from ._http import envelope_body
from ._state import Stats, TaskRecord

__all__ = ["CallbackOwner", "CallbackSender", "check_callback_knobs"]

#: Seconds between a delivered callback and its duplicate: uniform in this span.
DUPLICATE_GAP = (1.0, 10.0)
_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)


class CallbackOwner(Protocol):
    """What the sender reads from the fake: its knobs (live), counters and clock."""

    callback_timeout: float
    callback_retry_delays: tuple[float, ...]
    callback_loss: float
    callback_delay: float
    callback_jitter: float
    callback_duplicates: float
    stats: Stats

    @property
    def origin(self) -> str:
        """Return ``http://host:port`` of the fake (result URLs point there)."""

    def now(self) -> float:
        """Return server seconds since start."""


def check_callback_knobs(
    timeout: float, retry_delays: Sequence[float], loss: float, duplicates: float
) -> tuple[float, ...]:
    """Check the callback timeout, retry delays and probabilities; return the delays.

    Raises:
        ValueError: a timeout that is not positive, a negative retry delay, or a
            probability outside ``[0, 1]``.
    """
    if timeout <= 0:
        raise ValueError("callback_timeout must be > 0")
    if not (0.0 <= loss <= 1.0 and 0.0 <= duplicates <= 1.0):
        raise ValueError("callback_loss and callback_duplicates must be in [0, 1]")
    delays = tuple(float(d) for d in retry_delays)
    if any(d < 0 for d in delays):
        raise ValueError("callback_retry_delays must be >= 0")
    return delays


class CallbackSender:
    """Deliver the callbacks of one fake: one timer per task until it ends, then a task.

    A task's timer fires at its ``complete_at`` (re-armed by :meth:`schedule` when
    the end moves). At that moment the sender draws, from its own seeded generator
    and always in the same number, whether the callback is lost, its jitter and
    whether it will be duplicated; the knobs are read then, so changes at run time
    apply to tasks that end afterwards.
    """

    def __init__(self, owner: CallbackOwner, seed: int) -> None:
        """Make an idle sender for ``owner``; nothing is sent until :meth:`start`."""
        self._owner = owner
        self._rng = random.Random(f"callbacks-{seed}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Open the HTTP session used for deliveries, in the running loop."""
        self._loop = asyncio.get_running_loop()
        # Deadlines are kept with asyncio.wait_for (exact loop time), not aiohttp's.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        """Cancel every pending delivery, wait for them to stop, close the session."""
        session, self._session = self._session, None  # from now on, schedule() is a no-op
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if session is not None:
            await session.close()

    def schedule(self, record: TaskRecord) -> None:
        """Arm, or re-arm, the delivery of ``record``'s callback for its ``complete_at``."""
        loop = self._loop
        if record.request_type != "callback" or not record.callback_url:
            return
        if loop is None or self._session is None:
            return  # not started, or closed: nothing is sent
        old = self._timers.pop(record.task_id, None)
        if old is not None:
            old.cancel()
        delay = max(0.0, record.complete_at - self._owner.now())
        self._timers[record.task_id] = loop.call_later(delay, self._due, record)

    def _due(self, record: TaskRecord) -> None:
        """Start delivering at the task's end, unless the callback is lost."""
        self._timers.pop(record.task_id, None)
        owner, loop = self._owner, self._loop
        # Always four draws, so the knobs never shift the random sequence.
        lost, jitter, duplicate, gap = (self._rng.random() for _ in range(4))
        if loop is None or lost < owner.callback_loss:
            owner.stats.callbacks_lost += 1
            return
        wait = owner.callback_delay + jitter * owner.callback_jitter
        low, high = DUPLICATE_GAP
        again = low + gap * (high - low) if duplicate < owner.callback_duplicates else None
        task = loop.create_task(self._deliver(record, wait, again))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, record: TaskRecord, wait: float, again: float | None) -> None:
        """Try, retry after each delay, give up; then maybe send a duplicate."""
        if wait > 0:
            await asyncio.sleep(wait)
        delays = self._owner.callback_retry_delays
        delivered = await self._attempt(record)
        for delay in delays:
            if delivered:
                break
            await asyncio.sleep(delay)
            delivered = await self._attempt(record)
        if not delivered:
            self._owner.stats.callbacks_lost += 1
            return
        if again is not None:
            await asyncio.sleep(again)
            self._owner.stats.callbacks_duplicated += 1
            await self._attempt(record)

    def body(self, record: TaskRecord) -> bytes:
        """Return the status envelope of a task that has ended, as the status endpoint sends it."""
        owner = self._owner
        moment = max(owner.now(), record.complete_at)  # float rounding: the end has come
        data = record.status_data(moment, f"{owner.origin}/files")
        return envelope_body(200, "success", data)

    async def _attempt(self, record: TaskRecord) -> bool:
        """POST the callback once; count it; tell whether the receiver answered 200."""
        owner, stats = self._owner, self._owner.stats
        url = record.callback_url or ""
        stats.callbacks_attempted += 1
        try:
            status: int | None = await self.post(url, self.body(record), owner.callback_timeout)
        except _FAILURES:
            status = None
        if status != 200:
            stats.callbacks_failed_attempts += 1
            return False
        stats.callbacks_delivered += 1
        if record.first_seen_done_at is None:
            record.first_seen_done_at = max(owner.now(), record.complete_at)
        return True

    async def post(self, url: str, body: bytes, timeout: float) -> int:
        """POST ``body`` as JSON to ``url``; return the HTTP status.

        Raises:
            RuntimeError: the sender is not started (or closed).
            asyncio.TimeoutError: no full answer within ``timeout`` seconds.
            aiohttp.ClientError, OSError: the request failed.
        """
        session = self._session
        if session is None:
            raise RuntimeError("FakeApixo is not started")

        async def send() -> int:
            headers = {"Content-Type": "application/json"}
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                return response.status

        return await asyncio.wait_for(send(), timeout)
