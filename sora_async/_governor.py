"""The concurrency governor: one API key's request budget and task slots.

The governor knows nothing of HTTP. The transport asks it for a permit before every
request and reports 429s and successes; the client takes a task slot before a
create and gives it back when the task is known to have ended.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, Protocol, runtime_checkable

import anyio

from ._errors import InputError
from ._models import Limits, TaskStatus
from ._priority import PRIORITIES, Priority, SlotLine, check_rules, rank_of

__all__ = [
    "SLOT_REFUSAL_WINDOW",
    "CreatePause",
    "Governor",
    "LocalGovernor",
    "RemembersGrants",
    "RequestKind",
    "RequestQueue",
    "TaskNews",
]

logger = logging.getLogger("sora_async")

# "confirm" is a status request checking a task a callback said had ended.
RequestKind = Literal["create", "confirm", "status", "balance"]

# Lower runs first: a create (which already holds a slot) never waits behind a poll.
_PRIORITY: dict[str, int] = {"create": 0, "confirm": 1, "balance": 2, "status": 3}
_MIN_WAIT = 1e-3
# AIMD after a 429: cut the rate by 30%, win it back 2.5% per `probe_after` successes,
# so that a steady neighbour on the key costs a 429 every few minutes, not every few seconds.
_RATE_DECREASE = 0.7
_RATE_INCREASE = 0.025
_MIN_RATE_FACTOR = 0.25
# A create 429 while our window is under this share of its limit is taken for a slot
# refusal (tasks we do not know hold slots), not for the rate.
SLOT_REFUSAL_WINDOW = 0.5
# A create probing for a slot after a refusal whose answer never came is given up after
# this long, and another probes.
_SLOT_PROBE_LOST = 120.0
# A learned jitter margin is the slowest answer of the last window plus this much: the
# event loop's own hops between a grant and the write are not in the measured time.
_MARGIN_SLACK = 0.05


class LatencyMargin:
    """The jitter margin a request budget needs, learned from how long requests take.

    A request's arrival at the service lags its grant by at most the time its answer
    took, so windows of ``period + margin`` over grant times keep every ``period``
    window of arrivals within the budget while ``margin`` exceeds the slowest answer
    among the requests a window can hold. The margin is the slowest answer seen in the
    last ``period + ceiling`` seconds plus a little slack, never above ``ceiling``, and
    ``ceiling`` itself until an answer is seen (or when none came in that time).
    """

    def __init__(self, period: float, ceiling: float) -> None:
        self.ceiling = ceiling
        self._horizon = period + ceiling
        # (when seen, seconds), the seconds falling: the head is the slowest in the horizon.
        self._slowest: collections.deque[tuple[float, float]] = collections.deque()

    def observe(self, now: float, seconds: float) -> None:
        """Learn one request's time from grant to answer (or failure)."""
        slowest = self._slowest
        while slowest and slowest[-1][1] <= seconds:
            slowest.pop()
        slowest.append((now, seconds))

    def at(self, now: float) -> float:
        """Return the margin in force at ``now``."""
        slowest = self._slowest
        while slowest and slowest[0][0] + self._horizon <= now:
            slowest.popleft()
        if not slowest:
            return self.ceiling
        return min(self.ceiling, slowest[0][1] + _MARGIN_SLACK)


class TaskNews(Protocol):
    """What a governor tells its client about tasks it learned of elsewhere."""

    def adopt(self, task_id: str, model: str) -> None:
        """Track a dead process's task to its end; its slot is already held for it."""

    def announce(
        self, status: TaskStatus, trusted: bool, nonce: str | None = None, seen: bool = False
    ) -> None:
        """Take news of a task that another process received (a callback, an adopted end;
        ``nonce``: the callback token's, checked against the task's own; ``seen``: an end
        the other process saw itself, by a poll or a claim it took, with no token)."""

    def hand_over(self, task_id: str, model: str) -> None:
        """Stop polling a task another process adopted (this one's lease had lapsed): its
        slot is theirs now, and its end comes as news."""


