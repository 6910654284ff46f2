"""The governor alone: the window bound, priority, FIFO slots and back-off.

The shared suite runs against both governors: LocalGovernor in virtual time, and
RedisGovernor against a real redis-server in real time (Redis keeps the clock), with
the same compressed limits.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import looptime
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import sora_async as sa
from sora_async._governor import Governor, RequestKind, RequestQueue
from sora_async._models import TaskStatus
from sora_async.testing import RedisServer

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
# Two grants exactly one window apart, the earlier one delayed by the whole margin: the
# bound holds for delays that vary by less than the margin, not by exactly as much.
@example(
    arrivals=[(0.0, "status")] * 3 + [(31.0, "create"), (4.3515625, "create")],
    requests=3,
    period=60.0,
)
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
    # The worst case of network jitter: every other request is delayed by (almost) the
    # margin; the governor promises the bound for delays that vary by less than it.
    skewed = [t + (0.999 * margin if i % 2 else 0.0) for i, t in enumerate(sorted(granted))]
    assert max_in_window(skewed, period) <= requests


@settings(deadline=None, max_examples=60)
@example(  # the first arrives late, the last at once: the margin learned must cover it
    arrivals=[(0.0, "create"), (0.0, "create"), (0.9, "create")],
    delays=[(0.45, 0.01), (0.2, 0.01)] + [(0.0, 0.0)] * 148,
    requests=2,
    period=1.0,
)
@example(  # the same before any answer came: the margin is the ceiling
    arrivals=[(0.0, "create")] * 3,
    delays=[(0.45, 0.6), (0.2, 0.9)] + [(0.0, 0.0)] * 148,
    requests=2,
    period=1.0,
)
@given(
    arrivals=arrivals,
    delays=st.lists(
        st.tuples(st.floats(0.0, 0.499), st.floats(0.0, 0.499)), min_size=150, max_size=150
    ),
    requests=st.integers(2, 60),
    period=st.sampled_from([1.0, 10.0, 60.0]),
)
def test_a_learned_margin_keeps_every_window_of_arrivals_within_the_limit(
    arrivals: list[tuple[float, RequestKind]],
    delays: list[tuple[float, float]],
    requests: int,
    period: float,
) -> None:
    """Requests that take any time to reach the server (below the 0.5-s ceiling) and any
    time to be answered, the governor learning its margin from those answers: no window
    of `period` at the server ever holds more than `requests` arrivals."""
    limits = sa.Limits(requests=requests, period=period)

    async def scenario() -> list[float]:
        governor = sa.LocalGovernor(limits, jitter_margin=0.5)
        loop = asyncio.get_running_loop()
        reached: list[float] = []

        async def caller(at: float, kind: RequestKind, there: float, back: float) -> None:
            await asyncio.sleep(at)
            await governor.request(kind)
            await asyncio.sleep(there)
            reached.append(loop.time())
            await asyncio.sleep(back)
            governor.request_took(there + back)

        await asyncio.gather(
            *(caller(at, kind, *delay) for (at, kind), delay in zip(arrivals, delays, strict=False))
        )
        return reached

    reached = run_virtual(scenario())
    assert len(reached) == len(arrivals)
    assert max_in_window(reached, period) <= requests


async def test_a_learned_margin_spends_more_of_the_budget() -> None:
    """Answers in 10 ms: the margin falls from the 1-s ceiling to 60 ms, so a steady
    stream of polls gets more grants in ten minutes than with the fixed margin, and
    still no 60-s window of arrivals holds more than 60."""
    loop = asyncio.get_running_loop()

    async def polls_in_ten_minutes(governor: sa.LocalGovernor) -> list[float]:
        reached = []
        start = loop.time()
        while loop.time() - start < 600:
            await governor.request("status")
            await asyncio.sleep(0.005)
            reached.append(loop.time())
            await asyncio.sleep(0.005)
            governor.request_took(0.01)
        return reached

    learned = sa.LocalGovernor()
    assert learned.jitter_margin == 1.0  # nothing seen yet: the ceiling
    with_learning = await polls_in_ten_minutes(learned)
    assert learned.jitter_margin == pytest.approx(0.06)
    fixed = await polls_in_ten_minutes(sa.LocalGovernor(learn_margin=False))
    assert len(with_learning) >= len(fixed) + 8
    assert max_in_window(with_learning, 60.0) <= 60


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


class NoNews:
    """A client that tracks nothing: the governor's news goes nowhere."""

    def adopt(self, task_id: str, model: str) -> None:
        """Ignore an adopted task."""

    def announce(
        self, status: TaskStatus, trusted: bool, nonce: str | None = None, seen: bool = False
    ) -> None:
        """Ignore shared news."""

    def hand_over(self, task_id: str, model: str) -> None:
        """Ignore a task another process took over."""


