"""The events a metrics exporter may record (see sora_async.otel); none by default."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Recorder"]


class Recorder(Protocol):
    """Take the client's events as they happen. Calls must be cheap and must not raise."""

    def request(self, kind: str, model: str, outcome: str, permit_wait: float) -> None:
        """Record one request attempt: ``outcome`` is "ok", "rate_limited" or an error name."""

    def task_ended(
        self,
        model: str,
        state: str,
        fail_code: str | None,
        generation: float | None,
        detection_delay: float | None,
    ) -> None:
        """Record a task seen to end, with its generation time and how late we saw it."""

    def spent(self, model: str, usd: float) -> None:
        """Record a task's estimated price, kept as spend once it succeeded (a spend cap
        is set)."""