@runtime_checkable
class Governor(Protocol):
    """What the client needs from a governor (in process, or shared through Redis).

    Reports (429s, successes, slot changes) are plain calls: a shared governor
    applies them locally at once and carries them to the others in the background.
    """

    #: The key's nominal limits for the model(s) this governor serves.
    limits: Limits
    #: Whether the governor itself finds the tasks of dead processes and hands them
    #: to a live one (a client's store then leaves their adoption to it).
    adopts_orphans: bool

    async def request(self, kind: RequestKind, priority: Priority = "normal") -> None:
        """Wait until one request may be sent, and spend it (a create's ``priority``
        orders it among the creates waiting for a permit)."""

    def rate_limited(self, kind: RequestKind, retry_after: float | None) -> None:
        """Report a 429 for a request of ``kind``: pause everyone and shrink."""

    def request_succeeded(self, kind: RequestKind) -> None:
        """Report a request answered without a 429: probe back up."""

    def request_took(self, seconds: float) -> None:
        """Report how long a sent request took to be answered (or to fail)."""

    async def acquire_slot(self, priority: Priority = "normal") -> None:
        """Wait for a task slot: highest ``priority`` first, first come first served
        within one (see :mod:`sora_async._priority` for the reserve and starvation)."""

    def bind_slot(self, task_id: str, model: str, priority: Priority = "normal") -> None:
        """Record that a slot taken by this process (at ``priority``) is now held by
        task ``task_id``."""

    def release_slot(self, task_id: str | None = None, priority: Priority = "normal") -> None:
        """Give back the slot of ``task_id`` (it ended), or a slot with no task yet
        taken at ``priority``."""

    def release_slot_later(self, delay: float, priority: Priority = "normal") -> None:
        """Give back a slot with no task after ``delay`` seconds (an uncertain create)."""

    def share(
        self, status: TaskStatus, *, trusted: bool, nonce: str | None = None, seen: bool = False
    ) -> None:
        """Pass news of a task to the other processes that track it: a callback's claim
        (``nonce``: its token's) or an end this process ``seen`` itself."""

    @property
    def slots_in_use(self) -> int:
        """Return how many task slots are taken now."""

    @property
    def slot_limit(self) -> int:
        """Return how many task slots may be taken now (shrinks after 429s)."""

    @property
    def rate_factor(self) -> float:
        """Return the share of the nominal request rate in force (1.0 unless 429s were seen)."""

    def requests_in_window(self) -> int:
        """Return how many requests were sent in the last period."""

    @property
    def rate_limited_seen(self) -> int:
        """Return how many 429s were reported since the governor was made."""

    @property
    def slot_waiters(self) -> int:
        """Return how many creates wait for a task slot now."""

    def for_model(self, model: str, limits: Limits) -> Governor:
        """Return a new governor of this kind and with these settings for ``model``'s
        own budget (``limits``), apart from this one's (a client's other model lanes)."""

    async def run(self, news: TaskNews) -> None:
        """Do the governor's background work until cancelled (nothing, in process)."""

    async def aclose(self) -> None:
        """Cancel pending timers; waiters are not woken."""


@runtime_checkable
class RemembersGrants(Protocol):
    """A governor whose window of sends can outlive its process: it tells the times
    of its grants, and counts those of an earlier process on the key as its own.

    Times are the running loop's (``loop.time()``): whoever keeps them across processes
    converts them to and from wall-clock time.
    """

    @property
    def memory(self) -> float:
        """Return how many seconds of past grants the window needs to know."""

    def grants_since(self, count: int) -> tuple[int, list[float]]:
        """Return how many requests were granted in all, and the loop times of the
        grants after the first ``count`` that the window still counts, oldest first."""

    async def wait_grants(self, count: int) -> None:
        """Wait until more than ``count`` requests were granted in all."""

    def seed_grants(self, times: Iterable[float]) -> None:
        """Count requests sent at loop times ``times`` (by an earlier process on the key)
        in the window, as if this governor had granted them."""


