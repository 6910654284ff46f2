"""How a client learns a task's end: one status request, a wait, an adopted task.

A task this client made or adopted is tracked by its model's scheduler, which polls
it within the key's budget (or hears of it by callback); a task made elsewhere is
looked up once, then tracked the same way without a slot. A task an earlier process
recorded as succeeded is answered from the store.
"""

from __future__ import annotations

import asyncio

import anyio

from ._catalog import check_model_id, model_info
from ._creates import TaskModels
from ._errors import (
    InputError,
    ProtocolError,
    TaskAbandonedError,
    TaskFailedError,
    TaskTimeoutError,
)
from ._lanes import Lanes
from ._ledger import Ledger
from ._models import Result, TaskState, TaskStatus, Video
from ._priority import ADOPTED
from ._store import RecordState
from ._transport import Transport

__all__ = ["Waits", "check_task_id", "check_timeout"]


class Waits:
    """Status, wait and adopt for one client (its transport, lanes, ledger, models)."""

    def __init__(
        self,
        transport: Transport,
        lanes: Lanes,
        ledger: Ledger,
        models: TaskModels,
        default_model: str,
    ) -> None:
        self._transport = transport
        self._lanes = lanes
        self._ledger = ledger
        self._models = models
        self._default_model = default_model

    def model_of_task(self, task_id: str, model: str | None) -> str:
        """Return ``model`` checked, else the model the task was made on, else the default."""
        if model is not None:
            return check_model_id(model)
        return self._models.get(task_id, self._default_model)

    async def status(self, task_id: str, model: str | None, timeout: float | None) -> TaskStatus:
        """Return the task's status now (see SoraClient.status)."""
        check_task_id(task_id)
        check_timeout(timeout)
        model = self.model_of_task(task_id, model)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        return await self._lookup(task_id, model, deadline, timeout)

    async def _lookup(
        self, task_id: str, model: str, deadline: float | None, timeout: float | None
    ) -> TaskStatus:
        """Ask the service for a task's status before loop time ``deadline``."""
        if deadline is None or timeout is None:
            status = await self._transport.status(model, task_id)
        else:
            left = deadline - asyncio.get_running_loop().time()
            with anyio.move_on_after(max(left, 0.0)) as scope:
                status = await self._transport.status(model, task_id)
            if scope.cancelled_caught:
                raise TaskTimeoutError(task_id, timeout)
        self._lanes.get(model).scheduler.observe(status)
        return status

    async def wait(
        self, task_id: str, timeout: float | None, model: str | None, default_timeout: float
    ) -> Result:
        """Wait for the task's end (see SoraClient.wait)."""
        check_task_id(task_id)
        check_timeout(timeout)
        total = default_timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + total
        if model is None and task_id not in self._models:
            # A task of an earlier process: the store knows its model, maybe its end.
            record = await self._ledger.find(task_id)
            if record is not None:
                if record.state is RecordState.SUCCEEDED:
                    ended = TaskStatus(
                        task_id=task_id,
                        state=TaskState.SUCCESS,
                        result_urls=tuple(record.result_urls),
                    )
                    return result_or_raise(ended, record.model)
                model = record.model
        model = self.model_of_task(task_id, model)
        return await self.wait_until(task_id, model, deadline, total)

    async def wait_until(self, task_id: str, model: str, deadline: float, timeout: float) -> Result:
        """Wait for the task's end until loop time ``deadline`` (``timeout`` names it)."""
        scheduler = self._lanes.get(model).scheduler
        if not scheduler.is_tracked(task_id):
            try:
                status: TaskStatus | None = await self._lookup(task_id, model, deadline, timeout)
            except ProtocolError:
                status = None  # the scheduler's patience decides, as for any task
            if status is not None and status.terminal:
                return result_or_raise(status, model)
            scheduler.track(task_id, model, holds_slot=False)
        left = max(deadline - asyncio.get_running_loop().time(), 0.0)
        try:
            ended = await scheduler.wait(task_id, left)
        except TaskTimeoutError as exc:
            if isinstance(exc, TaskAbandonedError):
                raise
            raise TaskTimeoutError(task_id, timeout) from None
        return result_or_raise(ended, model)

    async def adopt(self, task_id: str, model: str) -> bool:
        """Hold a slot for a task made elsewhere and poll it to its end; return False
        when it is tracked already."""
        lane = self._lanes.get(model)
        if lane.scheduler.is_tracked(task_id):
            return False
        await lane.governor.acquire_slot(ADOPTED)
        lane.governor.bind_slot(task_id, model, ADOPTED)
        self._models[task_id] = model
        lane.scheduler.track(task_id, model, holds_slot=True, adopted=True)
        return True

    def adopted_by_governor(self, task_id: str, model: str) -> None:
        """A governor handed us a dead process's task: write its end in its record."""
        self._models[task_id] = model
        self._ledger.adopted_by_governor(task_id)


def result_or_raise(status: TaskStatus, model: str) -> Result:
    """Return an ended task's result (a Video for a video model), or raise TaskFailedError."""
    if status.state is TaskState.SUCCESS:
        info = model_info(model)
        if info is not None and info.kind == "video":
            return Video.from_status(status, model)
        return Result.from_status(status, model)
    raise TaskFailedError(status.task_id, status.fail_code, status.fail_msg)


def check_timeout(timeout: object) -> None:
    """Raise InputError naming ``timeout`` unless it is None or seconds, zero or more."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise InputError("timeout", "must be a number of seconds, zero or more, or None")


def check_task_id(task_id: object) -> None:
    """Raise InputError naming ``task_id`` unless it is a non-empty string."""
    if not isinstance(task_id, str) or not task_id.strip():
        raise InputError("task_id", "must be a non-empty string")
