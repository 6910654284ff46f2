"""A capped batch's money: the spend its journal already paid, and the balance watched
while it runs (see run_batch)."""

from __future__ import annotations

import json
import logging

import anyio

from ._batch_file import BatchDefaults, request_from
from ._client import SoraClient
from ._errors import SoraError
from ._journal import ItemState, Journal
from ._prices import estimate

__all__ = ["SpendWatch", "paid_before"]

logger = logging.getLogger("sora_async")


class SpendWatch:
    """A capped run's spend: estimated by its budget, measured by the key's balance
    (read at the start, every ``every`` seconds, and at the end). When the balance
    falls faster than the estimate, it warns once and the rest of the run reserves
    each create at the measured price (the estimate times their ratio)."""

    def __init__(self, client: SoraClient, spent: float, balance: float | None) -> None:
        self.client = client
        self.spent = spent
        self.balance = balance
        self.warned = False

    @classmethod
    async def start(cls, client: SoraClient) -> SpendWatch | None:
        if client.budget is None:
            return None
        spent, _, _ = await client.spend()
        return cls(client, spent, await _balance_or_none(client))

    async def every(self, seconds: float) -> None:
        """Compare the estimate with the balance every ``seconds``, forever."""
        while True:
            await anyio.sleep(seconds)
            try:
                await self.measure()
            except SoraError as exc:  # a reading missed: the run goes on, the cap holds
                logger.warning("spend: the balance and the estimate were not compared: %s", exc)

    async def measure(self) -> tuple[float, float | None]:
        """Return the run's estimated and measured spend so far, and correct the prices
        when the balance fell more than the estimate."""
        spent, held, _ = await self.client.spend()
        estimated = spent - self.spent
        balance = await _balance_or_none(self.client)
        if balance is None or self.balance is None:
            return estimated, None
        measured = round(self.balance - balance, 6)
        # The provider may bill a task when it is made or when it ends: the tasks in
        # flight may be in the balance already.
        bound = estimated + held
        if measured > bound * 1.01 + 0.01 and bound > 0:
            ratio = measured / bound
            if not self.warned:
                self.warned = True
                logger.warning(
                    "the balance fell by $%.2f, above the estimate of $%.2f (tasks in "
                    "flight included): the prices are low for this key (give them with "
                    "prices= or --prices); the rest of the run reserves each create at "
                    "%.2f times its estimate",
                    measured,
                    bound,
                    ratio,
                )
            self.client.spending.price_factor = max(self.client.spending.price_factor, ratio)
            if self.client.budget is not None:  # the cap counts what the balance says
                await self.client.budget.add_spent(measured - bound)
        return estimated, measured

    async def end(self) -> tuple[float | None, float | None]:
        estimated, measured = await self.measure()
        logger.info("batch spend: estimated $%.2f, measured $%s", estimated, measured)
        return estimated, measured


async def _balance_or_none(client: SoraClient) -> float | None:
    try:
        return await client.balance()
    except SoraError as exc:  # the truth is a nicety: the batch goes on without it
        logger.warning("the balance could not be read: %s", exc)
        return None


async def paid_before(client: SoraClient, book: Journal, generation: int, page: int) -> float:
    """Return the high estimate of the journal's items whose create made (or may have
    made) a task the provider bills: the spend of the runs before."""
    total = 0.0
    paid = (ItemState.RUNNING, ItemState.SUCCEEDED, ItemState.DOWNLOADED, ItemState.UNCERTAIN)
    for state in paid:
        after = -1
        while rows := await book.page(generation, state, after, page):
            for row in rows:
                request = request_from(json.loads(row.request), BatchDefaults())
                found = estimate(request, client.spending.prices or None, model=client.model)
                total += found.high if found is not None else 0.0
            after = rows[-1].line
    return total