class _Ticket:
    """A place in the request queue: by priority, then first come, first served."""

    __slots__ = ("order", "priority", "rank", "waker")

    def __init__(self, priority: int, rank: int, order: int) -> None:
        self.priority = priority  # of the request's kind
        self.rank = rank  # of the create's priority
        self.order = order
        self.waker: asyncio.Future[None] | None = None

    def __lt__(self, other: _Ticket) -> bool:
        return (self.priority, self.rank, self.order) < (other.priority, other.rank, other.order)


class RequestQueue:
    """The requests of one process in line: by kind (creates first), a create's
    priority, then first come.

    Only the head of the line tries for a permit; whoever is first after it leaves
    tries next. A governor supplies ``attempt``: spend a permit and return 0, or
    return how many seconds the head must still wait.
    """

    def __init__(self) -> None:
        self._line: list[_Ticket] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._line)

    async def serve(
        self,
        kind: RequestKind,
        attempt: Callable[[RequestKind], Awaitable[float]],
        rank: int = 1,
    ) -> None:
        """Wait for the head of the line, then until ``attempt`` grants a permit."""
        loop = asyncio.get_running_loop()
        ticket = _Ticket(_PRIORITY[kind], rank, next(self._order))
        heapq.heappush(self._line, ticket)
        try:
            while True:
                if self._line[0] is not ticket:
                    ticket.waker = loop.create_future()
                    await ticket.waker
                    continue
                delay = await attempt(kind)
                if delay <= 0:
                    # Not heappop: a create that came while the attempt awaited (Redis)
                    # may head the line now, and its ticket must stay.
                    self._leave(ticket)
                    return
                await asyncio.sleep(delay)
        except BaseException:
            self._leave(ticket)
            raise
        finally:
            # Whoever is first now computes its own wait.
            if self._line:
                head = self._line[0].waker
                if head is not None and not head.done():
                    head.set_result(None)

    def _leave(self, ticket: _Ticket) -> None:
        if self._line and self._line[0] is ticket:
            heapq.heappop(self._line)
        elif ticket in self._line:
            self._line.remove(ticket)
            heapq.heapify(self._line)


class Backoff:
    """The arithmetic of 429s that both governors share: how long to pause after one,
    and when enough successes have come to probe the rate and the slots back up."""

    def __init__(
        self, *, base: float, cap: float, probe_after: int, slots: int, seed: int | None
    ) -> None:
        self.random = random.Random(seed)
        self._base = base
        self._cap = cap
        self._probe_after = probe_after
        self._slots = slots
        self._consecutive_429 = 0
        self._successes = 0
        self._create_successes = 0
        # Slot refusals: in a row, one being retried, a slot we know of freed since it,
        # and whether each create success probes one slot further (see succeeded).
        self._refusals = 0
        self._refused = False
        self._freed_since = False
        self._ramping = False

    def pause(self, kind: RequestKind, retry_after: float | None) -> float:
        """Count a 429 and return how long every request must pause for it."""
        self._consecutive_429 += 1
        self._successes = 0
        if kind == "create":
            self._create_successes = 0
            self._ramping = False
        return self._delay(retry_after, self._consecutive_429, self._cap)

    def _delay(self, retry_after: float | None, count: int, cap: float) -> float:
        if retry_after is not None and retry_after >= 0:
            return retry_after
        ceiling = min(cap, self._base * 2.0 ** (count - 1))
        return ceiling * self.random.uniform(0.5, 1.0)

    def slot_refused(self, retry_after: float | None) -> float:
        """Count a create refused for slots; return how long until one create may probe."""
        self._refusals += 1
        self._refused, self._freed_since, self._ramping = True, False, False
        self._create_successes = 0
        return self.probe_delay(retry_after)

    def probe_delay(self, retry_after: float | None = None) -> float:
        """Return how long until a create may probe for a slot again (1, 2, 4... s with
        jitter, up to the cap: a steady neighbour costs about a refused create a minute)."""
        return self._delay(retry_after, max(1, self._refusals), self._cap)

    @property
    def ramping(self) -> bool:
        """Return whether each create success probes one slot further (see succeeded)."""
        return self._ramping

    def slot_freed(self) -> None:
        """Note that a slot we know of freed (one of our tasks ended)."""
        self._freed_since = True

    def succeeded(
        self, kind: RequestKind, *, rate_cut: bool, slots_cut: bool, probe: bool = False
    ) -> tuple[bool, bool]:
        """Count a success; return whether to raise the rate, and the slots, one step.

        Slots rise one step per ``slots`` create successes, or with every create success
        once a ``probe`` (a create let through a slot refusal's hold) went through while
        none of our tasks had ended: the tasks we did not know are leaving, so each
        success probes one slot further.
        """
        self._consecutive_429 = 0
        self._successes += 1
        rate_up = slots_up = False
        if self._successes >= self._probe_after and rate_cut:
            self._successes = 0
            rate_up = True
        if kind != "create":
            return rate_up, slots_up
        if self._refused and probe:
            self._refused = False
            self._ramping = not self._freed_since
        if self._ramping or not slots_cut:
            self._refusals = 0  # room we did not make ourselves: probe from the first step
        if not slots_cut:
            self._ramping = False
        elif self._ramping:
            slots_up = True
        else:
            self._create_successes += 1
            if self._create_successes >= self._slots:
                self._create_successes = 0
                slots_up = True
        return rate_up, slots_up


