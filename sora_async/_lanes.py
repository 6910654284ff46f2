"""One lane per model: its governor (the (key, model) budget) and its scheduler.

Models have their own limits and their own generation times (a 20-s image and a
3-min video must not share one distribution), so each model a client uses gets a
scheduler of its own and, by default, a governor of its own built from the
model's limits by the default model's governor (``Governor.for_model``: a governor
of the same kind and settings, so that a client on Redis has every model on Redis).
Several models may share one governor: then they share its budget and slots, and
the governor runs once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio.abc

from ._catalog import limits_for, model_info
from ._governor import Governor
from ._models import Limits, TaskStatus
from ._recorder import Recorder
from ._scheduler import PollPolicy, PollScheduler

__all__ = ["Lane", "Lanes"]

Poll = Callable[[str, str], Awaitable[TaskStatus]]


@dataclass(frozen=True)
class Lane:
    """The governor and scheduler that serve one model."""

    model: str
    governor: Governor
    scheduler: PollScheduler


class Lanes:
    """Make, start and find the lane of each model a client uses."""

    def __init__(
        self,
        *,
        default_model: str,
        default_governor: Governor,
        governors: Mapping[str, Governor],
        model_limits: Mapping[str, Limits],
        shared: bool,
        poll: Poll,
        policy: PollPolicy | None,
        callbacks: bool,
        uncertain_hold: float,
    ) -> None:
        self._default_model = default_model
        self._governors = dict(governors)
        self._governors.setdefault(default_model, default_governor)
        self._model_limits = dict(model_limits)
        self._shared = shared
        self._poll = poll
        self._policy = policy
        self._callbacks = callbacks
        self._uncertain_hold = uncertain_hold
        self._lanes: dict[str, Lane] = {}
        self._started: list[Governor] = []  # governors whose run() is started
        self._group: anyio.abc.TaskGroup | None = None
        self._recorder: Recorder | None = None
        #: Told of each task a governor hands over from a dead process (task id, model).
        self.on_adopted: Callable[[str, str], None] | None = None
        #: Told of each governor as it starts, before its first request (the model of
        #: the first lane it serves, the governor, the task group it runs in).
        self.on_governor: Callable[[str, Governor, anyio.abc.TaskGroup], None] | None = None
        self.default = self.get(default_model)

    def governor_for(self, model: str) -> Governor:
        """Return the governor of ``model``: the one given for it, else the default
        model's when shared, else one made on first use by the default model's
        governor for ``model``'s own limits (same kind, same settings)."""
        governor = self._governors.get(model)
        if governor is None:
            default = self._governors[self._default_model]
            if self._shared:
                governor = default
            else:
                governor = default.for_model(model, limits_for(model, self._model_limits))
            self._governors[model] = governor
        return governor

    def get(self, model: str) -> Lane:
        """Return the lane of ``model``, made (and started, if running) on first use."""
        lane = self._lanes.get(model)
        if lane is None:
            governor = self.governor_for(model)
            lane = Lane(
                model,
                governor,
                PollScheduler(
                    governor=governor,
                    poll=self._poll,
                    policy=self._policy_for(model),
                    callbacks=self._callbacks,
                    uncertain_hold=self._uncertain_hold,
                ),
            )
            lane.scheduler.recorder = self._recorder
            self._lanes[model] = lane
            if self._group is not None:
                self._start(lane, self._group)
        return lane

    def _policy_for(self, model: str) -> PollPolicy:
        if self._policy is not None:
            return self._policy
        info = model_info(model)
        # The prior of a model's generation times: its table row, else Sora's.
        if info is None:
            return PollPolicy()
        return dataclasses.replace(PollPolicy(), prior_mean=info.mean_seconds)

    def start(self, group: anyio.abc.TaskGroup) -> None:
        """Run every lane's scheduler (and each governor once) in ``group``."""
        self._group = group
        for lane in list(self._lanes.values()):
            self._start(lane, group)

    def _start(self, lane: Lane, group: anyio.abc.TaskGroup) -> None:
        group.start_soon(lane.scheduler.run)
        if not any(governor is lane.governor for governor in self._started):
            self._started.append(lane.governor)
            if self.on_governor is not None:
                self.on_governor(lane.model, lane.governor, group)
            group.start_soon(lane.governor.run, _News(self))

    def record(self, recorder: Recorder | None) -> None:
        """Send every scheduler's task ends, now and later, to ``recorder``."""
        self._recorder = recorder
        for lane in self._lanes.values():
            lane.scheduler.recorder = recorder

    def all(self) -> list[Lane]:
        """Return every lane made so far."""
        return list(self._lanes.values())

    def tracking(self, task_id: str) -> Lane | None:
        """Return the lane that tracks ``task_id``, if any."""
        for lane in self._lanes.values():
            if lane.scheduler.is_tracked(task_id):
                return lane
        return None

    def announce(
        self,
        status: TaskStatus,
        *,
        trusted: bool,
        relayed: bool = False,
        nonce: str | None = None,
        seen: bool = False,
    ) -> bool:
        """Hand news of a task's end to the lane tracking it; return whether one did."""
        lane = self.tracking(status.task_id)
        if lane is None:
            return False
        return lane.scheduler.announce(
            status, trusted=trusted, relayed=relayed, nonce=nonce, seen=seen
        )

    async def aclose(self) -> None:
        """Close each governor once."""
        closed: list[Governor] = []
        for governor in self._governors.values():
            if not any(governor is done for done in closed):
                closed.append(governor)
                await governor.aclose()


class _News:
    """Hand what a governor learns from other processes to the lane of the task's model."""

    def __init__(self, lanes: Lanes) -> None:
        self._lanes = lanes

    def adopt(self, task_id: str, model: str) -> None:
        self._lanes.get(model).scheduler.track(task_id, model, holds_slot=True, adopted=True)
        if self._lanes.on_adopted is not None:
            self._lanes.on_adopted(task_id, model)

    def announce(
        self, status: TaskStatus, trusted: bool, nonce: str | None = None, seen: bool = False
    ) -> None:
        self._lanes.announce(status, trusted=trusted, relayed=True, nonce=nonce, seen=seen)

    def hand_over(self, task_id: str, model: str) -> None:
        self._lanes.get(model).scheduler.hand_over(task_id)
