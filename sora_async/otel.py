"""OpenTelemetry metrics for a SoraClient (extra ``sora-async[otel]``: opentelemetry-api).

Nothing here is imported by ``sora_async`` itself: without this module a client
records nothing and pays nothing. :func:`instrument` makes the instruments on a
meter of the given (or the global) ``MeterProvider``; the application chooses the
SDK and the exporter (Prometheus, OTLP, ...).

Instruments (unit; attributes: ``sora_async.model``, plus those named):

- ``sora_async.requests`` ({request}) counter of attempts sent, by
  ``sora_async.request.kind`` and ``sora_async.outcome`` ("ok", "rate_limited", an error)
- ``sora_async.requests.rate_limited`` ({request}) counter of 429s, by kind
- ``sora_async.tasks.created`` ({task}) counter of creates answered with a task
- ``sora_async.tasks.ended`` ({task}) counter of tasks seen to end, by
  ``sora_async.task.state`` and ``sora_async.task.fail_code``
- ``sora_async.spend`` (USD) counter of the estimated price of tasks that succeeded
  (with a ``spend_cap``: the price the cap counted), by model
- ``sora_async.permit.wait`` (s) histogram of the wait for the governor's permit, by kind
- ``sora_async.generation.duration`` (s) histogram of the service's generation times
- ``sora_async.detection.delay`` (s) histogram of the time from a task's end to our seeing it
- gauges read from :meth:`SoraClient.snapshot`: ``sora_async.slots.usage`` and
  ``sora_async.slots.limit`` ({slot}), ``sora_async.slots.waiters`` ({request}),
  ``sora_async.requests.window.usage`` and ``sora_async.requests.window.limit``
  ({request}), ``sora_async.rate_factor`` (1), ``sora_async.tasks.in_flight`` ({task})

Example::

    from opentelemetry.sdk.metrics import MeterProvider
    import sora_async.otel

    async with sa.SoraClient() as client:
        sora_async.otel.instrument(client, meter_provider=MeterProvider(metric_readers=[...]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics

from . import __version__ as _version
from ._client import SoraClient
from ._snapshot import ModelSnapshot

__all__ = ["instrument"]

_GAUGES: tuple[tuple[str, str, str, Callable[[ModelSnapshot], float]], ...] = (
    ("sora_async.slots.usage", "{slot}", "Task slots taken", lambda s: s.slots_in_use),
    (
        "sora_async.slots.limit",
        "{slot}",
        "Task slots that may be taken now",
        lambda s: s.slot_limit,
    ),
    (
        "sora_async.slots.waiters",
        "{request}",
        "Creates waiting for a slot",
        lambda s: s.slot_waiters,
    ),
    (
        "sora_async.requests.window.usage",
        "{request}",
        "Requests in the last window",
        lambda s: s.requests_in_window,
    ),
    (
        "sora_async.requests.window.limit",
        "{request}",
        "Nominal requests per window",
        lambda s: s.request_limit,
    ),
    ("sora_async.rate_factor", "1", "Share of the nominal rate in force", lambda s: s.rate_factor),
    (
        "sora_async.tasks.in_flight",
        "{task}",
        "Tasks tracked, not yet seen to end",
        lambda s: s.tasks_in_flight,
    ),
)


class _Metrics:
    """Record a client's events on OpenTelemetry instruments."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._requests = meter.create_counter(
            "sora_async.requests", unit="{request}", description="API request attempts sent"
        )
        self._rate_limited = meter.create_counter(
            "sora_async.requests.rate_limited", unit="{request}", description="429s answered"
        )
        self._created = meter.create_counter(
            "sora_async.tasks.created", unit="{task}", description="Tasks created"
        )
        self._ended = meter.create_counter(
            "sora_async.tasks.ended", unit="{task}", description="Tasks seen to end"
        )
        self._spend = meter.create_counter(
            "sora_async.spend", unit="USD", description="Estimated spend of tasks that succeeded"
        )
        self._permit_wait = meter.create_histogram(
            "sora_async.permit.wait", unit="s", description="Wait for the governor's permit"
        )
        self._generation = meter.create_histogram(
            "sora_async.generation.duration", unit="s", description="Generation time"
        )
        self._detection = meter.create_histogram(
            "sora_async.detection.delay", unit="s", description="From a task's end to seeing it"
        )

    def request(self, kind: str, model: str, outcome: str, permit_wait: float) -> None:
        attributes = {"sora_async.request.kind": kind, "sora_async.model": model}
        self._requests.add(1, {**attributes, "sora_async.outcome": outcome})
        self._permit_wait.record(permit_wait, {"sora_async.request.kind": kind})
        if outcome == "rate_limited":
            self._rate_limited.add(1, attributes)
        elif outcome == "ok" and kind == "create":
            self._created.add(1, {"sora_async.model": model})

    def spent(self, model: str, usd: float) -> None:
        self._spend.add(usd, {"sora_async.model": model})

    def task_ended(
        self,
        model: str,
        state: str,
        fail_code: str | None,
        generation: float | None,
        detection_delay: float | None,
    ) -> None:
        attributes = {"sora_async.model": model, "sora_async.task.state": state}
        if fail_code:
            attributes["sora_async.task.fail_code"] = fail_code
        self._ended.add(1, attributes)
        if generation is not None:
            self._generation.record(generation, {"sora_async.model": model})
        if detection_delay is not None:
            self._detection.record(detection_delay, {"sora_async.model": model})


def _gauge(
    client: SoraClient, read: Callable[[ModelSnapshot], float]
) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
    def observe(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for model, figures in client.snapshot().models.items():
            yield metrics.Observation(read(figures), {"sora_async.model": model})

    return observe


# Per priority: the same figures, one observation per model and priority.
_PRIORITY_GAUGES: tuple[tuple[str, str, str, Callable[[ModelSnapshot], dict[str, int]]], ...] = (
    (
        "sora_async.slots.usage.by_priority",
        "{slot}",
        "Task slots taken, by the priority they were taken at",
        lambda s: s.slots_by_priority,
    ),
    (
        "sora_async.slots.waiters.by_priority",
        "{request}",
        "Creates waiting for a slot, by priority",
        lambda s: s.slot_waiters_by_priority,
    ),
)


def _priority_gauge(
    client: SoraClient, read: Callable[[ModelSnapshot], dict[str, int]]
) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
    def observe(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for model, figures in client.snapshot().models.items():
            for priority, value in read(figures).items():
                attributes = {"sora_async.model": model, "sora_async.priority": priority}
                yield metrics.Observation(value, attributes)

    return observe


def instrument(client: SoraClient, *, meter_provider: metrics.MeterProvider | None = None) -> None:
    """Record ``client``'s requests, tasks and governor figures as OpenTelemetry metrics.

    Counters and histograms are recorded as events happen; gauges read
    :meth:`SoraClient.snapshot` when the reader collects. ``meter_provider``
    defaults to the global one. Call it once per client.
    """
    meter = metrics.get_meter("sora_async", _version, meter_provider=meter_provider)
    client._record(_Metrics(meter))
    for name, unit, description, read in _GAUGES:
        meter.create_observable_gauge(
            name, callbacks=[_gauge(client, read)], unit=unit, description=description
        )
    for name, unit, description, by in _PRIORITY_GAUGES:
        meter.create_observable_gauge(
            name, callbacks=[_priority_gauge(client, by)], unit=unit, description=description
        )
