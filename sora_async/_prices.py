"""What a request costs: the catalogue's prices (on each row of ``sa.MODELS``), the
user's, and the estimate of one request.

A price is in USD per unit (a video, an image, or a second of video), as a range
where the provider's page gives one, and may differ by a field of the request (its
``mode``, its ``resolution``). The spend cap reserves the high end of each create; a
dry run sums both ends. The balance is the truth: a price is only an estimate of it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._catalog import MODELS, RawInput, model_of
from ._errors import InputError
from ._pricing import Estimate, Price

__all__ = ["Estimate", "Price", "estimate", "load_prices", "price_of"]


def price_of(model: str, prices: Mapping[str, Price] | None = None) -> Price | None:
    """Return ``model``'s price: the user's, else the catalogue's, else None."""
    if prices and model in prices:
        return prices[model]
    row = MODELS.get(model)
    return row.price if row is not None else None


def estimate(
    request: Any, prices: Mapping[str, Price] | None = None, *, model: str = "sora-2-pro"
) -> Estimate | None:
    """Return what ``request`` may cost (low and high USD), or None when its model has
    no known price. ``prices`` overrides the catalogue's, by model id; ``model`` is
    the model of Sora 2 Pro's TextToVideo / ImageToVideo (the client's ``model``).

    Example::

        sa.estimate(sa.Veo31(prompt="a kite", mode="fast"))  # low 0.2, high 0.2
    """
    name = model_of(request, model)
    price = price_of(name, prices)
    if price is None:
        return None
    fields: Mapping[str, Any] = request.input if isinstance(request, RawInput) else {}

    def field(key: str) -> Any:
        return fields.get(key) if fields else getattr(request, key, None)

    low, high = price.range_for(field(price.by))
    units = 1.0
    if price.unit == "second":
        try:
            units = float(field("duration") or price.seconds)
        except (TypeError, ValueError):
            units = float(price.seconds)
    return Estimate(name, round(low * units, 9), round(high * units, 9))


_FIELDS = {"low", "high", "unit", "by", "rates", "default", "seconds"}


def load_prices(path: str | Path) -> dict[str, Price]:
    """Read a price file: a JSON object of model id -> USD per video, or -> an object
    with ``low`` and optionally ``high``, ``unit`` ("video", "image" or "second"),
    ``by`` (the request field the rates follow, "mode" by default), ``rates`` (value
    -> [low, high]), ``default`` and ``seconds``. A UTF-8 byte order mark at its start
    is skipped. Raises InputError naming the entry and the rule."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a BOM is skipped
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError("prices", f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError("prices", "must be a JSON object of model id -> price")
    prices: dict[str, Price] = {}
    for model, entry in data.items():
        where = f"prices.{model}"
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            entry = {"low": entry}
        if not isinstance(entry, dict) or "low" not in entry:
            raise InputError(where, 'must be USD per video, or {"low": USD, ...}')
        unknown = set(entry) - _FIELDS
        if unknown:
            raise InputError(where, f"has unknown fields: {', '.join(sorted(unknown))}")
        rates = entry.get("rates") or {}
        if not isinstance(rates, dict) or not all(
            isinstance(span, list) and len(span) == 2 for span in rates.values()
        ):
            raise InputError(f"{where}.rates", "must map each value to [low, high]")
        try:
            prices[model] = Price(
                entry["low"],
                entry.get("high"),
                entry.get("unit", "video"),
                str(entry.get("by", "mode")),
                {value: (span[0], span[1]) for value, span in rates.items()},
                entry.get("default"),
                entry.get("seconds", 10),
            )
        except InputError as exc:
            raise InputError(f"{where}.{exc.field}", exc.rule) from exc
    return prices