MakeGovernor = Callable[..., Governor]


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.looptime(False))])
async def make_governor(request: pytest.FixtureRequest) -> AsyncIterator[MakeGovernor]:
    """Build governors of one kind, their background work running; a Redis one on a fresh key."""
    started: list[tuple[Governor, asyncio.Task[None]]] = []
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")

    def make(limits: sa.Limits, *, jitter_margin: float = 0.2, **options: Any) -> Governor:
        governor: Governor
        if server is None:
            governor = sa.LocalGovernor(limits, jitter_margin=jitter_margin, **options)
        else:
            governor = sa.RedisGovernor(
                server.url,
                api_key=secrets.token_hex(8),
                limits=limits,
                jitter_margin=jitter_margin,
                lease=1.0,
                trust_empty_redis=True,  # a fresh key in every test
                **options,
            )
        started.append((governor, asyncio.ensure_future(governor.run(NoNews()))))
        return governor

    yield make
    for governor, background in started:
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
        await governor.aclose()


async def test_window_bound_holds_under_a_burst(make_governor: MakeGovernor) -> None:
    """Thirty requests of every kind arriving in bursts: no 1-s window holds more than 10
    grants, even when every other grant reaches the server (almost) the margin late."""
    margin = 0.2
    governor = make_governor(sa.Limits(requests=10, period=1.0), jitter_margin=margin)
    loop = asyncio.get_running_loop()
    chance = random.Random(7)
    kinds: list[RequestKind] = ["create", "status", "status", "confirm", "balance"]
    granted: list[float] = []

    async def caller(at: float, kind: RequestKind) -> None:
        await asyncio.sleep(at)
        await governor.request(kind)
        granted.append(loop.time())

    await asyncio.gather(
        *(caller(chance.choice([0.0, 0.25, 1.25]), chance.choice(kinds)) for _ in range(30))
    )
    assert len(granted) == 30
    assert max_in_window(granted, 1.0) <= 10
    skewed = [t + (0.999 * margin if i % 2 else 0.0) for i, t in enumerate(sorted(granted))]
    assert max_in_window(skewed, 1.0) <= 10


async def test_creates_go_before_queued_polls(make_governor: MakeGovernor) -> None:
    """A create never waits behind polls already queued."""
    governor = make_governor(sa.Limits(requests=10, period=2.0))
    order: list[str] = []

    async def ask(kind: RequestKind, label: str) -> None:
        await governor.request(kind)
        order.append(label)

    await governor.request("status")  # polls are paced now: everyone queues
    polls = [asyncio.ensure_future(ask("status", f"poll{i}")) for i in range(5)]
    await asyncio.sleep(0)
    create = asyncio.ensure_future(ask("create", "create"))
    await asyncio.gather(*polls, create)
    assert order[0] == "create"
    assert order[1:] == [f"poll{i}" for i in range(5)]


async def test_cancelled_permit_waits_give_their_places_back(make_governor: MakeGovernor) -> None:
    """Polls whose callers gave up (a deadline) leave the line at once: a poll asked after
    twenty of them were cancelled waits one pacing step, not behind their places."""
    governor = make_governor(sa.Limits(requests=10, period=2.0))
    loop = asyncio.get_running_loop()
    step = 2.2 / 9  # (period + margin) / (requests - 1)
    await governor.request("status")  # polls are paced now: the next ones queue
    for _ in range(4):
        waiters = [asyncio.ensure_future(governor.request("status")) for _ in range(5)]
        await asyncio.sleep(0.05)  # the head has asked for its permit (in Redis: its ticket)
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    await asyncio.sleep(step)
    start = loop.time()
    await governor.request("status")
    assert loop.time() - start < 2 * step


