"""Chaos mode of the fake service: faults drawn at random, at a given rate, seeded.

Each request that no queued fault hits draws, with probability ``rate``, one fault
from every kind that applies to it: 5xx (also inside HTTP 200), resets before and
after the work, answers slower than a client's timeout, broken JSON, 429 storms
(the next few requests of any kind get 429 too), damaged status envelopes, and for
result files truncated transfers and HTML pages in place of the video. Lost,
duplicated and late callbacks come from the callback knobs (see FakeApixo).
"""

from __future__ import annotations

import random
from collections.abc import Collection

from ._faults import Fault, FaultSpec, RequestKind

__all__ = ["Chaos"]

_SERVER_CODES = (500, 502, 503, 504)
_API_FAULTS = (
    Fault.SERVER_ERROR,
    Fault.RESET,
    Fault.RESET_AFTER_CREATE,
    Fault.SLOW,
    Fault.BROKEN_JSON,
    Fault.ERROR_IN_200,
    Fault.RATE_LIMIT,
)
_STATUS_DAMAGES = (
    Fault.OTHER_TASK,
    Fault.NO_RESULT_URL,
    Fault.BAD_RESULT_JSON,
    Fault.BAD_RESULT_URL,
    Fault.BAD_STATUS_DATA,
)
_FAULTS: dict[RequestKind, tuple[Fault, ...]] = {
    "create": _API_FAULTS,
    "status": _API_FAULTS + _STATUS_DAMAGES,
    "balance": _API_FAULTS,
    # BROKEN_JSON on a file is a truncated transfer.
    "file": (
        Fault.SERVER_ERROR,
        Fault.RESET,
        Fault.SLOW,
        Fault.BROKEN_JSON,
        Fault.CORRUPT_FILE,
        Fault.RATE_LIMIT,
    ),
}
#: How many API requests after the first one a 429 storm also hits: uniform in this span.
STORM = (2, 8)


def check_rate(rate: float) -> float:
    """Return ``rate`` as a float; raise ValueError unless it is in ``[0, 1]``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError("chaos must be in [0, 1]")
    return float(rate)


class Chaos:
    """Draw random faults for requests; one seeded generator, always the same draws.

    ``rate`` may be changed at run time; ``delay`` is how long a slow answer takes
    (past a client's timeout by default); ``faults``, when given, limits the draws to
    those kinds.
    """

    def __init__(
        self, rate: float, seed: int, delay: float, faults: Collection[Fault] | None = None
    ) -> None:
        """Make the drawer; a ``rate`` of 0 draws nothing."""
        self.rate = check_rate(rate)
        self.delay = delay
        allowed = set(Fault) if faults is None else set(faults)
        self._faults = {
            kind: tuple(f for f in choices if f in allowed) for kind, choices in _FAULTS.items()
        }
        self._rng = random.Random(f"chaos-{seed}")
        self._storm = 0

    def draw(self, kind: RequestKind) -> FaultSpec | None:
        """Return the fault this request gets, or None (most of the time)."""
        if self._storm > 0 and kind != "file":  # the API's limiter, not the CDN's
            self._storm -= 1
            return self._spec(Fault.RATE_LIMIT, kind)
        choices = self._faults[kind]
        if self.rate <= 0 or self._rng.random() >= self.rate or not choices:
            return None
        fault = self._rng.choice(choices)
        if fault is Fault.RATE_LIMIT and kind != "file":
            self._storm = self._rng.randint(*STORM)
        return self._spec(fault, kind)

    def _spec(self, fault: Fault, kind: RequestKind) -> FaultSpec:
        status = self._rng.choice(_SERVER_CODES)
        return FaultSpec(fault, kind, 1, status, self.delay, None)
