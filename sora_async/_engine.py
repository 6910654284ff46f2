"""The parts behind SoraClient, wired once, opened and closed together.

The client is the public front: its methods check their arguments, say what they do
in their docstrings and hand over to this engine, which owns the lanes (a governor and
a scheduler per model), the ledger (the task records), the transport, the creates,
the waits, the downloads and the background work that outlives each call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import anyio
import anyio.abc

from ._background import Background
from ._bodies import Bodies
from ._catalog import Request
from ._creates import Creator, TaskModels
from ._download import Downloader
from ._errors import ClientClosedError, InputError
from ._fanout import Outcome, fan_out
from ._governor import Governor
from ._lanes import Lanes
from ._ledger import Hooks, Ledger, Recorded
from ._models import CreateRequest, Limits, Result
from ._priority import Priority, rank_of
from ._recorder import Recorder
from ._scheduler import PollPolicy
from ._snapshot import Snapshot, model_snapshot, snapshot_of
from ._spending import Spending
from ._store import TaskStore, check_idempotency_key
from ._transport import RetryPolicy, Transport
from ._waits import Waits

__all__ = ["Engine", "Wiring"]


@dataclass(frozen=True)
class Wiring:
    """What the engine is built from: the client's settings, checked."""

    api_key: str
    base_url: str
    model: str
    provider: str
    default_governor: Governor
    governors: Mapping[str, Governor]
    model_limits: Mapping[str, Limits]
    shared_budget: bool
    retry: RetryPolicy
    poll_policy: PollPolicy | None
    callback_url: str | None
    callback_secret: str | None
    store: TaskStore | None
    on_uncertain: Literal["raise", "resubmit"]
    uncertain_hold: float
    download_concurrency: int
    max_download_bytes: int
    spending: Spending


