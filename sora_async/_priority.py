"""Priorities of creates on one key, and the line of creates waiting for a task slot.

A user's request at a screen (``interactive``) goes before a script's own work
(``normal``), which goes before the night's batch (``batch``). Within one priority,
first come, first served. Two rules keep that fair:

- reserved slots: work below ``interactive`` may not take the last ``reserved`` slots,
  so a user's request starts at once while a batch fills the key. When no
  interactive create came for ``lend_after`` seconds, the reserve is lent to the
  rest (it comes back with the next interactive create, which may then wait up to
  one slot turnover: generation time / slots);
- no starvation: a create that waited ``starve_after`` seconds is served with the
  interactive ones, in order of arrival, so every priority keeps moving under any
  load.
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Final, Literal, get_args

from ._errors import InputError

__all__ = ["ADOPTED", "PRIORITIES", "Priority", "SlotLine", "check_rules", "rank_of", "served_as"]

Priority = Literal["interactive", "normal", "batch"]
"""A create's priority: ``"interactive"`` (a user waits at a screen), ``"normal"`` (the
default) or ``"batch"``."""
PRIORITIES: Final[tuple[Priority, ...]] = get_args(Priority)
"""The priorities, highest first."""
_RANKS: Final[dict[str, int]] = {name: rank for rank, name in enumerate(PRIORITIES)}
#: The priority a task made elsewhere is adopted at: it holds its slot on the service
#: already, so it goes first, whatever the reserve.
ADOPTED: Final[Priority] = "interactive"


def rank_of(priority: object) -> int:
    """Return the rank of ``priority`` (0 is the highest), or raise InputError."""
    rank = _RANKS.get(priority) if isinstance(priority, str) else None
    if rank is None:
        raise InputError("priority", f"must be one of {', '.join(PRIORITIES)}; got {priority!r}")
    return rank


class _Waiter:
    __slots__ = ("future", "order", "rank", "since")

    def __init__(self, rank: int, order: int, since: float) -> None:
        self.rank = rank
        self.order = order
        self.since = since
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()


def check_rules(
    reserved: object, lend_after: object, starve_after: object, slots: int
) -> tuple[int, float | None, float]:
    """Return a governor's priority settings, or raise InputError naming the bad one."""
    if isinstance(reserved, bool) or not isinstance(reserved, int) or reserved < 0:
        rule = f"must be a whole number of slots, 0 or more; got {reserved!r}"
        raise InputError("reserved", rule)
    if reserved >= slots:
        raise InputError("reserved", f"must be below limits.concurrent_tasks ({slots})")
    if lend_after is not None and not _seconds(lend_after, zero=True):
        raise InputError("lend_after", "must be None (never lend) or seconds, 0 or more")
    if not _seconds(starve_after, zero=False):
        raise InputError("starve_after", "must be a positive number of seconds")
    lend = None if lend_after is None else float(lend_after)  # type: ignore[arg-type]
    return reserved, lend, float(starve_after)  # type: ignore[arg-type]


def _seconds(value: object, *, zero: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 0 if zero else value > 0


def served_as(rank: int, since: float, now: float, starve_after: float) -> int:
    """Return the rank a create of ``rank`` waiting since ``since`` is served at: the
    highest once it waited ``starve_after`` seconds."""
    return 0 if now - since >= starve_after else rank


class SlotLine:
    """Creates waiting for a task slot in one process (see the module's docstring)."""

    def __init__(
        self, *, reserved: int = 0, lend_after: float | None = 600.0, starve_after: float = 600.0
    ) -> None:
        self.reserved = reserved
        self.lend_after = lend_after
        self.starve_after = starve_after
        self._lines: tuple[collections.deque[_Waiter], ...] = tuple(
            collections.deque() for _ in PRIORITIES
        )
        self._order = 0
        self.last_interactive = -math.inf  # loop time of the last interactive create

    def reserve(self, now: float) -> int:
        """Return how many slots only interactive creates may take now."""
        if self.lend_after is not None and now - self.last_interactive >= self.lend_after:
            return 0  # lent: no interactive create came for a while
        return self.reserved

    def lent_until(self) -> float:
        """Return when the reserve will next be lent (inf: never)."""
        if not self.reserved or self.lend_after is None:
            return math.inf
        return self.last_interactive + self.lend_after

    def has_room(self, rank: int, in_use: int, limit: int, now: float) -> bool:
        """Return whether a create of ``rank`` may take a slot with ``in_use`` taken."""
        return in_use < limit - (0 if rank == 0 else self.reserve(now))

    def __bool__(self) -> bool:
        return any(self._lines)

    def join(self, rank: int, now: float) -> _Waiter:
        """Put a create of ``rank`` in line; await its ``future`` for the slot."""
        self._order += 1
        waiter = _Waiter(rank, self._order, now)
        self._lines[rank].append(waiter)
        return waiter

    def leave(self, waiter: _Waiter) -> None:
        """Take a waiter that gave up out of the line (if it is still there)."""
        line = self._lines[waiter.rank]
        if waiter in line:
            line.remove(waiter)

    def next_up(self, in_use: int, limit: int, now: float) -> _Waiter | None:
        """Remove and return the waiter the next slot goes to, or None when none may
        take one now."""
        for line in self._lines:
            while line and line[0].future.done():  # cancelled while a slot was on its way
                line.popleft()
        heads = [line[0] for line in self._lines if line]
        if not heads:
            return None
        # Served as interactive: the interactive head and any head that waited too long.
        first = [w for w in heads if served_as(w.rank, w.since, now, self.starve_after) == 0]
        best = min(first, key=lambda w: w.order) if first else heads[0]
        rank = 0 if first else best.rank
        if not self.has_room(rank, in_use, limit, now):
            return None
        return self._lines[best.rank].popleft()

    def waiting(self) -> dict[Priority, int]:
        """Return how many creates wait, by priority."""
        return {
            name: sum(1 for w in line if not w.future.done())
            for name, line in zip(PRIORITIES, self._lines, strict=True)
        }
