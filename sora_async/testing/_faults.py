"""Fault plan of the fake APIXO service: faults queued for the next matching requests."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Literal

__all__ = ["Fault", "FaultKind", "FaultPlan", "FaultSpec", "RequestKind", "Target"]

#: What a request is, as the fault plan and the counters see it.
RequestKind = Literal["create", "status", "balance", "file"]
#: Which requests a fault applies to; ``"any"`` means any API call (not file downloads).
Target = Literal["any", "create", "status", "balance", "file"]


class Fault(str, enum.Enum):
    """Name a fault the fake service can inject."""

    #: Answer HTTP ``status`` (5xx) with an error envelope; no work done.
    SERVER_ERROR = "server_error"
    #: Drop the connection before answering; no work done (no task made).
    RESET = "reset"
    #: Do the work (a create makes its task), then drop the connection unanswered.
    RESET_AFTER_CREATE = "reset_after_create"
    #: Wait ``delay`` seconds of loop time, then do the work and answer normally.
    SLOW = "slow"
    #: Do the work, then answer HTTP 200 with a truncated, undecodable body.
    BROKEN_JSON = "broken_json"
    #: Answer HTTP 200 whose envelope carries ``code=status``; no work done.
    ERROR_IN_200 = "error_in_200"
    #: Answer 429 whatever the limits say; no work done.
    RATE_LIMIT = "rate_limit"
    #: Status only: answer with another task's success (its id and URLs).
    OTHER_TASK = "other_task"
    #: Status only: answer ``success`` with an empty ``resultUrls``.
    NO_RESULT_URL = "no_result_url"
    #: Status only: answer ``success`` with a ``resultJson`` that is not JSON.
    BAD_RESULT_JSON = "bad_result_json"
    #: Status only: answer ``success`` with a ``file:``, ``javascript:`` or relative URL (in turn).
    BAD_RESULT_URL = "bad_result_url"
    #: Status only: ``state`` missing, ``state`` an int, ``data`` null, ``data`` a list (in turn).
    BAD_STATUS_DATA = "bad_status_data"
    #: Files only: answer HTTP 200 with an HTML error page instead of the video.
    CORRUPT_FILE = "corrupt_file"


FaultKind = (
    Fault
    | Literal[
        "server_error",
        "reset",
        "reset_after_create",
        "slow",
        "broken_json",
        "error_in_200",
        "rate_limit",
        "other_task",
        "no_result_url",
        "bad_result_json",
        "bad_result_url",
        "bad_status_data",
        "corrupt_file",
    ]
)
_STATUS_ONLY = frozenset(
    {"other_task", "no_result_url", "bad_result_json", "bad_result_url", "bad_status_data"}
)

_TARGETS = frozenset({"any", "create", "status", "balance", "file"})


@dataclass
class FaultSpec:
    """Describe one queued fault and how many more requests it will hit."""

    kind: Fault
    on: Target
    times: int
    status: int
    delay: float
    retry_after: float | None

    def matches(self, kind: RequestKind) -> bool:
        """Tell whether this fault applies to a request of ``kind``."""
        if self.kind.value in _STATUS_ONLY:
            return kind == "status" and self.on in ("any", "status")
        if self.kind is Fault.CORRUPT_FILE:
            return kind == "file"
        if self.on == "any":
            return kind != "file"
        return self.on == kind


class FaultPlan:
    """Queue faults and hand them, in order, to the requests they match."""

    def __init__(self) -> None:
        """Make an empty plan."""
        self._queue: deque[FaultSpec] = deque()

    def add(
        self,
        kind: FaultKind,
        *,
        on: Target,
        times: int,
        status: int,
        delay: float,
        retry_after: float | None,
    ) -> FaultSpec:
        """Queue a fault for the next ``times`` requests matching ``on``."""
        fault = Fault(kind)
        if on not in _TARGETS:
            raise ValueError(f"unknown fault target {on!r}")
        if fault.value in _STATUS_ONLY and on not in ("any", "status"):
            raise ValueError(f"{fault.value} damages status answers only")
        if fault is Fault.CORRUPT_FILE and on != "file":
            raise ValueError("corrupt_file damages file downloads only: pass on='file'")
        if times < 1:
            raise ValueError("times must be >= 1")
        if delay < 0:
            raise ValueError("delay must be >= 0")
        spec = FaultSpec(fault, on, times, status, delay, retry_after)
        self._queue.append(spec)
        return spec

    def peek(self, kind: RequestKind) -> FaultSpec | None:
        """Return the fault the next request of ``kind`` would get, without using it."""
        for spec in self._queue:
            if spec.matches(kind):
                return spec
        return None

    def take(self, kind: RequestKind) -> FaultSpec | None:
        """Use up one hit of the first fault matching ``kind`` and return it."""
        spec = self.peek(kind)
        if spec is not None:
            spec.times -= 1
            if spec.times == 0:
                self._queue.remove(spec)
        return spec

    def clear(self) -> None:
        """Drop every queued fault."""
        self._queue.clear()

    def pending(self) -> list[FaultSpec]:
        """Return the faults still queued, in order."""
        return list(self._queue)
