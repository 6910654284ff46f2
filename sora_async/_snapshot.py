"""What an operator sees: the figures of a client's governors and schedulers at one instant."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ._governor import Governor
from ._scheduler import PollScheduler

__all__ = ["ModelSnapshot", "Snapshot", "model_snapshot", "snapshot_of"]


class ModelSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One model's figures: its governor's budget and slots, its scheduler's tasks.

    For a :class:`RedisGovernor` the governor's figures are the key's, summed over
    every process sharing it, as last read from Redis.
    """

    #: The model id.
    model: str
    #: Task slots taken now, and how many may be taken now (shrinks after 429s on creates).
    slots_in_use: int
    slot_limit: int
    #: Requests granted in the last window, and the nominal limit of a window.
    requests_in_window: int
    request_limit: int
    #: Share of the nominal request rate in force (1.0 unless 429s were seen).
    rate_factor: float
    #: 429s reported since the governor was made.
    rate_limited: int
    #: Creates waiting for a task slot now.
    slot_waiters: int
    #: Tasks this client tracks that are not yet seen to end.
    tasks_in_flight: int
    #: Tasks seen to end, and the status polls spent on them (per finished task).
    tasks_finished: int
    polls: int
    polls_per_finished: float
    #: The learned generation time: mean and 90th percentile, in seconds.
    generation_mean: float
    generation_p90: float
    #: Estimated share of task ends that no callback announces, learned from how tasks
    #: were seen to end; None for a client without callbacks (no ``callback_url``).
    callback_loss: float | None
    #: This process's creates waiting for a task slot now, and its slots taken, by
    #: priority ("interactive", "normal", "batch").
    slot_waiters_by_priority: dict[str, int] = msgspec.field(default_factory=dict)
    slots_by_priority: dict[str, int] = msgspec.field(default_factory=dict)


class Snapshot(ModelSnapshot, frozen=True, kw_only=True):
    """A client's figures at one instant: its default model's, and every model's.

    The top-level fields are the default ``model``'s; ``models`` holds one
    :class:`ModelSnapshot` per model the client used (the default one included).
    Encode it with ``msgspec.json.encode(snapshot)``.

    Example::

        snapshot = client.snapshot()
        print(snapshot.slots_in_use, "/", snapshot.slot_limit, snapshot.rate_limited)
    """

    models: dict[str, ModelSnapshot]
    #: With a spend cap (USD): the spend of tasks that succeeded, the estimates held by
    #: tasks in flight (for a budget on Redis, every process's, as last read), the cap.
    spent_usd: float = 0.0
    held_usd: float = 0.0
    spend_cap: float | None = None


def model_snapshot(model: str, governor: Governor, scheduler: PollScheduler) -> ModelSnapshot:
    """Read one model's figures from its governor and scheduler."""
    finished = scheduler.settled
    # Not in the Governor protocol: a governor of a user's own may not know them.
    by_priority = getattr(governor, "slot_waiters_by_priority", None)
    held_by = getattr(governor, "slots_by_priority", None)
    return ModelSnapshot(
        model=model,
        slots_in_use=governor.slots_in_use,
        slot_limit=governor.slot_limit,
        requests_in_window=governor.requests_in_window(),
        request_limit=governor.limits.requests,
        rate_factor=governor.rate_factor,
        rate_limited=governor.rate_limited_seen,
        slot_waiters=governor.slot_waiters,
        tasks_in_flight=scheduler.in_flight,
        tasks_finished=finished,
        polls=scheduler.polls,
        polls_per_finished=scheduler.polls / finished if finished else 0.0,
        generation_mean=scheduler.times.mean,
        generation_p90=scheduler.times.age_at_survival(0.1),
        callback_loss=scheduler.callback_loss if scheduler.callbacks else None,
        slot_waiters_by_priority=dict(by_priority()) if by_priority is not None else {},
        slots_by_priority=dict(held_by()) if held_by is not None else {},
    )


def snapshot_of(
    default: str,
    parts: Sequence[ModelSnapshot],
    spend: tuple[float, float, float | None] = (0.0, 0.0, None),
) -> Snapshot:
    """Combine the models' figures into one snapshot headed by the ``default`` model's,
    with the spend cap's figures (spent, held, cap)."""
    models = {part.model: part for part in parts}
    head = models[default]
    fields = {name: getattr(head, name) for name in head.__struct_fields__}
    spent, held, cap = spend
    return Snapshot(**fields, models=models, spent_usd=spent, held_usd=held, spend_cap=cap)
