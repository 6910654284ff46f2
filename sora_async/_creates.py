"""The create of one task: a slot already taken, the request sent, the task tracked.

A create runs in a task of the client's own (its pool), not in its caller's: a
caller that stops waiting leaves the create to its end, so a task made for it is
still tracked, recorded and never made twice.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import Callable
from typing import Any, Literal

from ._budget import Budget
from ._callback_tokens import nonce_in
from ._errors import NotFoundError, SoraError, SubmitUncertainError
from ._lanes import Lanes
from ._ledger import Hooks, Ledger, NotSent, Recorded, note
from ._models import CreateRequest, TaskState, TaskStatus
from ._pool import TaskPool
from ._priority import Priority
from ._recorder import Recorder
from ._store import RecordState
from ._transport import Transport

__all__ = ["Creator", "TaskModels"]

logger = logging.getLogger("sora_async")


class TaskModels(collections.OrderedDict[str, str]):
    """The model of each task a client made or adopted, for its status and wait: the
    newest ``keep`` of them, so that a batch of millions costs no memory per task."""

    def __init__(self, keep: int = 100_000) -> None:
        super().__init__()
        self.keep = keep

    def __setitem__(self, task_id: str, model: str) -> None:
        super().__setitem__(task_id, model)
        if len(self) > self.keep:
            self.popitem(last=False)


class Creator:
    """Send creates for a client: ``models`` learns each new task's model."""

    def __init__(
        self,
        transport: Transport,
        lanes: Lanes,
        ledger: Ledger,
        models: TaskModels,
        *,
        on_uncertain: Literal["raise", "resubmit"],
        uncertain_hold: float,
        budget: Budget | None = None,
        price_of: Callable[[str, Any], float] | None = None,
    ) -> None:
        self._transport = transport
        # The spend cap: each create reserves its high estimate (price_of) first.
        self.budget = budget
        self._price_of = price_of
        self._lanes = lanes
        self._ledger = ledger
        self._models = models
        self.on_uncertain = on_uncertain
        self.uncertain_hold = uncertain_hold
        self._pool = TaskPool()  # one task per create, owned by the client's task group
        self._settling: set[asyncio.Task[None]] = set()  # budget settlements under way
        self.recorder: Recorder | None = None  # set by sora_async.otel.instrument()

    @property
    def pool(self) -> TaskPool:
        """Return the pool the creates run in (the client's task group runs it)."""
        return self._pool

    async def create(
        self,
        prepared: tuple[str, CreateRequest],
        hooks: Hooks | None = None,
        recorded: Recorded | None = None,
        priority: Priority = "normal",
    ) -> str:
        """Create a task with a slot already taken; the slot is accounted for either way.

        The create runs in the client's task group (the pool): a caller cancelled while it
        is in flight stops waiting, but the create runs to its end, so a task made
        for it is still tracked (its slot kept), recorded, and never made twice.
        ``hooks`` (and the record) hear of each send: see Hooks.
        """
        created: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if recorded is not None:
            self._ledger.creating(recorded[1].key, created)
            hooks = hooks if hooks is not None else Hooks(None, None)
            hooks.recorded = recorded
        self._pool.start_soon(self._create_detached, prepared, created, recorded, hooks, priority)
        try:
            if recorded is None:
                # Nobody else awaits this future, so no shield: a caller cancelled
                # cancels it, and the create goes on all the same (_create_detached).
                return await created
            return await asyncio.shield(created)
        except asyncio.CancelledError:
            created.add_done_callback(log_orphan)  # its caller will never hear of it
            raise

    async def _create_detached(
        self,
        prepared: tuple[str, CreateRequest],
        created: asyncio.Future[str],
        recorded: Recorded | None,
        hooks: Hooks | None,
        priority: Priority,
    ) -> None:
        model, body = prepared
        lane = self._lanes.get(model)
        # A caller's idempotency key promises one task: never resubmit under it.
        resubmit = self.on_uncertain == "resubmit" and self._ledger.may_resubmit(recorded)
        reservation = None
        try:
            reservation = await self._reserve(model, body)
        except SoraError as exc:
            lane.governor.release_slot(priority=priority)
            if not created.cancelled():
                created.set_exception(exc)
            return
        try:
            while True:
                try:
                    # The record turns submitting in hooks.sending(): once the permit
                    # is granted, just before the send, never while a slot, a permit
                    # or a back-off is awaited.
                    task_id = await self._transport.create(
                        model, body, hooks=hooks, priority=priority
                    )
                except NotSent as stopped:
                    lane.governor.release_slot(priority=priority)
                    await self._settle(reservation, paid=False)
                    if not created.cancelled():
                        created.set_exception(stopped.error)
                    return
                except SubmitUncertainError as exc:
                    # The task may exist and hold a slot on the server for a while.
                    lane.governor.release_slot_later(self.uncertain_hold, priority)
                    if not resubmit:
                        await note(recorded, RecordState.UNCERTAIN, error=str(exc))
                        raise
                    logger.warning("create uncertain; resubmitting (on_uncertain='resubmit')")
                    await lane.governor.acquire_slot(priority)
                    continue
                except SoraError as exc:
                    lane.governor.release_slot(priority=priority)
                    await self._settle(reservation, paid=False)  # no task: nothing billed
                    await note(recorded, RecordState.REFUSED, error=str(exc))
                    raise
                except BaseException:
                    lane.governor.release_slot(priority=priority)
                    raise
                lane.governor.bind_slot(task_id, model, priority)
                nonce = nonce_in(body.callback_url)
                lane.scheduler.track(task_id, model, holds_slot=True, nonce=nonce)
                if reservation is not None:
                    await self.bind(reservation, task_id, model)
                self._models[task_id] = model
                await self._ledger.created(recorded, task_id)
                if created.cancelled():  # its caller stopped waiting (see create)
                    log_orphan_id(task_id)
                else:
                    created.set_result(task_id)
                return
        except SoraError as exc:
            if not created.cancelled():
                created.set_exception(exc)
        except BaseException:
            created.cancel()
            raise

    async def _reserve(self, model: str, body: CreateRequest) -> str | None:
        """Reserve the create's high estimate against the cap; return its token (None
        without a cap). Raises InputError for a model without a price, and
        BudgetExceededError when the cap would be passed: nothing is sent."""
        if self.budget is None or self._price_of is None:
            return None
        usd = self._price_of(model, body.input)
        token = f"create:{secrets.token_hex(12)}"
        await self.budget.reserve(token, usd)
        return token

    async def _settle(self, key: str | None, *, paid: bool) -> None:
        if key is not None and self.budget is not None:
            try:
                await self.budget.settle(key, paid)
            except SoraError as exc:  # held on: the cap stays on the safe side
                logger.error("spend cap: a create's reservation was not given back: %s", exc)

    async def _settle_end(self, budget: Budget, task_id: str, model: str, paid: bool) -> None:
        usd = await budget.settle(task_id, paid)
        if paid and usd and self.recorder is not None:
            self.recorder.spent(model, usd)

    async def bind(self, token: str, task_id: str, model: str) -> None:
        """Move a create's reservation to its task, settled when the task ends. A
        failure leaves it held under the create's token (never lose the task id)."""
        assert self.budget is not None
        try:
            await self.budget.bind(token, task_id)
        except SoraError as exc:
            logger.error("spend cap: task %s keeps its reservation for good: %s", task_id, exc)
            return
        self.settle_at_end(task_id, model)

    def settle_at_end(self, task_id: str, model: str) -> None:
        """Settle the task's reservation when its scheduler learns its end: spend if it
        succeeded, given back if it failed or is unknown to the service; kept while
        its end is not known (it may still be billed)."""
        budget = self.budget
        if budget is None:
            return

        def ended(done: asyncio.Future[TaskStatus]) -> None:
            if done.cancelled():
                return
            error = done.exception()
            if error is None:
                paid = done.result().state is TaskState.SUCCESS
            elif isinstance(error, NotFoundError):
                paid = False
            else:
                return
            settle = self._settle_end(budget, task_id, model, paid)
            settling = asyncio.get_running_loop().create_task(settle)
            self._settling.add(settling)
            settling.add_done_callback(self._settled)

        scheduler = self._lanes.get(model).scheduler
        if scheduler.is_tracked(task_id):
            scheduler.when_ended(task_id, ended)

    async def settled(self) -> None:
        """Let the settlements of ends already learned reach the budget."""
        if self._settling:
            await asyncio.wait(set(self._settling))

    def _settled(self, settling: asyncio.Task[None]) -> None:
        self._settling.discard(settling)
        if not settling.cancelled() and settling.exception() is not None:
            logger.error("spend cap: a task's end was not settled: %s", settling.exception())


def log_orphan(created: asyncio.Future[str]) -> None:
    """Name a task made for a caller that stopped waiting (its deadline passed)."""
    if not created.cancelled() and created.exception() is None:
        log_orphan_id(created.result())


def log_orphan_id(task_id: str) -> None:
    logger.warning(
        "task %s was created after its caller stopped waiting; it is tracked to its end", task_id
    )
