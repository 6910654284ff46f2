"""A client's spend cap: its budget, the price each create reserves, the balance kept."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ._budget import Budget, budget_for, check_cap
from ._catalog import RawInput
from ._errors import InputError
from ._prices import Price, estimate

__all__ = ["Spending"]


class Spending:
    """What a client's ``spend_cap`` (or ``keep_balance``) holds to.

    ``budget`` keeps the reservations (None without a cap); ``prices`` override the
    catalogue's; ``price_factor`` is the measured spend over the estimated one (a
    capped batch's balance reads raise it): each create reserves its high estimate
    times this factor.
    """

    def __init__(
        self,
        governor: object,
        prices: Mapping[str, Price] | None,
        spend_cap: float | None,
        spend_scope: str,
        keep_balance: float | None,
    ) -> None:
        self.budget: Budget | None = budget_for(governor, spend_cap, spend_scope, keep_balance)
        self.prices: dict[str, Price] = dict(prices or {})
        self.price_factor = 1.0
        self.keep_balance = (
            None if keep_balance is None else check_cap(keep_balance, "keep_balance")
        )

    def high_price(self, model: str, payload: Any) -> float:
        """Return the USD one create of ``payload`` on ``model`` reserves (InputError
        naming ``prices`` for a model without a known price)."""
        request = RawInput(model=model, input=payload) if isinstance(payload, dict) else payload
        found = estimate(request, self.prices or None, model=model)
        if found is None:
            raise InputError(
                "prices",
                f"model {model!r} has no known price, and a spend cap needs one: give it "
                "with SoraClient(prices={...}) or the CLI's --prices FILE",
            )
        return found.high * self.price_factor

    async def keep(self, balance: Callable[[], Awaitable[float]]) -> None:
        """With ``keep_balance``, lower the cap to what the balance leaves above it."""
        if self.budget is None or self.keep_balance is None:
            return
        spent, _ = await self.budget.figures()
        left = await balance() - self.keep_balance
        self.budget.cap = max(0.0, min(self.budget.cap, spent + left))