class CreatePause:
    """Hold creates back after a slot refusal, leaving polls free.

    A slot refusal says nothing about the rate, so only creates wait, and not in the
    request line (a create waiting at its head would hold every poll back too). While
    held, a create goes when a slot we know of frees (one per slot), or as the one
    probe once the back-off has passed; the others wait. A probe that finds room while
    none of our tasks ended (the tasks we did not know are leaving) ends the hold.
    """

    def __init__(self) -> None:
        self.held = False
        self._probe_at = 0.0
        self._out = 0  # creates let go and not yet answered
        self._out_at = 0.0  # when the last of them was let go
        self._passes = 0  # slots freed while held: one create each may go
        self._wakeable = True
        self._woken: asyncio.Event | None = None

    @property
    def probing(self) -> bool:
        """Return whether creates let through the hold await their answers."""
        return self.held and self._out > 0

    @property
    def stale(self) -> bool:
        """Return whether a refusal now is of a create sent before the hold began (it
        tells nothing new)."""
        return self.held and self._out == 0

    def refused(self, retry_at: float, *, wakeable: bool) -> None:
        """Hold creates after a refusal; ``retry_at``: when one may probe."""
        self._out = max(0, self._out - 1)
        self.held, self._probe_at, self._wakeable = True, retry_at, wakeable
        self._passes = 0  # the service is full again
        self._notify()

    def went_through(self, backoff: Backoff) -> None:
        """A create was taken: end the hold if ``backoff`` is ramping the slots back up,
        else let the next probe go after its probe delay."""
        if not self.held:
            return
        self._out = max(0, self._out - 1)
        if backoff.ramping:
            self.held = False
        else:
            retry_at = asyncio.get_running_loop().time() + backoff.probe_delay()
            self._probe_at = max(self._probe_at, retry_at)
        self._notify()

    def wake(self) -> None:
        """A slot we know of freed: one held create may go, unless the service named
        the time to come back."""
        if self.held and self._wakeable:
            self._passes += 1
            self._notify()

    def _notify(self) -> None:
        if self._woken is not None:
            self._woken.set()
            self._woken = None

    async def wait(self) -> None:
        """Return once a create may go."""
        loop = asyncio.get_running_loop()
        while self.held:
            now = loop.time()
            if self._out > 0 and now >= self._out_at + _SLOT_PROBE_LOST - _MIN_WAIT:
                self._out = 0  # its answer never came (cancelled, failed): probe anew
            if self._passes > 0 or (self._out == 0 and now >= self._probe_at - _MIN_WAIT):
                self._passes = max(0, self._passes - 1)
                self._out += 1
                self._out_at = now
                return
            if self._woken is None:
                self._woken = asyncio.Event()
            due = self._probe_at if self._out == 0 else self._out_at + _SLOT_PROBE_LOST
            with anyio.move_on_after(max(due - now, _MIN_WAIT)):
                await self._woken.wait()