class Engine:
    """The client's parts (see the module's docstring)."""

    def __init__(self, wiring: Wiring) -> None:
        self.wiring = wiring
        self.bodies = Bodies(
            wiring.model, wiring.provider, wiring.callback_url, wiring.callback_secret
        )
        self.lanes = Lanes(
            default_model=wiring.model,
            default_governor=wiring.default_governor,
            governors=wiring.governors,
            model_limits=wiring.model_limits,
            shared=wiring.shared_budget,
            poll=lambda model, task_id: self.transport.status(model, task_id, prepaid=True),
            policy=wiring.poll_policy,
            callbacks=wiring.callback_url is not None,
            uncertain_hold=wiring.uncertain_hold,
        )
        self.ledger = Ledger(wiring.store, self.lanes, uncertain_hold=wiring.uncertain_hold)
        self.transport = Transport(
            api_key=wiring.api_key,
            base_url=wiring.base_url,
            governor_for=self.lanes.governor_for,
            retry=wiring.retry,
        )
        self.background = Background()
        # The model of each task this client created (status and wait need it).
        self.models = TaskModels()
        self.downloader: Downloader | None = None
        self.waits = Waits(self.transport, self.lanes, self.ledger, self.models, wiring.model)
        self.creator = Creator(
            self.transport,
            self.lanes,
            self.ledger,
            self.models,
            on_uncertain=wiring.on_uncertain,
            uncertain_hold=wiring.uncertain_hold,
            budget=wiring.spending.budget,
            price_of=wiring.spending.high_price,
        )
        self.lanes.on_adopted = self._adopted

    def check_open(self) -> anyio.abc.TaskGroup:
        """Return the background group, or raise ClientClosedError."""
        return self.background.check_open()

    # --- life cycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Open the ledger and the connections, start the background work, apply
        ``keep_balance`` and adopt the tasks an earlier process left unfinished."""
        if self.background.state != "new":
            raise ClientClosedError("a SoraClient can be entered once; create a new one")
        await self.ledger.open()
        await self.transport.open()
        self.downloader = Downloader(
            self.transport.session,
            concurrency=self.wiring.download_concurrency,
            max_bytes=self.wiring.max_download_bytes,
        )
        await self.background.start(
            lambda group: group.start_soon(self.creator.pool.run),
            self.ledger.start,
            self.lanes.start,
        )
        try:
            await self.wiring.spending.keep(
                functools.partial(self.transport.balance, self.wiring.model)
            )
            await self.ledger.adopt_recorded(self.waits.adopt)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the background work and close everything, in the order that lets the
        ends already learned reach the store and the budget."""
        self.background.state = "closed"
        await self.ledger.settle()
        await self.background.stop()
        await self.lanes.aclose()
        await self.transport.close()
        await self.ledger.close()
        if self.creator.budget is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.creator.settled(), 10.0)
            await self.creator.budget.aclose()

    def _adopted(self, task_id: str, model: str) -> None:
        """A governor handed us a dead process's task: its record and its reservation
        are settled here when it ends."""
        self.waits.adopted_by_governor(task_id, model)
        self.creator.settle_at_end(task_id, model)

    # --- figures --------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every model's figures, with the spend cap's when there is one."""
        lanes = self.lanes.all()
        parts = [model_snapshot(lane.model, lane.governor, lane.scheduler) for lane in lanes]
        budget = self.creator.budget
        if budget is None:
            return snapshot_of(self.wiring.model, parts)
        return snapshot_of(self.wiring.model, parts, (*budget.seen(), budget.cap))

    def record(self, recorder: Recorder | None) -> None:
        """Send request and task events to ``recorder``."""
        self.transport.recorder = recorder
        self.lanes.record(recorder)
        self.creator.recorder = recorder

    async def spend(self) -> tuple[float, float, float | None]:
        """The spend so far, the estimates held and the cap (zeros and None uncapped)."""
        budget = self.creator.budget
        if budget is None:
            return 0.0, 0.0, None
        await self.creator.settled()
        spent, held = await budget.figures()
        return spent, held, budget.cap

    # --- tasks ----------------------------------------------------------------------------

    def check_submit(
        self, request: Request, idempotency_key: str | None, batch: str, priority: Priority
    ) -> tuple[tuple[str, CreateRequest], Governor, TaskStore | None]:
        """Check a submit's arguments before anything is awaited; return the prepared
        create, its model's governor and, with an idempotency key, the key's records."""
        self.check_open()
        prepared = self.bodies.prepare(request)
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        if not isinstance(batch, str) or len(batch) > 200:
            raise InputError("batch", "must be a string of at most 200 characters")
        rank_of(priority)
        governor = self.lanes.get(prepared[0]).governor
        return prepared, governor, self.ledger.records_for(idempotency_key)

    def submit_once(
        self,
        records: TaskStore,
        idempotency_key: str | None,
        batch: str,
        prepared: tuple[str, CreateRequest],
        hooks: Hooks | None,
        governor: Governor,
        priority: Priority,
    ) -> Awaitable[str]:
        """Return the ledger's submit under an idempotency key (one task per key).

        Not a coroutine of its own: a submit waiting for its slot keeps no frame more
        than it needs (100,000 of them may wait at once)."""
        return self.ledger.submit(
            records,
            idempotency_key,
            batch,
            prepared,
            hooks,
            functools.partial(self.create, priority=priority),
            functools.partial(governor.acquire_slot, priority),
        )

    async def create(
        self,
        prepared: tuple[str, CreateRequest],
        hooks: Hooks | None = None,
        recorded: Recorded | None = None,
        *,
        priority: Priority = "normal",
    ) -> str:
        """Create a task with a slot already taken (see Creator.create)."""
        self.check_open()
        return await self.creator.create(prepared, hooks, recorded, priority)

    def generate_many(
        self,
        requests: Iterable[Request] | AsyncIterable[Request],
        timeout: float | None,
        priority: Priority,
        wait_timeout: float,
    ) -> AsyncIterator[Outcome]:
        """Fan ``requests`` out, one per free slot of their model (see fan_out)."""
        rank_of(priority)

        async def run(prepared: tuple[str, CreateRequest]) -> Result:
            task_id = await self.create(prepared, priority=priority)
            self.check_open()
            return await self.waits.wait(task_id, timeout, None, wait_timeout)

        return fan_out(
            self.check_open(),
            requests,
            governor_for=lambda prepared: self.lanes.get(prepared[0]).governor,
            prepare=self.bodies.prepare,
            run=run,
            priority=priority,
        )
