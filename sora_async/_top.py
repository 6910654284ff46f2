"""What ``sora-async top`` shows of the ledger: a key's tasks, by batch and for the rest.

Every client on the key's :class:`RedisStore` records its tasks there (a service's
under no batch, a batch's under its name); a batch shared through Redis also has
items that no host has taken yet, counted from its queue.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from ._budget import spend_by_scope
from ._store import Counts, RecordState
from ._work_queue import WorkQueue
from .redis_governor import patiently

__all__ = ["WorkRow", "spend_on", "work_rows"]

# The name of the tasks recorded under no batch: a service's, a script's.
SERVICE = "(service)"

_IN_FLIGHT = (RecordState.QUEUED, RecordState.SUBMITTING, RecordState.RUNNING)
_SUCCEEDED = (RecordState.SUCCEEDED, RecordState.DOWNLOADED)
_FAILED = (RecordState.FAILED, RecordState.REFUSED)


@dataclass(frozen=True)
class WorkRow:
    """One batch's tasks (or the service's) as the ledger counts them."""

    name: str
    waiting: int | None  # a shared batch's items no host has taken yet (None: no queue)
    in_flight: int  # recorded and not ended: waiting for a slot, being sent, running
    succeeded: int
    failed: int  # failed, or refused by the service (nothing paid)
    uncertain: int  # a create may have made a task nobody can name

    def as_json(self) -> dict[str, Any]:
        """Return the row as a JSON object."""
        return asdict(self)


def _sum(by_state: dict[str, int], states: tuple[RecordState, ...]) -> int:
    return sum(by_state.get(state.value, 0) for state in states)


async def work_rows(counts: Counts, redis_url: str) -> list[WorkRow]:
    """Return the rows of ``counts`` (a store's), the service first, then each batch
    by name, with the waiting items of those shared through ``redis_url``."""
    rows: list[WorkRow] = []
    connection = aioredis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        names = sorted(counts, key=lambda name: (name != "", name))
        for name in names:
            by_state = counts[name]
            waiting = None
            if name:
                queue = WorkQueue(connection, name, consumer="top", redis_timeout=5.0)
                found = await queue.peek()
                if found is not None:
                    waiting = max(0, found.added - found.taken - found.done)
            rows.append(
                WorkRow(
                    name or SERVICE,
                    waiting,
                    _sum(by_state, _IN_FLIGHT),
                    _sum(by_state, _SUCCEEDED),
                    _sum(by_state, _FAILED),
                    by_state.get(RecordState.UNCERTAIN.value, 0),
                )
            )
    finally:
        await connection.aclose()
    return rows


async def spend_on(redis_url: str, key_prefix: str) -> dict[str, tuple[float, float]]:
    """Return the spend caps' budgets of a key: spent and held, by scope."""
    connection = aioredis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        # As every read of top: an outage waits up to 5 s, then RedisUnavailableError.
        return await patiently(
            lambda: spend_by_scope(connection, key_prefix),
            url=redis_url,
            timeout=5.0,
            rng=random.Random(),
        )
    finally:
        await connection.aclose()
