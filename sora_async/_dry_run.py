"""``sora-async batch FILE --dry-run``: check every line and estimate, sending nothing.

It prints the items per model, their cost range from the catalogue's prices (or the
user's), and the time the batch takes at the key's limits: per model lane, the longer
of its tasks times the model's expected generation time over its task slots, and its
creates over its requests per window. Lanes run side by side; with ``--shared-budget`` they
share the default model's limits, one after another. 0 requests, or 1 with
``--balance``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from rich.table import Table

from ._batch_file import BatchDefaults, read_items
from ._catalog import MODELS, limits_for, model_of
from ._cli_run import Note, emit, fail, out, run
from ._client import SoraClient
from ._errors import InputError
from ._models import Limits
from ._prices import estimate

__all__ = ["DryRun", "check_priced", "dry_run_batch", "estimate_file"]


@dataclass
class Lane:
    """One model's share of a batch file."""

    items: int = 0
    low: float = 0.0
    high: float = 0.0
    unpriced: int = 0  # items of a model without a known price


@dataclass
class DryRun:
    """What a batch file would cost and take."""

    lanes: dict[str, Lane]
    #: The key's own limits by model (``--limits``), where they replace the catalogue's.
    limits_given: dict[str, Limits] = field(default_factory=dict)

    @property
    def items(self) -> int:
        return sum(lane.items for lane in self.lanes.values())

    def seconds_of(self, model: str, shared_with: str | None = None) -> float:
        """Return the seconds ``model``'s items take at its limits (``shared_with``:
        the model whose limits every model spends)."""
        lane = self.lanes[model]
        limits = limits_for(shared_with or model, self.limits_given)
        info = MODELS.get(model)
        mean = info.mean_seconds if info is not None else 180.0
        by_slots = lane.items * mean / limits.concurrent_tasks
        by_requests = lane.items / limits.requests * limits.period
        return max(by_slots, by_requests)

    def seconds(self, shared_with: str | None = None) -> float:
        """Return the seconds the whole batch takes (lanes side by side, or one after
        another when they share ``shared_with``'s limits)."""
        times = [self.seconds_of(model, shared_with) for model in self.lanes]
        return sum(times) if shared_with else max(times, default=0.0)

    def as_json(self, shared_with: str | None) -> dict[str, Any]:
        """Return the estimate as a JSON object."""
        return {
            "items": self.items,
            "low_usd": round(sum(lane.low for lane in self.lanes.values()), 6),
            "high_usd": round(sum(lane.high for lane in self.lanes.values()), 6),
            "unpriced": sum(lane.unpriced for lane in self.lanes.values()),
            "hours": round(self.seconds(shared_with) / 3600, 3),
            "models": {
                model: {
                    "items": lane.items,
                    "low_usd": round(lane.low, 6),
                    "high_usd": round(lane.high, 6),
                    "unpriced": lane.unpriced,
                    "hours": round(self.seconds_of(model, shared_with) / 3600, 3),
                }
                for model, lane in self.lanes.items()
            },
        }


def estimate_file(
    path: Path, defaults: BatchDefaults | None, model: str, prices: dict[str, Any] | None
) -> DryRun:
    """Check every line of ``path`` and sum its items' estimates, per model.

    Raises BatchLineError naming a bad line, InputError when the file cannot be read."""
    lanes: dict[str, Lane] = {}
    for chunk in read_items(path, defaults):
        for item in chunk:
            name = model_of(item.request, model)
            lane = lanes.setdefault(name, Lane())
            lane.items += 1
            found = estimate(item.request, prices or None, model=model)
            if found is None:
                lane.unpriced += 1
            else:
                lane.low += found.low
                lane.high += found.high
    return DryRun(lanes)


def check_priced(
    path: Path, defaults: BatchDefaults | None, model: str, prices: dict[str, Any] | None
) -> None:
    """Raise InputError naming ``prices`` unless every item of ``path`` has a price (a
    spend cap needs one for each create), before anything is sent."""
    dry = estimate_file(path, defaults, model, prices)
    unpriced = sorted(name for name, lane in dry.lanes.items() if lane.unpriced)
    if unpriced:
        raise InputError(
            "prices",
            f"no known price for {', '.join(unpriced)}, and a spend cap needs one: give "
            'it with --prices FILE (a JSON object such as {"sora-2-pro": 1.5})',
        )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.0f} min"


def _table(dry: DryRun, shared_with: str | None) -> Table:
    table = Table("model", "items", "cost (USD)", "time at the key's limits")
    for model, lane in dry.lanes.items():
        cost = f"{lane.low:,.2f} - {lane.high:,.2f}"
        if lane.unpriced:
            cost += f" (+{lane.unpriced} unpriced)"
        table.add_row(model, f"{lane.items:,}", cost, _hours(dry.seconds_of(model, shared_with)))
    return table


def dry_run_batch(
    params: dict[str, Any], path: Path, defaults: BatchDefaults, show_balance: bool
) -> NoReturn:
    """Print the estimate of a batch file and exit (0, or 2 for a bad file)."""
    as_json = params["as_json"]
    shared_with = params["model"] if params["shared_budget"] else None
    try:
        dry = estimate_file(path, defaults, params["model"], params.get("prices"))
    except InputError as exc:
        fail(str(exc), as_json=as_json, field=exc.field)
    dry.limits_given = params.get("limits") or {}
    summary = dry.as_json(shared_with)
    if not show_balance:
        _report(dry, summary, shared_with, as_json, None)
        raise SystemExit(0)

    async def work(client: SoraClient, note: Note) -> int:
        _report(dry, summary, shared_with, as_json, await client.balance())
        return 0

    run(params, work)


def _report(
    dry: DryRun,
    summary: dict[str, Any],
    shared_with: str | None,
    as_json: bool,
    balance: float | None,
) -> None:
    if balance is not None:
        summary["balance_usd"] = balance
    if as_json:
        emit(True, "", dry_run=summary)
        return
    out.print(_table(dry, shared_with))
    line = (
        f"{summary['items']:,} items: ${summary['low_usd']:,.2f} - ${summary['high_usd']:,.2f}, "
        f"about {_hours(dry.seconds(shared_with))} at the key's limits"
    )
    if summary["unpriced"]:
        line += f"; {summary['unpriced']} items of unpriced models (give them with --prices)"
    if balance is not None:
        line += f"; balance ${balance:,.2f}"
    out.print(line + ". Nothing was sent.", highlight=False, soft_wrap=True)