class LocalGovernor:
    """Keep one process inside an API key's limits.

    The hard bound is a log of send times: no more than ``requests`` are sent in any
    window of ``period + margin`` seconds, so no ``period`` window of arrivals at the
    server holds more while network delays vary by less than the margin. With
    ``learn_margin`` (the default) the margin is learned from how long requests take
    (the slowest answer of the last window plus 50 ms, see LatencyMargin), never above
    ``jitter_margin``, which it is until answers are seen; without it the margin is
    ``jitter_margin``. Polls are also paced, one per ``(period + margin) /
    (requests - 1)`` seconds (longer while 429s cut the rate), so they never use the
    window up in a burst, and polls leave the last ``create_reserve``
    places of every window to creates and confirmations, which are not paced: a
    slot that frees is refilled at once, not a pacing step later. Waiters
    are served by priority (creates first), then first come, first served. After a
    429 every request pauses (``Retry-After``, else exponential back-off with jitter)
    and the rate and slot count shrink (multiplicative decrease), then probe back up
    with successes (additive increase).
    Creates wait for a slot by their priority (``"interactive"``, ``"normal"``,
    ``"batch"``), then first come, first served: creates below interactive leave the
    last ``reserved`` slots free, lent to them once no interactive create came for
    ``lend_after`` seconds (None: never), and a create that waited ``starve_after``
    seconds is served with the interactive ones (see :mod:`sora_async._priority`).

    Example::

        governor = sa.LocalGovernor(sa.Limits(requests=60, period=60, concurrent_tasks=10))
        async with sa.SoraClient(governor=governor) as client: ...
    """

    adopts_orphans = False

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        jitter_margin: float = 1.0,
        learn_margin: bool = True,
        create_reserve: int = 1,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        probe_after: int = 10,
        seed: int | None = None,
        reserved: int = 0,
        lend_after: float | None = 600.0,
        starve_after: float = 600.0,
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        if jitter_margin < 0:
            raise InputError("jitter_margin", "must be zero or more seconds")
        if not 0 <= create_reserve < self.limits.requests:
            raise InputError("create_reserve", "must be at least 0 and below limits.requests")
        self._reserve = create_reserve
        # What for_model() hands on to the governors of other models' budgets.
        self._settings: dict[str, Any] = {
            "jitter_margin": jitter_margin,
            "learn_margin": learn_margin,
            "backoff_base": backoff_base,
            "backoff_cap": backoff_cap,
            "probe_after": probe_after,
            "seed": seed,
            "reserved": reserved,
            "lend_after": lend_after,
            "starve_after": starve_after,
        }
        # The send log keeps what the widest window needs; each grant weighs the margin
        # in force then.
        self._longest_window = self.limits.period + jitter_margin
        self._margin = LatencyMargin(self.limits.period, jitter_margin) if learn_margin else None
        self._fixed_margin = jitter_margin
        self._backoff = Backoff(
            base=backoff_base,
            cap=backoff_cap,
            probe_after=probe_after,
            slots=self.limits.concurrent_tasks,
            seed=seed,
        )
        # Request side.
        self._queue = RequestQueue()
        self._sent: collections.deque[float] = collections.deque()  # within the window
        self._grants = 0  # granted in all (seeds not counted)
        self._granted = asyncio.Event()  # set at each grant (see wait_grants)
        self._last_poll: float | None = None
        self._not_before = 0.0
        self._rate_factor = 1.0
        self._rate_limited_seen = 0
        # Slot side.
        self._slot_limit = self.limits.concurrent_tasks
        self._in_use = 0
        self._bound = 0  # slots held by tasks (the rest: creates on their way)
        reserved, lend_after, starve_after = check_rules(
            reserved, lend_after, starve_after, self.limits.concurrent_tasks
        )
        self._slot_line = SlotLine(
            reserved=reserved, lend_after=lend_after, starve_after=starve_after
        )
        self._lend_timer: asyncio.TimerHandle | None = None
        self._held_by_rank = [0] * len(PRIORITIES)  # slots taken, by priority
        self._rank_of_task: dict[str, int] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._creates = CreatePause()

    # --- request budget ---------------------------------------------------------------

    @property
    def rate_factor(self) -> float:
        """Return the share of the nominal rate in force now (1.0 unless 429s were seen)."""
        return self._rate_factor

    def requests_in_window(self) -> int:
        """Return how many requests this governor granted in the last period."""
        since = asyncio.get_running_loop().time() - self.limits.period
        return sum(1 for sent in self._sent if sent > since)

    @property
    def rate_limited_seen(self) -> int:
        """Return how many 429s were reported since the governor was made."""
        return self._rate_limited_seen

    async def request(self, kind: RequestKind, priority: Priority = "normal") -> None:
        """Wait until one request of ``kind`` may be sent, and spend it."""
        if kind == "create":
            await self._creates.wait()
        # Nobody in line: the request is at its head, so try at once without a place
        # in the line (the usual case below the limits, and the cheapest).
        if self._queue or self._spend(kind) > 0:
            await self._queue.serve(kind, self._try_send, rank_of(priority))

    async def _try_send(self, kind: RequestKind) -> float:
        return self._spend(kind)

    def _spend(self, kind: RequestKind) -> float:
        """Spend a permit for ``kind`` and return 0, or return how long it must still wait."""
        now = asyncio.get_running_loop().time()
        paced = kind == "status"
        delay = self._delay(now, paced=paced)
        if delay <= 0:
            if paced:
                self._last_poll = now
            self._sent.append(now)
            self._grants += 1
            self._granted.set()
        return delay

    @property
    def memory(self) -> float:
        """Return how many seconds of past grants the window needs to know: the period
        plus the largest jitter margin."""
        return self._longest_window

    def grants_since(self, count: int) -> tuple[int, list[float]]:
        """Return how many requests were granted in all, and the loop times of the
        grants after the first ``count`` still in the window's log, oldest first.

        A client with a store keeps them there, so that a restart on the store waits
        for the window its predecessor spent (see :meth:`seed_grants`).
        """
        self._forget_sends(asyncio.get_running_loop().time())
        newer = min(self._grants - count, len(self._sent))
        return self._grants, list(itertools.islice(self._sent, len(self._sent) - newer, None))

    async def wait_grants(self, count: int) -> None:
        """Wait until more than ``count`` requests were granted in all."""
        while self._grants <= count:
            self._granted.clear()
            await self._granted.wait()

    def seed_grants(self, times: Iterable[float]) -> None:
        """Count requests sent at loop times ``times`` (by an earlier process on the key,
        read back from a store) in the window, as if granted here. A time still to come
        (a clock set back) counts as now; times out of the window are dropped."""
        now = asyncio.get_running_loop().time()
        seeded = [min(sent, now) for sent in times if sent + self._longest_window > now]
        if seeded:
            self._sent = collections.deque(sorted([*self._sent, *seeded]))

    @property
    def jitter_margin(self) -> float:
        """Return the jitter margin in force now, in seconds (learned, or as given)."""
        if self._margin is None:
            return self._fixed_margin
        return self._margin.at(asyncio.get_running_loop().time())

    def request_took(self, seconds: float) -> None:
        """Learn how long a sent request took to be answered (or to fail)."""
        if self._margin is not None:
            self._margin.observe(asyncio.get_running_loop().time(), seconds)

    def _delay(self, now: float, *, paced: bool) -> float:
        """Return how long the head of the queue must still wait (<= 0: go now)."""
        self._forget_sends(now)
        margin = self._fixed_margin if self._margin is None else self._margin.at(now)
        window = self.limits.period + margin
        wait = self._not_before - now
        limit = max(1, int(self.limits.requests * self._rate_factor))
        if paced:
            limit = max(1, limit - self._reserve)
        if len(self._sent) >= limit:
            # The send that must leave the window before one more may enter it.
            wait = max(wait, self._sent[len(self._sent) - limit] + window - now)
        if paced and self._last_poll is not None:
            step = window / (self.limits.requests - 1) / self._rate_factor
            wait = max(wait, self._last_poll + step - now)
        # A wake-up computed from floats may land a hair early: never re-arm closer.
        return max(wait, _MIN_WAIT) if wait > 0 else wait

    def _forget_sends(self, now: float) -> None:
        """Drop the sends older than the widest window from the log."""
        while self._sent and self._sent[0] + self._longest_window <= now:
            self._sent.popleft()

    def rate_limited(self, kind: RequestKind, retry_after: float | None) -> None:
        """Pause every request and shrink rate (and slots, for a create) after a 429.

        A create refused while our window is under half full most likely met tasks we
        do not know holding slots: then only the slot limit shrinks (to the tasks we
        hold) and only creates pause; the rate is left alone.
        """
        now = asyncio.get_running_loop().time()
        self._rate_limited_seen += 1
        limit = max(1, int(self.limits.requests * self._rate_factor))
        if kind == "create" and self.requests_in_window() < limit * SLOT_REFUSAL_WINDOW:
            # As many as the tasks we hold: refused creates hold slots too, and their
            # retries must not cut further.
            self._slot_limit = max(1, self._bound)
            if self._creates.stale:
                return
            pause = self._backoff.slot_refused(retry_after)
            self._creates.refused(now + pause, wakeable=retry_after is None)
            logger.warning(
                "429 on a create with the window far from full: tasks we do not know hold "
                "slots; a create probes again in %.1f s, slot limit %d, rate unchanged",
                pause,
                self._slot_limit,
            )
            return
        pause = self._backoff.pause(kind, retry_after)
        self._not_before = max(self._not_before, now + pause)
        self._rate_factor = max(_MIN_RATE_FACTOR, self._rate_factor * _RATE_DECREASE)
        if kind == "create":
            # The key holds fewer free slots than we thought: another program uses some.
            self._slot_limit = max(1, min(self._slot_limit, self._in_use) - 1)
        logger.warning(
            "429 on %s: pausing %.1f s, rate factor %.2f, slot limit %d",
            kind,
            pause,
            self._rate_factor,
            self._slot_limit,
        )

    def request_succeeded(self, kind: RequestKind) -> None:
        """Count a success; after enough of them, raise rate and slots one step."""
        rate_up, slots_up = self._backoff.succeeded(
            kind,
            rate_cut=self._rate_factor < 1.0,
            slots_cut=self._slot_limit < self.limits.concurrent_tasks,
            probe=self._creates.probing,
        )
        if rate_up:
            self._rate_factor = min(1.0, self._rate_factor + _RATE_INCREASE)
        if kind == "create":
            self._creates.went_through(self._backoff)
        nominal = self.limits.concurrent_tasks
        if kind == "create" and self._slot_limit < nominal:
            # The service took a task: the limit is at least the tasks we hold.
            held = self._bound + 1  # this one is bound once its id is read
            self._slot_limit = min(nominal, max(self._slot_limit, held) + slots_up)
            self._hand_on_slots()

    # --- task slots ---------------------------------------------------------------------

    @property
    def slots_in_use(self) -> int:
        """Return how many task slots are taken now."""
        return self._in_use

    @property
    def slot_limit(self) -> int:
        """Return how many slots may be taken now."""
        return self._slot_limit

    @property
    def slot_waiters(self) -> int:
        """Return how many creates wait for a task slot now."""
        return sum(self._slot_line.waiting().values())

    def slot_waiters_by_priority(self) -> dict[Priority, int]:
        """Return how many creates wait for a task slot now, by priority."""
        return self._slot_line.waiting()

    def slots_by_priority(self) -> dict[Priority, int]:
        """Return how many task slots are taken now, by the priority they were taken at."""
        return dict(zip(PRIORITIES, self._held_by_rank, strict=True))

    async def acquire_slot(self, priority: Priority = "normal") -> None:
        """Wait for a task slot: highest ``priority`` first, first come first served
        within one. Creates below ``interactive`` leave the last ``reserved`` slots
        free (lent to them after ``lend_after`` quiet seconds), and a create that
        waited ``starve_after`` seconds is served with the interactive ones."""
        rank = rank_of(priority)
        now = asyncio.get_running_loop().time()
        line = self._slot_line
        if rank == 0 or line.last_interactive == -math.inf:
            # The reserve holds from the first slot taken, as if a user had just come,
            # then from each interactive create.
            self._saw_interactive(now)
        if not line and line.has_room(rank, self._in_use, self._slot_limit, now):
            self._in_use += 1
            self._held_by_rank[rank] += 1
            return
        waiter = line.join(rank, now)
        # Those waiting may be held back by the reserve while this create may take it.
        self._hand_on_slots()
        try:
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self.release_slot(priority=priority)
            else:
                line.leave(waiter)
            raise

    def _saw_interactive(self, now: float) -> None:
        """An interactive create came: the reserve is back, until lent again."""
        line = self._slot_line
        line.last_interactive = now
        if self._lend_timer is not None:
            self._lend_timer.cancel()
            self._lend_timer = None
        lend_at = line.lent_until()
        if lend_at != float("inf"):
            # When the reserve is lent, the creates it held back take it.
            self._lend_timer = asyncio.get_running_loop().call_at(lend_at, self._hand_on_slots)

    def bind_slot(self, task_id: str, model: str, priority: Priority = "normal") -> None:
        """Count a slot as held by a task (a slot is a count here)."""
        self._bound += 1
        self._rank_of_task[task_id] = rank_of(priority)

    def release_slot(self, task_id: str | None = None, priority: Priority = "normal") -> None:
        """Give back a slot and hand it to the first waiter in line."""
        if self._in_use <= 0:
            raise RuntimeError("release_slot() called with no slot taken")
        self._in_use -= 1
        rank = self._rank_of_task.pop(task_id, None) if task_id is not None else None
        rank = rank_of(priority) if rank is None else rank
        self._held_by_rank[rank] = max(0, self._held_by_rank[rank] - 1)
        if task_id is not None and self._bound > 0:
            self._bound -= 1
        self._backoff.slot_freed()
        self._creates.wake()  # a create refused for slots may find this one
        self._hand_on_slots()

    def release_slot_later(self, delay: float, priority: Priority = "normal") -> None:
        """Give back a slot after ``delay`` seconds."""
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self.release_slot(priority=priority)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _hand_on_slots(self) -> None:
        now = asyncio.get_running_loop().time()
        while self._in_use < self._slot_limit:
            waiter = self._slot_line.next_up(self._in_use, self._slot_limit, now)
            if waiter is None:
                return
            self._in_use += 1
            self._held_by_rank[waiter.rank] += 1
            waiter.future.set_result(None)

    def for_model(self, model: str, limits: Limits) -> LocalGovernor:
        """Return a LocalGovernor for ``model``'s own ``limits`` with this one's settings
        (jitter margin, back-off, create reserve: at most ``limits.requests - 1``).

        Example::

            veo = governor.for_model("veo-3-1", sa.MODELS["veo-3-1"].limits)
        """
        reserve = min(self._reserve, limits.requests - 1)
        settings = dict(self._settings)
        settings["reserved"] = min(settings["reserved"], limits.concurrent_tasks - 1)
        return LocalGovernor(limits, create_reserve=reserve, **settings)

    def share(
        self, status: TaskStatus, *, trusted: bool, nonce: str | None = None, seen: bool = False
    ) -> None:
        """No other process to tell."""

    async def run(self, news: TaskNews) -> None:
        """Nothing runs in the background in one process: wait to be cancelled."""
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        """Cancel pending slot timers."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        if self._lend_timer is not None:
            self._lend_timer.cancel()
