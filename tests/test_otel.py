"""OpenTelemetry metrics: the documented instruments, read by the SDK's in-memory reader."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import sora_async as sa
import sora_async.otel
from sora_async.testing import FakeApixo, fixed

pytestmark = pytest.mark.looptime


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Return each metric's data points by name."""
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def total(found: dict[str, list[Any]], name: str, **attributes: str) -> float:
    """Sum a counter's points whose attributes include ``attributes``."""
    wanted = {f"sora_async.{key.replace('_', '.', 1)}": value for key, value in attributes.items()}
    return sum(p.value for p in found.get(name, []) if wanted.items() <= dict(p.attributes).items())


async def test_metrics_match_the_service_counters() -> None:
    """Requests by kind and outcome, 429s, creates, task ends by fail code, times and
    gauges appear under their documented names, with the service's counts."""
    reader = InMemoryMetricReader()
    async with FakeApixo(generation_time=fixed(60.0), balance=1e6) as fake:
        fake.inject("rate_limit", on="status", times=1, retry_after=0.0)
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            sora_async.otel.instrument(client, meter_provider=MeterProvider([reader]))
            requests = [sa.TextToVideo(prompt=f"metric {i}") for i in range(3)]
            requests.append(sa.TextToVideo(prompt="metric [fail:SensitiveContent]"))
            outcomes = [o async for o in client.generate_many(requests)]
            found = points(reader)
            seen = client.snapshot()  # read against the service in test_snapshot.py
        stats = fake.stats
    assert sum(o.ok for o in outcomes) == 3
    assert total(found, "sora_async.requests") == stats.requests
    assert (
        total(found, "sora_async.requests", request_kind="status")
        == stats.requests_by_kind["status"]
    )
    assert total(found, "sora_async.requests", outcome="rate_limited") == stats.rate_limited == 1
    assert total(found, "sora_async.requests.rate_limited") == 1
    assert total(found, "sora_async.tasks.created") == stats.creates == 4
    assert total(found, "sora_async.tasks.ended") == 4
    assert total(found, "sora_async.tasks.ended", task_fail_code="SensitiveContent") == 1
    (generation,) = found["sora_async.generation.duration"]
    assert (generation.count, generation.sum) == (4, pytest.approx(240.0))
    (detection,) = found["sora_async.detection.delay"]
    assert detection.count == 4
    assert sum(p.count for p in found["sora_async.permit.wait"]) == stats.requests
    gauges = {name: found[name][0].value for name in found if name.endswith(("usage", "limit"))}
    assert gauges == {
        "sora_async.slots.usage": seen.slots_in_use,
        "sora_async.slots.limit": seen.slot_limit,
        "sora_async.requests.window.usage": seen.requests_in_window,
        "sora_async.requests.window.limit": 60,
    }
    assert found["sora_async.rate_factor"][0].value == seen.rate_factor < 1.0
    assert found["sora_async.slots.waiters"][0].value == 0
    assert found["sora_async.tasks.in_flight"][0].value == 0


@pytest.mark.looptime(False)
def test_the_library_imports_no_opentelemetry() -> None:
    """Without sora_async.otel, importing and using the client loads no OpenTelemetry."""
    code = (
        "import sys, sora_async, sora_async.testing, sora_async.cli\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_the_spend_of_a_capped_client_is_counted_in_usd_by_model() -> None:
    """With a spend cap, each task that succeeded adds its estimated price to
    sora_async.spend; a failed one adds nothing, as the fake bills it nothing."""
    reader = InMemoryMetricReader()
    async with (
        FakeApixo(generation_time=fixed(60.0), balance=1e6) as fake,
        sa.SoraClient(
            api_key=fake.api_key,
            base_url=fake.url,
            spend_cap=100.0,
            prices={"sora-2-pro": sa.Price(2.5)},
        ) as client,
    ):
        sora_async.otel.instrument(client, meter_provider=MeterProvider([reader]))
        requests = [sa.TextToVideo(prompt=f"spend {i}") for i in range(3)]
        requests.append(sa.TextToVideo(prompt="spend [fail:BOOM]"))
        outcomes = [o async for o in client.generate_many(requests)]
        spent, held, _ = await client.spend()
        found = points(reader)
    assert sum(o.ok for o in outcomes) == 3
    assert (spent, held) == (7.5, 0.0)
    assert total(found, "sora_async.spend", model="sora-2-pro") == 7.5
