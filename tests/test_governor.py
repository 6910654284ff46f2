"""The governor alone: the window bound, priority, FIFO slots and back-off, in virtual time."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Coroutine
from typing import Any

import looptime
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sora_async as sa
from sora_async._governor import RequestKind

pytestmark = pytest.mark.looptime


def run_virtual(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on a fresh event loop in virtual time (hypothesis tests are sync)."""
    loop = looptime.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def max_in_window(times: list[float], period: float) -> int:
    """Return the most grants that fall in any half-open window (t - period, t]."""
    ordered = sorted(times)
    return max(
        (i + 1 - bisect.bisect_right(ordered, t - period) for i, t in enumerate(ordered)),
        default=0,
    )


arrivals = st.lists(
    st.tuples(st.floats(0, 300, allow_nan=False), st.sampled_from(["create", "status", "balance"])),
    min_size=1,
    max_size=150,
)


@settings(max_examples=40, deadline=None)
@given(
    arrivals=arrivals,
    requests=st.integers(2, 60),
    period=st.sampled_from([1.0, 10.0, 60.0]),
)
def test_no_window_ever_holds_more_than_the_limit(
    arrivals: list[tuple[float, RequestKind]], requests: int, period: float
) -> None:
    """Whatever the arrival pattern, no window of `period` holds more than `requests` grants,
    even when each grant reaches the server up to the jitter margin late."""
    limits = sa.Limits(requests=requests, period=period)
    margin = 0.5

    async def scenario() -> list[float]:
        governor = sa.LocalGovernor(limits, jitter_margin=margin)
        loop = asyncio.get_running_loop()
        granted: list[float] = []

        async def caller(at: float, kind: RequestKind) -> None:
            await asyncio.sleep(at)
            await governor.request(kind)
            granted.append(loop.time())

        await asyncio.gather(*(caller(at, kind) for at, kind in arrivals))
        return granted

    granted = run_virtual(scenario())
    assert len(granted) == len(arrivals)
    assert max_in_window(granted, period) <= requests
    # The worst case of network jitter: every other request is delayed by the margin.
    skewed = [t + (margin if i % 2 else 0.0) for i, t in enumerate(sorted(granted))]
    assert max_in_window(skewed, period) <= requests


async def test_full_bucket_limiter_would_break_the_window() -> None:
    """The trap we avoid: AsyncLimiter(60, 60) admits far more than 60 in the first minute,
    while the governor admits at most 60 in any minute."""
    from aiolimiter import AsyncLimiter

    loop = asyncio.get_running_loop()
    naive = AsyncLimiter(60, 60)
    naive_times = []
    start = loop.time()
    while loop.time() - start < 60:
        await naive.acquire()
        naive_times.append(loop.time())
    governor = sa.LocalGovernor()
    ours = []
    start = loop.time()
    while loop.time() - start < 120:
        await governor.request("status")
        ours.append(loop.time())
    assert max_in_window(naive_times, 60.0) > 100
    assert max_in_window(ours, 60.0) <= 60
    assert len(ours) >= 110  # and it still uses nearly the whole budget


async def test_creates_go_before_queued_polls() -> None:
    """A create never waits behind polls already queued."""
    governor = sa.LocalGovernor(sa.Limits(requests=10, period=10.0))
    order: list[str] = []

    async def ask(kind: RequestKind, label: str) -> None:
        await governor.request(kind)
        order.append(label)

    await governor.request("status")  # the bucket is now empty: everyone queues
    polls = [asyncio.ensure_future(ask("status", f"poll{i}")) for i in range(5)]
    await asyncio.sleep(0)
    create = asyncio.ensure_future(ask("create", "create"))
    await asyncio.gather(*polls, create)
    assert order[0] == "create"
    assert order[1:] == [f"poll{i}" for i in range(5)]


async def test_slots_are_first_come_first_served() -> None:
    """Slot waiters are served in arrival order, and a cancelled waiter loses nothing."""
    governor = sa.LocalGovernor(sa.Limits(concurrent_tasks=2))
    await governor.acquire_slot()
    await governor.acquire_slot()
    served: list[int] = []

    async def wait_for_slot(index: int) -> None:
        await governor.acquire_slot()
        served.append(index)

    waiters = [asyncio.ensure_future(wait_for_slot(i)) for i in range(5)]
    await asyncio.sleep(1)
    waiters[1].cancel()
    for _ in range(4):
        governor.release_slot()
        await asyncio.sleep(1)
    assert served == [0, 2, 3, 4]
    assert governor.slots_in_use == 2
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_uncertain_hold_releases_later() -> None:
    """A slot held for an uncertain create comes back after the hold period."""
    governor = sa.LocalGovernor(sa.Limits(concurrent_tasks=1))
    await governor.acquire_slot()
    governor.release_slot_later(300)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await governor.acquire_slot()
    assert loop.time() - start == pytest.approx(300, abs=0.01)


async def test_429_pauses_everyone_and_shrinks_then_recovers() -> None:
    """After a 429 all requests wait out Retry-After; rate and slots shrink, then probe up."""
    governor = sa.LocalGovernor(sa.Limits(requests=60, period=60.0, concurrent_tasks=10))
    loop = asyncio.get_running_loop()
    for _ in range(6):
        await governor.acquire_slot()
    await governor.request("create")
    governor.rate_limited("create", 30.0)
    assert governor.slot_limit == 5  # the server refused a 7th task: 6 in use, minus one
    assert governor.rate_factor == pytest.approx(0.7)
    start = loop.time()
    await governor.request("status")
    assert loop.time() - start >= 30.0
    for _ in range(200):
        governor.request_succeeded("create")
    assert governor.rate_factor == 1.0
    assert governor.slot_limit == 10