async def test_slots_are_first_come_first_served(make_governor: MakeGovernor) -> None:
    """Slot waiters are served in arrival order, and a cancelled waiter loses nothing."""
    governor = make_governor(sa.Limits(concurrent_tasks=2))
    await governor.acquire_slot()
    await governor.acquire_slot()
    served: list[int] = []

    async def wait_for_slot(index: int) -> None:
        await governor.acquire_slot()
        served.append(index)

    waiters = []
    for index in range(5):
        waiters.append(asyncio.ensure_future(wait_for_slot(index)))
        await asyncio.sleep(0.05)  # a definite order of arrival
    await asyncio.sleep(0.3)
    waiters[1].cancel()
    for _ in range(4):
        governor.release_slot()
        await asyncio.sleep(0.3)
    assert served == [0, 2, 3, 4]
    assert governor.slots_in_use == 2
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_uncertain_hold_releases_later(make_governor: MakeGovernor) -> None:
    """A slot held for an uncertain create comes back after the hold period, not before."""
    governor = make_governor(sa.Limits(concurrent_tasks=1))
    await governor.acquire_slot()
    governor.release_slot_later(1.5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await governor.acquire_slot()
    assert loop.time() - start == pytest.approx(1.5, abs=0.25)


async def test_a_bound_slot_is_released_by_its_task(make_governor: MakeGovernor) -> None:
    """A slot bound to a task is freed when that task ends, not by another task's end."""
    governor = make_governor(sa.Limits(concurrent_tasks=2))
    await governor.acquire_slot()
    governor.bind_slot("task_a", "sora-2-pro")
    await governor.acquire_slot()
    governor.bind_slot("task_b", "sora-2-pro")
    governor.release_slot("task_a")
    await asyncio.wait_for(governor.acquire_slot(), 2.0)
    await asyncio.sleep(0.2)
    assert governor.slots_in_use == 2


async def test_429_pauses_everyone_and_shrinks_then_recovers(make_governor: MakeGovernor) -> None:
    """After a 429 on a create with the window nearly full, all requests wait out
    Retry-After; rate and slots shrink, then probe up."""
    governor = make_governor(sa.Limits(requests=20, period=60.0, concurrent_tasks=10))
    loop = asyncio.get_running_loop()
    for _ in range(6):
        await governor.acquire_slot()
    for _ in range(12):  # over half the window: the 429 may be the rate's
        await governor.request("create")
    governor.rate_limited("create", 1.0)
    await asyncio.sleep(0.2)  # a shared governor carries the report to Redis
    assert governor.slot_limit == 5  # the server refused a 7th task: 6 in use, minus one
    assert governor.rate_factor == pytest.approx(0.7)
    start = loop.time()
    await governor.request("create")
    assert loop.time() - start >= 0.75
    for _ in range(200):
        governor.request_succeeded("create")
    await asyncio.sleep(0.2)
    assert governor.rate_factor == 1.0
    assert governor.slot_limit == 10


async def test_a_create_refused_with_the_window_far_from_full_cuts_slots_not_rate(
    make_governor: MakeGovernor,
) -> None:
    """A create 429 while the window is far from full means tasks we do not know hold
    slots: the slot limit falls to the tasks we hold, the rate factor stays 1.0, polls
    do not pause, and creates wait for a slot of ours to free (one create per slot)."""
    governor = make_governor(sa.Limits(requests=60, period=60.0, concurrent_tasks=10))
    loop = asyncio.get_running_loop()
    for number in range(4):
        await governor.acquire_slot()
        governor.bind_slot(f"task_{number}", "sora-2-pro")
    await governor.acquire_slot()  # a fifth create, refused
    await governor.request("create")
    governor.rate_limited("create", None)
    governor.rate_limited("create", None)  # a retry's refusal cuts no further
    await asyncio.sleep(0.2)
    assert (governor.slot_limit, governor.rate_factor) == (4, 1.0)
    start = loop.time()
    await governor.request("status")
    assert loop.time() - start < 0.5  # polls go on
    retry = asyncio.ensure_future(governor.request("create"))
    await asyncio.sleep(0.3)
    assert not retry.done()  # the create waits: the service has no room
    governor.release_slot("task_0")  # one of ours ended: its slot is free on the service
    await asyncio.wait_for(retry, 5.0)
    governor.request_succeeded("create")
    governor.bind_slot("task_4", "sora-2-pro")
    await asyncio.sleep(0.2)
    assert (governor.slot_limit, governor.rate_factor) == (4, 1.0)


async def test_a_create_finds_room_while_polls_use_the_budget() -> None:
    """Polls leave a place in the window: a create behind a saturating poller goes at once."""
    governor = sa.LocalGovernor()
    loop = asyncio.get_running_loop()

    async def poller() -> None:
        while True:
            await governor.request("status")

    polls = asyncio.ensure_future(poller())
    waits = []
    for _ in range(5):
        await asyncio.sleep(37.3)  # well inside a saturated window
        start = loop.time()
        await governor.request("create")
        waits.append(loop.time() - start)
    polls.cancel()
    await asyncio.gather(polls, return_exceptions=True)
    assert waits == [0.0] * 5


async def test_a_create_arriving_during_a_polls_permit_call_is_served_next() -> None:
    """A permit call that awaits (the Redis governor's script) lets a create join the
    line meanwhile; when the poll is granted the create is next, and the line empties
    (the poll once took the create's place in line with it, and later callers hung)."""
    queue = RequestQueue()
    poll_granted = asyncio.Event()
    attempts: list[RequestKind] = []

    async def attempt(kind: RequestKind) -> float:
        attempts.append(kind)
        if kind == "status":
            await poll_granted.wait()  # a round trip to Redis, during which a create comes
        if kind == "create" and attempts.count("create") == 1:
            return 0.5  # the window is full for a moment: the create waits in line
        return 0.0

    poll = asyncio.ensure_future(queue.serve("status", attempt))
    await asyncio.sleep(0)
    create = asyncio.ensure_future(queue.serve("create", attempt))
    await asyncio.sleep(0)
    poll_granted.set()
    await asyncio.wait_for(asyncio.gather(poll, create), 1.0)
    later = [asyncio.ensure_future(queue.serve("status", attempt)) for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*later), 1.0)
    assert len(queue) == 0
    assert attempts.count("create") == 2
