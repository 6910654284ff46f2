"""The price types of the catalogue: a leaf, so that the catalogue's rows carry them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ._errors import InputError

__all__ = ["Estimate", "Price", "Unit"]

Unit = Literal["video", "image", "second"]
UNITS: tuple[Unit, ...] = ("video", "image", "second")


def check_usd(name: str, value: object) -> None:
    """Raise InputError naming ``name`` unless ``value`` is a finite USD amount >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InputError(name, f"must be a price in USD, zero or more; got {value!r}")
    if math.isinf(value):
        raise InputError(name, "must be a finite price in USD")


@dataclass(frozen=True)
class Price:
    """A model's price: ``low`` to ``high`` USD per ``unit`` (``high`` None: the same
    as ``low``), or by the value of the request's field ``by`` (``rates``: value ->
    (low, high); ``default``: the value a request that leaves the field unset gets).
    A per-second price counts the request's duration, else ``seconds``."""

    low: float
    high: float | None = None
    unit: Unit = "video"
    by: str = "mode"
    rates: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    default: str | None = None
    seconds: int = 10

    def __post_init__(self) -> None:
        check_usd("low", self.low)
        if self.high is not None:
            check_usd("high", self.high)
            if self.high < self.low:
                raise InputError("high", f"must be at least low ({self.low}), got {self.high}")
        if self.unit not in UNITS:
            raise InputError("unit", f"must be one of {', '.join(UNITS)}; got {self.unit!r}")
        for value, (low, high) in self.rates.items():
            check_usd(f"rates.{value}", low)
            check_usd(f"rates.{value}", high)
            if high < low:
                raise InputError(f"rates.{value}", f"high ({high}) must be at least low ({low})")
        if self.default is not None and self.default not in self.rates:
            raise InputError("default", f"must be one of the rates; got {self.default!r}")
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int) or self.seconds < 1:
            raise InputError("seconds", f"must be a whole number of seconds; got {self.seconds!r}")

    def range_for(self, value: object) -> tuple[float, float]:
        """Return (low, high) USD per unit for a request whose ``by`` field is ``value``."""
        if value is None and self.default is not None:
            value = self.default
        if isinstance(value, str) and value in self.rates:
            return self.rates[value]
        if self.rates:  # a value the table does not name: the whole span of its rates
            lows, highs = zip(*self.rates.values(), strict=True)
            return min(self.low, *lows), max(self.high or self.low, *highs)
        return self.low, self.high if self.high is not None else self.low


@dataclass(frozen=True)
class Estimate:
    """What one request may cost, in USD: ``low`` to ``high``."""

    model: str
    low: float
    high: float
