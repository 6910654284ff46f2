"""The poll scheduler: one loop owns every in-flight task and spends polls wisely.

Ten tasks polled every 5 s would cost twice a key's whole budget, so polls are
scheduled, not slept. The scheduler learns how long generations take and spends
each spare request on the task most likely to have finished since it was last
seen. It knows nothing of aiohttp: it is handed a ``poll`` callable.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from ._errors import (
    AuthenticationError,
    NotFoundError,
    ProtocolError,
    SoraError,
    TaskAbandonedError,
    TaskTimeoutError,
)
from ._governor import Governor
from ._models import TaskStatus, check_count, check_positive
from ._pool import TaskPool
from ._recorder import Recorder
from ._times import GenerationTimes

__all__ = ["GenerationTimes", "PollPolicy", "PollScheduler"]

logger = logging.getLogger("sora_async")

# A status answer may lag the callback that announced the end: a refuted claim is
# checked once more, 2 s later (at once if another claim came while the answer was on
# its way). Refuted twice, the task's later claims are doubted (see announce).
_RECHECK_DELAY = 2.0
# A claim refuted twice is a forgery (someone holds the callback secret, or replays
# it): for this many seconds after one, the claims of every task without a callback
# token of its own (adopted ones) are doubted and their ends found by polls alone.
# Forgers then cost two requests per this period, not per task.
_DOUBT_PERIOD = 600.0
# A task another process took over is polled here this share of the prior generation
# time after it was last seen (120 s at the default 180 s), a slow safety net: the news
# of its end may be lost (a subscription dropped while it was published), and a paid
# result must not wait for max_task_age.
_HANDED_OVER_CHECK = 2.0 / 3.0
# A permit granted within this many seconds came at once: the candidate still stands.
_PERMIT_AT_ONCE = 1e-3
# After the governor refused a poll permit with an error, ask again this much later
# (a governor that fails at once must not be asked in a tight loop).
_NO_PERMIT_PAUSE = 1.0


@dataclass(frozen=True)
class PollPolicy:
    """How the scheduler spends polls.

    A task is polled only when the chance that it finished since it was last seen
    reaches ``min_hazard``, and never more often than ``max(min_interval,
    relative_interval * age)`` seconds; among such tasks each permit goes to the one
    whose unseen end has waited longest in expectation. The floor is low (1 s)
    because the best schedule for a tight distribution polls densely near its end.
    ``prior_mean`` and ``prior_sigma`` (of the log of the generation time) describe
    generation times before any is seen; ``prior_weight`` is how many observations
    the prior counts as; ``history`` how many finished tasks the model remembers;
    ``keep_results`` how many ended tasks' statuses stay retrievable by id. With
    callbacks on, the chance is weighed by the learned share of lost callbacks and
    the bar rises to ``min_hazard / loss`` (at most 0.5), so polling becomes a
    safety net.

    Patience is bounded: after ``patience`` answers in a row that make no sense
    (ProtocolError) a task ends with that error, and a task tracked for longer than
    ``max_task_age`` seconds ends with TaskAbandonedError. Either way its slot stays
    taken for the client's ``uncertain_hold`` (the task may still run), then frees.
    Raises InputError for a ``patience`` below 1 or a ``max_task_age`` not above 0.
    """

    min_hazard: float = 0.005
    min_interval: float = 1.0
    relative_interval: float = 0.005
    prior_mean: float = 180.0
    prior_sigma: float = 0.5
    prior_weight: float = 4.0
    history: int = 500
    keep_results: int = 10_000
    patience: int = 5
    # Several times the slowest generation the provider documents.
    max_task_age: float = 7200.0

    def __post_init__(self) -> None:
        check_count("poll_policy.patience", self.patience, 1)
        check_positive("poll_policy.max_task_age", self.max_task_age)


class _Tracked:
    """One in-flight task as the scheduler sees it."""

    __slots__ = (
        "done",
        "doubted",
        "handed_over",
        "holds_slot",
        "last_seen",
        "model",
        "nonce",
        "polling",
        "recheck_at",
        "reclaimed",
        "seen",
        "started",
        "strikes",
        "task_id",
        "urgent",
        "waiters",
    )

    def __init__(self, task_id: str, model: str, started: float, holds_slot: bool) -> None:
        self.task_id = task_id
        self.model = model
        self.started = started  # loop time the create returned (or adoption)
        self.last_seen = started  # loop time of the last status known not terminal
        self.holds_slot = holds_slot
        self.polling = False
        # Poll with the next request: "callback" (said it ended), "adopted" (unknown
        # age), or "recheck" (a callback said it ended, a status answer did not yet).
        self.urgent: str | None = None
        self.recheck_at = 0.0  # loop time a "recheck" is due
        self.reclaimed = False  # a claim of its end came while a poll was in flight
        # A claim of its end was refuted twice: later claims cost nothing, and it is
        # polled as if no callback would come.
        self.doubted = False
        # The nonce of the callback token its create sent (None: adopted, or made
        # without one): a claim of its end that carries another is refused for free.
        self.nonce: str | None = None
        # Another process adopted it and polls it: its end comes as news, never by a poll.
        self.handed_over = False
        self.strikes = 0  # answers in a row that made no sense
        # (model version, age, survival, its integral) at the last sighting, cached.
        self.seen: tuple[int, float, float, float] | None = None
        self.done: asyncio.Future[TaskStatus] = asyncio.get_running_loop().create_future()
        # Futures of callers in wait(), woken straight from done (one hop, not three).
        self.waiters: list[asyncio.Future[None]] = []

    def finish(self, status: TaskStatus | None, error: BaseException | None = None) -> None:
        """Set ``done`` (once) and wake every waiter."""
        if self.done.done():
            return
        if error is None:
            assert status is not None
            self.done.set_result(status)
        else:
            self.done.set_exception(error)
            self.done.exception()  # mark it retrieved: nobody may be waiting
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


Poll = Callable[[str, str], Awaitable[TaskStatus]]


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class PollScheduler:
    """Track in-flight tasks, poll them under the governor's budget, wake waiters.

    ``poll(model, task_id)`` must send one status request whose first attempt the
    scheduler has already paid for with ``governor.request("status")``.
    """

    def __init__(
        self,
        *,
        governor: Governor,
        poll: Poll,
        policy: PollPolicy | None = None,
        callbacks: bool = False,
        uncertain_hold: float = 600.0,
    ) -> None:
        self._governor = governor
        self.uncertain_hold = uncertain_hold
        self.callbacks = callbacks
        # Terminal news by source, to learn how often callbacks go missing.
        self._seen_by_callback = 0
        self._seen_by_poll = 0
        self._poll = poll
        self.policy = policy if policy is not None else PollPolicy()
        self.times = GenerationTimes(self.policy)
        self._active: dict[str, _Tracked] = {}
        self._earliest_start = math.inf  # no active task started earlier (a lower bound)
        self._finished: collections.OrderedDict[str, TaskStatus] = collections.OrderedDict()
        # Tasks given up (nonsense answers, too old), with the error their waiters got.
        self._given_up: collections.OrderedDict[str, SoraError] = collections.OrderedDict()
        self._group: anyio.abc.TaskGroup | None = None
        self._changed = asyncio.Event()
        self._fatal: BaseException | None = None
        self.polls = 0
        self.confirmations = 0  # the part of polls that checked a callback's claimed end
        self._doubt_until = -math.inf  # loop time until which unbound claims are doubted
        self.forged_claims = 0  # claims dropped for carrying another token than their task's
        self.settled = 0  # tasks seen to end, by poll or callback
        self.recorder: Recorder | None = None  # set by sora_async.otel.instrument()

    # --- what the client calls ------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Return how many tasks are tracked and not yet seen terminal."""
        return len(self._active)

    def track(
        self,
        task_id: str,
        model: str,
        *,
        holds_slot: bool,
        adopted: bool = False,
        nonce: str | None = None,
    ) -> None:
        """Start tracking a task: just created, or ``adopted`` from elsewhere (polled at once,
        since its age is unknown). ``nonce``: its create's callback token's (see announce)."""
        known = self._active.get(task_id)
        if known is not None and holds_slot and not known.holds_slot:
            # Tracked without a slot (a wait for a task made elsewhere, or one handed
            # over): the slot taken or adopted for it is its own from now on. Giving it
            # back would leave a running task with no slot, and the key one create over.
            known.holds_slot = True
            if known.handed_over:
                # Handed back (the process that took it over stopped): polled at once.
                known.handed_over = False
                known.urgent = "adopted"
                self._changed.set()
            return
        if self.is_tracked(task_id):
            if holds_slot:
                self._governor.release_slot(task_id)  # already accounted for
            return
        now = asyncio.get_running_loop().time()
        tracked = _Tracked(task_id, model, now, holds_slot)
        tracked.nonce = nonce
        if adopted:
            tracked.urgent = "adopted"
        self._active[task_id] = tracked
        self._earliest_start = min(self._earliest_start, now)
        self._changed.set()

    def hand_over(self, task_id: str) -> None:
        """Stop polling a task that another process took over with its slot: its waiters
        here still wake on the news of its end that the other process shares (and on a
        poll every two thirds of the prior generation time, should that news be lost)."""
        tracked = self._active.get(task_id)
        if tracked is not None:
            tracked.handed_over = True
            tracked.holds_slot = False
            tracked.last_seen = asyncio.get_running_loop().time()
            self._changed.set()

    def result(self, task_id: str) -> TaskStatus | None:
        """Return the terminal status of a task seen to end, if remembered."""
        return self._finished.get(task_id)

    @property
    def callback_loss(self) -> float:
        """Return the estimated share of tasks whose end no callback announces.

        1.0 without callbacks; with them, learned from how tasks were seen to end,
        starting from a prior of 10% weighted as ten tasks.
        """
        if not self.callbacks:
            return 1.0
        return (self._seen_by_poll + 1.0) / (self._seen_by_poll + self._seen_by_callback + 10.0)

    @property
    def doubting(self) -> bool:
        """Return whether claims are doubted now: a claim refuted twice (a forged
        callback) came less than ``_DOUBT_PERIOD`` seconds ago. Meanwhile no claim is
        confirmed, and every task is polled as if no callback would come, except tasks
        whose create sent a callback token of their own (only their token's claims count)."""
        return asyncio.get_running_loop().time() < self._doubt_until

    def given_up(self, task_id: str) -> SoraError | None:
        """Return the error a task was given up with (see PollPolicy), if remembered."""
        return self._given_up.get(task_id)

    def observe(self, status: TaskStatus) -> None:
        """Take news of a task from a poll or a user's status call."""
        tracked = self._active.get(status.task_id)
        if tracked is not None:
            self._observe(tracked, status, by_callback=tracked.urgent == "callback")

    def _observe(self, tracked: _Tracked, status: TaskStatus, *, by_callback: bool) -> None:
        tracked.strikes = 0
        if not status.terminal:
            tracked.last_seen = asyncio.get_running_loop().time()
            return
        if by_callback:
            self._seen_by_callback += 1
        else:
            self._seen_by_poll += 1
        self._settle(tracked, status)

    def announce(
        self,
        status: TaskStatus,
        *,
        trusted: bool,
        relayed: bool = False,
        nonce: str | None = None,
        seen: bool = False,
    ) -> bool:
        """Take a callback's news of a task; return whether the task is ours.

        ``nonce``: the one in the callback's verified token. A task whose create sent
        a token takes claims with that token's nonce alone: any other claim of its end
        (a forgery, even by someone who holds the callback secret) is dropped at no
        cost, and its own claims are confirmed even while claims are doubted.
        Tasks without one (adopted, or made by an older release) are judged as below.

        A trusted terminal status settles the task at once; an untrusted one only
        makes the task the next one polled, so a forged callback cannot end it. Claims
        for one task share one confirming status (at most one in flight); a claim the
        status refutes is checked once more (the status may lag), and a task whose
        claim was refuted twice gets no more confirmations: its end is found by polls,
        spent as if its callback were lost. A claim refuted twice also makes every
        task's claims doubted for ``_DOUBT_PERIOD`` seconds (see :attr:`doubting`). So
        any number of claims costs a running task at most two requests beyond its
        polls, all tasks together two per period, and a settled task none.
        ``relayed``: the news came from another process, which already shared it;
        ``seen``: that process saw the end itself (by a poll, or a claim it took), so no
        token comes with it.
        """
        tracked = self._active.get(status.task_id)
        if tracked is None:
            return status.task_id in self._finished or status.task_id in self._given_up
        if not status.terminal:
            return True
        bound = tracked.nonce is not None
        if (
            bound
            and not seen
            and (nonce is None or not hmac.compare_digest(nonce, tracked.nonce or ""))
        ):
            self.forged_claims += 1
            return True
        if trusted:
            self._seen_by_callback += 1
            self._settle(tracked, status, relayed=relayed)
        elif (
            tracked.doubted
            or (self.doubting and not bound)
            or tracked.urgent in ("callback", "recheck")
        ):
            pass  # refuted before, or a confirmation already waits: this one costs nothing
        elif tracked.polling:
            tracked.reclaimed = True  # the answer on its way may predate this end
        else:
            tracked.urgent = "callback"
            self._changed.set()
        return True

    async def wait(self, task_id: str, timeout: float | None) -> TaskStatus:
        """Wait for a tracked task's terminal status.

        Raises TaskTimeoutError after ``timeout`` seconds (None: no limit; tracking
        goes on), or the
        error that ended tracking (e.g. NotFoundError, AuthenticationError,
        ProtocolError, TaskAbandonedError), or the error the governor gave instead of
        a poll permit (RedisUnavailableError; tracking goes on).
        """
        finished = self._finished.get(task_id)
        if finished is not None:
            return finished
        given_up = self._given_up.get(task_id)
        if given_up is not None:
            raise given_up
        tracked = self._active.get(task_id)
        if tracked is None:
            raise KeyError(task_id)
        # A future of this caller's own: cancelling it or timing out must not end tracking.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        tracked.waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        except asyncio.TimeoutError:
            assert timeout is not None  # no deadline, no timeout
            raise TaskTimeoutError(task_id, timeout) from None
        finally:
            if timer is not None:
                timer.cancel()
            if not tracked.done.done():
                tracked.waiters.remove(waiter)
        return tracked.done.result()  # or the error that ended tracking

    def when_ended(
        self, task_id: str, callback: Callable[[asyncio.Future[TaskStatus]], None]
    ) -> None:
        """Call ``callback`` with the task's end (a status, or the error that ended
        tracking) as soon as it is known, before any waiter resumes. Raises KeyError
        for a task not in flight."""
        self._active[task_id].done.add_done_callback(callback)

    def is_tracked(self, task_id: str) -> bool:
        """Return whether the scheduler knows this task (running or remembered)."""
        return task_id in self._active or task_id in self._finished or task_id in self._given_up

    def _interrupt_waiters(self, error: SoraError) -> None:
        """Raise ``error`` in every caller waiting for a tracked task; tracking goes on."""
        for tracked in self._active.values():
            for waiter in tracked.waiters:
                if not waiter.done():
                    waiter.set_exception(error)

    def fail_all(self, error: BaseException) -> None:
        """End tracking of every task with ``error`` (e.g. the key was refused)."""
        self._fatal = error
        for tracked in list(self._active.values()):
            self._fail(tracked, error)
        self._changed.set()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll tracked tasks until cancelled."""
        loop = asyncio.get_running_loop()
        pool = TaskPool()  # one task per poll
        async with anyio.create_task_group() as polls:
            self._group = polls  # holds of given-up slots end with the loop
            polls.start_soon(pool.run)
            while self._fatal is None:
                expiry = self._expire(loop.time())
                candidate, wake_at = self._choose(loop.time())
                if expiry is not None:
                    wake_at = expiry if wake_at is None else min(wake_at, expiry)
                self._changed.clear()
                if candidate is None:
                    if wake_at is None:
                        await self._changed.wait()
                    else:
                        with anyio.move_on_after(max(wake_at - loop.time(), 1e-3)):
                            await self._changed.wait()
                    continue
                asked = loop.time()
                try:
                    await self._governor.request("confirm" if candidate.urgent else "status")
                except SoraError as exc:
                    # No permit could be had (a shared governor's Redis stayed down past
                    # its deadline): nothing is sent. The tasks still run on the service
                    # and stay tracked; their waiters hear why now, not at their own
                    # deadline, and polling goes on once permits come again.
                    logger.warning("no permit to poll: %s", exc)
                    self._interrupt_waiters(exc)
                    await asyncio.sleep(_NO_PERMIT_PAUSE)
                    continue
                # Things may have changed while we waited for the permit; a permit that
                # came at once, with no news since, leaves the choice as it was.
                chosen: _Tracked | None = candidate
                if self._changed.is_set() or loop.time() - asked > _PERMIT_AT_ONCE:
                    chosen, _ = self._choose(loop.time())
                if chosen is None:
                    chosen = candidate if candidate.task_id in self._active else None
                if chosen is None:
                    continue
                chosen.polling = True
                pool.start_soon(self._poll_one, chosen)
            pool.close()  # polls in flight end as they would

    def _expire(self, now: float) -> float | None:
        """Give up tasks tracked for longer than ``max_task_age``; return the next expiry."""
        max_age = self.policy.max_task_age
        if not self._active:
            return None
        if now < self._earliest_start + max_age:
            # No task is that old yet: skip the scan. The bound may be of a task gone
            # since, so the expiry returned may be early: that wake-up scans.
            return self._earliest_start + max_age
        next_expiry: float | None = None
        self._earliest_start = math.inf
        for tracked in list(self._active.values()):
            expiry = tracked.started + max_age
            if now < expiry or tracked.polling:  # a poll in flight may still end it
                next_expiry = expiry if next_expiry is None else min(next_expiry, expiry)
                self._earliest_start = min(self._earliest_start, tracked.started)
                continue
            logger.warning("task %s not finished after %g s: given up", tracked.task_id, max_age)
            self._give_up(tracked, TaskAbandonedError(tracked.task_id, max_age))
        return next_expiry

    def _choose(self, now: float) -> tuple[_Tracked | None, float | None]:
        """Return the task whose poll cuts expected detection delay most, or when one is due.

        A task is due when the chance that it ended unseen reaches the threshold;
        among due tasks, the permit goes to the one whose unseen end has waited
        longest in expectation (the delay a poll now ends). Spending every permit so
        keeps that accrued delay equal across tasks when they are polled, which is
        what the best schedule at the budget's price of a poll does.

        With callbacks, a task is unseen only if it ended and its callback was lost,
        so the chance is weighed by the learned loss rate: polling becomes a slow
        safety net where callbacks arrive, and speeds up where they go missing.
        """
        best: _Tracked | None = None
        best_delay = -1.0  # any eligible task beats none, even at an accrued delay of 0
        wake_at: float | None = None
        policy = self.policy
        task_loss = self.callback_loss
        # With callbacks a permit spent on a poll may delay a create or a confirmation
        # that a callback just asked for, so the bar rises as callbacks prove reliable.
        task_threshold = min(0.5, policy.min_hazard / task_loss)
        # Tasks never seen since their create (believed callbacks alike) differ only in
        # age, and both their eligibility and their accrued delay grow with age (so does
        # their due time with their start): the first one met, the oldest since tasks
        # are met in the order they started, outweighs all the others (ties go to the
        # first met). Weigh it alone (unless the floor grows faster than age: then the
        # order fails, and all are weighed).
        skip_unseen = False
        shortcut = policy.relative_interval <= 1.0
        doubting = now < self._doubt_until
        for tracked in self._active.values():
            if tracked.polling:
                continue
            if tracked.handed_over:
                due = tracked.last_seen + _HANDED_OVER_CHECK * policy.prior_mean
                if now >= due:
                    return tracked, now
                wake_at = due if wake_at is None else min(wake_at, due)
                continue
            if tracked.urgent == "recheck" and now < tracked.recheck_at:
                due = tracked.recheck_at
                wake_at = due if wake_at is None else min(wake_at, due)
                continue
            if tracked.urgent:
                return tracked, now
            doubted = tracked.doubted or (doubting and tracked.nonce is None)
            if shortcut and tracked.last_seen == tracked.started and not doubted:
                if skip_unseen:
                    continue
                skip_unseen = True
            age = now - tracked.started
            seen_age = tracked.last_seen - tracked.started
            floor = max(policy.min_interval, policy.relative_interval * age)
            earliest = tracked.last_seen + floor
            seen = tracked.seen
            if seen is None or seen[0] != self.times.version or seen[1] != seen_age:
                # Survival and its integral at the last sighting change only with it.
                seen = tracked.seen = (self.times.version, seen_age, *self.times.at(seen_age))
            survived, seen_area = seen[2], seen[3]
            alive, area = self.times.at(age)
            if doubted:  # its callbacks are not believed: polled as without them
                loss, threshold = 1.0, policy.min_hazard
            else:
                loss, threshold = task_loss, task_threshold
            ended_unseen = loss * (survived - alive)
            unseen = alive + ended_unseen
            hazard = 1.0 if unseen <= 0.0 else ended_unseen / unseen
            if hazard >= threshold and now >= earliest:
                # E[age - T; seen_age < T <= age] = integral of (S(seen_age) - S(t)) dt.
                waited = (age - seen_age) * survived - (area - seen_area)
                delay = loss * waited / unseen if unseen > 0.0 else age - seen_age
                if delay > best_delay:
                    best, best_delay = tracked, delay
                continue
            # The age at which the hazard reaches the threshold (solved for survival).
            target_survival = (
                loss * survived * (1 - threshold) / (threshold + loss * (1 - threshold))
            )
            due = max(earliest, tracked.started + self.times.age_at_survival(target_survival))
            wake_at = due if wake_at is None else min(wake_at, due)
        return best, wake_at

    async def _poll_one(self, tracked: _Tracked) -> None:
        self.polls += 1
        # Cleared before sending: a callback arriving while this answer is in flight
        # sets it again, since the answer may predate the end the callback announced.
        reason, tracked.urgent = tracked.urgent, None
        if reason in ("callback", "recheck"):
            self.confirmations += 1
        try:
            status = await self._poll(tracked.model, tracked.task_id)
        except AuthenticationError as exc:
            self.fail_all(exc)
            return
        except NotFoundError as exc:
            self._fail(tracked, exc)
            return
        except ProtocolError as exc:
            tracked.strikes += 1
            logger.warning(
                "poll of %s: nonsense answer %d in a row: %s",
                tracked.task_id,
                tracked.strikes,
                exc.problem,
            )
            if tracked.strikes >= self.policy.patience:
                self._give_up(tracked, exc)
                return
            self._try_again(tracked, reason)
            return
        except SoraError as exc:
            # A passing fault: try again after the floor interval (or at once, if a
            # callback is waiting to be confirmed).
            logger.warning("poll of %s failed: %s", tracked.task_id, exc)
            self._try_again(tracked, reason)
            return
        finally:
            tracked.polling = False
            self._changed.set()
        if tracked.task_id not in self._active:
            return
        reclaimed, tracked.reclaimed = tracked.reclaimed, False
        claimed = reclaimed or reason in ("callback", "recheck")
        self._observe(tracked, status, by_callback=claimed)
        if status.terminal or not claimed or tracked.urgent is not None:
            return
        if reason == "recheck":
            # Refuted twice: forged, or far ahead of the status. Polls find its end.
            tracked.doubted = True
            if tracked.nonce is not None:
                return  # its own token's claim: the status lags far behind, nothing forged
            if not self.doubting:
                logger.warning(
                    "task %s: a claimed end refuted twice (a forged callback?): every "
                    "claim without its task's own token doubted for %g s, ends found by polls",
                    tracked.task_id,
                    _DOUBT_PERIOD,
                )
            self._doubt_until = asyncio.get_running_loop().time() + _DOUBT_PERIOD
        elif reason == "callback":
            # The status may lag the callback: look once more, a little later (at once
            # if another claim came while this answer was on its way).
            tracked.urgent = "recheck"
            tracked.recheck_at = tracked.last_seen + (0.0 if reclaimed else _RECHECK_DELAY)
        else:
            # A normal poll's answer may predate the claim that came meanwhile: confirm it.
            tracked.urgent = "callback"

    def _try_again(self, tracked: _Tracked, reason: str | None) -> None:
        """After a failed poll: a confirmation asked for is asked again (at once)."""
        tracked.last_seen = asyncio.get_running_loop().time()
        if tracked.reclaimed and reason is None:
            reason = "callback"
        tracked.reclaimed = False
        tracked.urgent = tracked.urgent or reason

    def _settle(self, tracked: _Tracked, status: TaskStatus, *, relayed: bool = False) -> None:
        seconds = status.generation_seconds
        if seconds is not None:
            self.times.observe(seconds)
        self.settled += 1
        if self.recorder is not None:
            # The end as our clock places it: tracked at create, plus the generation.
            now = asyncio.get_running_loop().time()
            late = None if seconds is None else max(0.0, now - tracked.started - seconds)
            self.recorder.task_ended(
                tracked.model, status.state.value, status.fail_code, seconds, late
            )
        self._drop(tracked)
        self._finished[tracked.task_id] = status
        while len(self._finished) > self.policy.keep_results:
            self._finished.popitem(last=False)
        tracked.finish(status)
        if not relayed:
            # Processes sharing the key may also track it: one awaits it (a web worker
            # the GET reached), another holds its slot (the creator, or the adopter of a
            # dead process's task). Tell them all; a local governor tells nobody.
            self._governor.share(status, trusted=True, seen=True)
        self._changed.set()

    def _give_up(self, tracked: _Tracked, error: SoraError) -> None:
        """End tracking of a task whose end we may never learn; it may still run on the
        service, so its slot is freed only after ``uncertain_hold``."""
        self._fail(tracked, error, hold=self.uncertain_hold)
        self._given_up[tracked.task_id] = error
        while len(self._given_up) > self.policy.keep_results:
            self._given_up.popitem(last=False)
        self._changed.set()

    def _fail(self, tracked: _Tracked, error: BaseException, *, hold: float = 0.0) -> None:
        self._drop(tracked, hold=hold)
        tracked.finish(None, error)

    def _drop(self, tracked: _Tracked, *, hold: float = 0.0) -> None:
        if self._active.pop(tracked.task_id, None) is not None and tracked.holds_slot:
            tracked.holds_slot = False
            if hold > 0 and self._group is not None:
                self._group.start_soon(self._release_later, tracked.task_id, hold)
            else:
                self._governor.release_slot(tracked.task_id)

    async def _release_later(self, task_id: str, hold: float) -> None:
        # The slot stays bound to its task, which may still run, then frees like any.
        await asyncio.sleep(hold)
        self._governor.release_slot(task_id)
