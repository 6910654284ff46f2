"""What a request costs: the catalogue's prices, the user's, and the estimate of one.

A price is in USD per unit (a video, an image, or a second of video), as a range
where the provider's page gives one (``low`` to ``high``), and may differ by the
request's ``mode``. The spend cap reserves the high end of each create; a dry run
sums both ends. The balance is the truth: a price is only an estimate of it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._catalog import MODELS, RawInput, model_of
from ._errors import InputError

__all__ = ["Estimate", "Price", "estimate", "load_prices"]

Unit = Literal["video", "image", "second"]
_UNITS: tuple[Unit, ...] = ("video", "image", "second")
# The seconds a per-second price counts when a request leaves its duration unset.
_DEFAULT_SECONDS = 10


def _usd(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InputError(name, f"must be a price in USD, zero or more; got {value!r}")
    if math.isinf(value):
        raise InputError(name, "must be a finite price in USD")


@dataclass(frozen=True)
class Price:
    """A model's price: ``low`` to ``high`` USD per ``unit`` (``high`` None: the same
    as ``low``), or by the request's mode (``modes``: mode -> (low, high))."""

    low: float
    high: float | None = None
    unit: Unit = "video"
    modes: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _usd("low", self.low)
        if self.high is not None:
            _usd("high", self.high)
            if self.high < self.low:
                raise InputError("high", f"must be at least low ({self.low}), got {self.high}")
        if self.unit not in _UNITS:
            raise InputError("unit", f"must be one of {', '.join(_UNITS)}; got {self.unit!r}")
        for mode, (low, high) in self.modes.items():
            _usd(f"modes.{mode}", low)
            _usd(f"modes.{mode}", high)
            if high < low:
                raise InputError(f"modes.{mode}", f"high ({high}) must be at least low ({low})")

    def range_for(self, mode: object) -> tuple[float, float]:
        """Return (low, high) USD per unit for a request in ``mode``."""
        if isinstance(mode, str) and mode in self.modes:
            return self.modes[mode]
        if self.modes:  # a mode the table does not name: the whole span of its modes
            lows, highs = zip(*self.modes.values(), strict=True)
            return min(self.low, *lows), max(self.high or self.low, *highs)
        return self.low, self.high if self.high is not None else self.low


@dataclass(frozen=True)
class Estimate:
    """What one request may cost, in USD: ``low`` to ``high``."""

    model: str
    low: float
    high: float


# Each model's price as its page states it (apixo.ai/docs/models/...); a model whose
# page states none is unpriced (give it with prices= or --prices).
CATALOGUE_PRICES: Mapping[str, Price] = {
    # its page: $0.10-0.15 a video
    "sora-2": Price(0.10, 0.15),
    # its page: fast $0.20, quality $1.50 a video
    "veo-3-1": Price(0.20, 1.50, modes={"fast": (0.20, 0.20), "quality": (1.50, 1.50)}),
    # its page: $0.03 an image
    "nano-banana": Price(0.03, unit="image"),
}


def price_of(model: str, prices: Mapping[str, Price] | None = None) -> Price | None:
    """Return ``model``'s price: the user's, else the catalogue's, else None."""
    if prices and model in prices:
        return prices[model]
    return CATALOGUE_PRICES.get(model)


def estimate(
    request: Any, prices: Mapping[str, Price] | None = None, *, model: str = "sora-2-pro"
) -> Estimate | None:
    """Return what ``request`` may cost (low and high USD), or None when its model has
    no known price. ``prices`` overrides the catalogue's, by model id; ``model`` is
    the model of Sora 2 Pro's TextToVideo / ImageToVideo (the client's ``model``).

    Example::

        sa.estimate(sa.Veo31(prompt="a kite", mode="fast"))  # Estimate(low=0.2, high=0.2)
    """
    name = model_of(request, model)
    price = price_of(name, prices)
    if price is None:
        return None
    fields: Mapping[str, Any] = request.input if isinstance(request, RawInput) else {}
    mode = fields.get("mode") if fields else getattr(request, "mode", None)
    low, high = price.range_for(mode)
    units = 1.0
    if price.unit == "second":
        seconds = fields.get("duration") if fields else getattr(request, "duration", None)
        try:
            units = float(seconds) if seconds is not None else _DEFAULT_SECONDS
        except (TypeError, ValueError):
            units = _DEFAULT_SECONDS
    return Estimate(name, round(low * units, 9), round(high * units, 9))


def load_prices(path: str | Path) -> dict[str, Price]:
    """Read a price file: a JSON object of model id -> USD per video, or -> an object
    with ``low``, ``high``, ``unit`` ("video", "image" or "second") and ``modes``
    (mode -> [low, high]). Raises InputError naming the entry and the rule."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError("prices", f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError("prices", "must be a JSON object of model id -> price")
    prices: dict[str, Price] = {}
    for model, entry in data.items():
        where = f"prices.{model}"
        if model not in MODELS and not isinstance(model, str):
            raise InputError(where, "must be a model id")
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            entry = {"low": entry}
        if not isinstance(entry, dict) or "low" not in entry:
            raise InputError(where, 'must be USD per video, or {"low": USD, ...}')
        unknown = set(entry) - {"low", "high", "unit", "modes"}
        if unknown:
            raise InputError(where, f"has unknown fields: {', '.join(sorted(unknown))}")
        modes = entry.get("modes") or {}
        if not isinstance(modes, dict) or not all(
            isinstance(span, list) and len(span) == 2 for span in modes.values()
        ):
            raise InputError(f"{where}.modes", "must map each mode to [low, high]")
        try:
            prices[model] = Price(
                entry["low"],
                entry.get("high"),
                entry.get("unit", "video"),
                {mode: (span[0], span[1]) for mode, span in modes.items()},
            )
        except InputError as exc:
            raise InputError(f"{where}.{exc.field}", exc.rule) from exc
    return prices
