"""A governor's window of sends, kept in the task store across restarts.

The service counts the requests of a key in any 60-s window, whoever sent them: a
process killed after spending its window, restarted at once, must not send into that
window again. A client on a store that keeps sends (:class:`SQLiteStore`) writes each
:class:`LocalGovernor` grant there as it happens (one write per batch of grants), and
the next client on the store counts them in its governor's window before its first
request. The governor knows nothing of the store: this module joins them.

Grants are times of the event loop, which do not survive the process: the store keeps
wall-clock times, converted at each write and read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import anyio.abc

from ._errors import SoraError
from ._governor import Governor, RemembersGrants
from ._store import SendLog

__all__ = ["SendMemory"]

logger = logging.getLogger("sora_async")


@dataclass
class _Budget:
    """One governor's sends: its name in the store, and how many grants were taken."""

    name: str
    governor: RemembersGrants
    taken: int = 0
    pending: list[float] = field(default_factory=list)  # wall-clock, not yet written


class SendMemory:
    """Keep the sends of each governor that remembers grants in ``log``.

    :meth:`load` reads the sends of the last windows once, at open; :meth:`watch`
    seeds a governor with its budget's sends and writes its grants from then on, in
    the task group given; :meth:`flush` writes what is left, at close.
    """

    def __init__(self, log: SendLog) -> None:
        self._log = log
        self._loaded: dict[str, list[float]] = {}
        self._budgets: list[_Budget] = []

    async def load(self) -> None:
        """Read the recorded sends of every budget (wall-clock times)."""
        self._loaded = await self._log.recent_sends()

    def watch(self, name: str, governor: Governor, group: anyio.abc.TaskGroup) -> None:
        """Seed ``governor`` with budget ``name``'s recorded sends and keep its grants
        from now on (nothing for a governor that does not remember grants)."""
        if not isinstance(governor, RemembersGrants):
            return
        if any(budget.governor is governor for budget in self._budgets):
            return
        offset = asyncio.get_running_loop().time() - time.time()
        governor.seed_grants(sent + offset for sent in self._loaded.pop(name, ()))
        budget = _Budget(name, governor)
        self._budgets.append(budget)
        group.start_soon(self._keep, budget)

    async def _keep(self, budget: _Budget) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await budget.governor.wait_grants(budget.taken)
            self._take(budget, loop)
            await self._write(budget)

    @staticmethod
    def _take(budget: _Budget, loop: asyncio.AbstractEventLoop) -> None:
        """Move a budget's grants not yet taken to its pending sends, in wall-clock time."""
        budget.taken, granted = budget.governor.grants_since(budget.taken)
        offset = time.time() - loop.time()
        budget.pending.extend(sent + offset for sent in granted)

    async def _write(self, budget: _Budget) -> None:
        """Write a budget's pending sends. The write goes on if the caller is cancelled
        (the client closing): a batch taken is never lost."""
        if budget.pending:
            pending, budget.pending = budget.pending, []
            await asyncio.shield(self._record(budget, pending))

    async def _record(self, budget: _Budget, pending: list[float]) -> None:
        """Write ``pending``; a failure is logged (the sends are not vital)."""
        horizon = time.time() - budget.governor.memory
        try:
            await self._log.record_sends(budget.name, pending, forget_before=horizon)
        except SoraError as exc:
            logger.warning(
                "task store: cannot record %d sends of %s (a restart may send into the "
                "window they spent): %s",
                len(pending),
                budget.name,
                exc,
            )

    async def flush(self) -> None:
        """Write every budget's grants not yet written (the client is closing)."""
        loop = asyncio.get_running_loop()
        for budget in self._budgets:
            self._take(budget, loop)
            await self._write(budget)
