"""Limits per model: each (key, model) its own budget by default, shared on request,
and generation times learned per model."""

from __future__ import annotations

import pytest

import sora_async as sa
from sora_async._cli_run import scaled_client_options
from sora_async.testing import FakeApixo, fixed

pytestmark = pytest.mark.looptime


def requests(count: int) -> list[sa.TextToVideo | sa.Veo31 | sa.NanoBanana]:
    """Return ``count`` requests cycling through Sora 2 Pro, Veo 3.1 and Nano Banana."""
    made: list[sa.TextToVideo | sa.Veo31 | sa.NanoBanana] = []
    for i in range(count):
        if i % 3 == 0:
            made.append(sa.TextToVideo(prompt=f"sora {i}"))
        elif i % 3 == 1:
            made.append(sa.Veo31(prompt=f"veo {i}", mode="fast"))
        else:
            made.append(sa.NanoBanana(prompt=f"banana {i}"))
    return made


def test_the_table_gives_each_model_its_limits() -> None:
    """Documented figures where a page states them, the Sora figures elsewhere, overridable."""
    client = sa.SoraClient(
        api_key="k",
        base_url="http://127.0.0.1:9/api/v1",
        model_limits={"veo-3-1": sa.Limits(requests=30, concurrent_tasks=3)},
    )
    assert client.governor_for("ltx-2-19b").slot_limit == 1000
    assert client.governor_for("veo-3-1").slot_limit == 3
    assert client.governor_for("wan-2-5").slot_limit == 10
    assert client.governor_for("some-new-model").slot_limit == 10
    assert client.governor_for("veo-3-1") is not client.governor
    assert sa.MODELS["ltx-2-19b"].limits_documented
    assert not sa.MODELS["veo-3-1"].limits_documented


async def test_each_model_gets_a_governor_of_the_default_kind_and_settings() -> None:
    """A model's own governor is made by the client's governor: a LocalGovernor with its
    settings and the model's own limits (the create reserve kept below the model's
    requests, so a small model_limits is no error)."""
    default = sa.LocalGovernor(
        sa.Limits(requests=30, period=6.0, concurrent_tasks=4),
        jitter_margin=0.3,
        learn_margin=False,
        create_reserve=5,
    )
    veo_limits = sa.Limits(requests=4, period=6.0, concurrent_tasks=2)
    client = sa.SoraClient(
        api_key="k",
        base_url="http://127.0.0.1:9/api/v1",
        governor=default,
        model_limits={"veo-3-1": veo_limits},
    )
    veo = client.governor_for("veo-3-1")
    banana = client.governor_for("nano-banana")
    assert isinstance(veo, sa.LocalGovernor)
    assert isinstance(banana, sa.LocalGovernor)
    assert len({id(default), id(veo), id(banana)}) == 3
    assert veo.limits == veo_limits
    assert banana.limits == sa.Limits()
    assert veo.jitter_margin == banana.jitter_margin == 0.3  # not learned: as given


async def test_the_clis_time_scale_reaches_every_models_lane() -> None:
    """The CLI's --time-scale options (scaled_client_options) give every model of the
    catalogue its own limits over the scaled window and the scaled timings, not only
    --model's."""
    options = scaled_client_options(30.0)
    client = sa.SoraClient(api_key="k", base_url="http://127.0.0.1:9/api/v1", **options)
    for model in ("sora-2-pro", "veo-3-1", "nano-banana", "ltx-2-19b"):
        governor = client.governor_for(model)
        assert isinstance(governor, sa.LocalGovernor)
        assert governor.limits.period == 2.0
        assert governor.jitter_margin == 0.1
    assert client.governor_for("ltx-2-19b").limits.concurrent_tasks == 1000


async def test_each_model_stays_inside_its_own_limits() -> None:
    """One client drives three models at once: each fills its own slots and window,
    none is held to another's, and the server sends no 429."""
    async with FakeApixo(
        generation_time=fixed(120.0),
        generation_times={"nano-banana": fixed(15.0)},
        model_limits={"veo-3-1": (30, 3)},
        balance=1e6,
    ) as fake:
        async with sa.SoraClient(
            api_key=fake.api_key,
            base_url=fake.url,
            model_limits={"veo-3-1": sa.Limits(requests=30, concurrent_tasks=3)},
        ) as client:
            outcomes = [o async for o in client.generate_many(requests(60))]
        stats = fake.stats
    assert all(outcome.ok for outcome in outcomes)
    assert stats.rate_limited == 0
    assert stats.max_concurrent_tasks_by_model["veo-3-1"] == 3
    assert stats.max_concurrent_tasks_by_model["sora-2-pro"] == 10
    assert stats.max_concurrent_tasks_by_model["nano-banana"] <= 10
    assert stats.max_requests_in_window_by_model["veo-3-1"] <= 30
    assert max(stats.max_requests_in_window_by_model.values()) <= 60
    # Separate budgets: more tasks at once than one model's slots allow.
    assert stats.max_concurrent_tasks > 10


async def test_models_can_share_one_budget() -> None:
    """With shared_budget, every model spends the one governor: a server that counts the
    key as a whole (limits_per="key") never sees more than its limits."""
    async with FakeApixo(generation_time=fixed(60.0), limits_per="key", balance=1e6) as fake:
        async with sa.SoraClient(
            api_key=fake.api_key, base_url=fake.url, shared_budget=True
        ) as client:
            assert client.governor_for("veo-3-1") is client.governor
            outcomes = [o async for o in client.generate_many(requests(45))]
        stats = fake.stats
    assert all(outcome.ok for outcome in outcomes)
    assert stats.rate_limited == 0
    assert stats.max_concurrent_tasks == 10
    assert stats.max_requests_in_window <= 60


async def test_one_governor_given_to_several_models_is_shared() -> None:
    """The same governor named for two models serves both (it runs once)."""
    shared = sa.LocalGovernor(sa.Limits(requests=60, concurrent_tasks=4))
    async with FakeApixo(generation_time=fixed(60.0), limits_per="key", balance=1e6) as fake:
        async with sa.SoraClient(
            api_key=fake.api_key,
            base_url=fake.url,
            governor=shared,
            governors={"veo-3-1": shared, "nano-banana": shared},
        ) as client:
            outcomes = [o async for o in client.generate_many(requests(24))]
        stats = fake.stats
    assert all(outcome.ok for outcome in outcomes)
    assert stats.max_concurrent_tasks == 4
    assert stats.rate_limited == 0


async def test_generation_times_are_learned_per_model() -> None:
    """A 15-s image model and a 180-s video model each get their own distribution."""
    async with (
        FakeApixo(
            generation_time=fixed(180.0), generation_times={"nano-banana": fixed(15.0)}, balance=1e6
        ) as fake,
        sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client,
    ):
        outcomes = [o async for o in client.generate_many(requests(30))]
        images = client.scheduler_for("nano-banana").times
        videos = client.scheduler_for("sora-2-pro").times
    assert all(outcome.ok for outcome in outcomes)
    assert images.count == 10
    assert videos.count == 10
    assert images.mean < 30 < 150 < videos.mean


async def test_ltx_runs_at_its_own_far_larger_limits() -> None:
    """ltx-2-19b's page states 10,000 requests a minute and 1,000 tasks: the fake serves
    it so by default, and the client's table lets 40 of its tasks run at once."""
    async with FakeApixo(generation_time=fixed(60.0), balance=1e6) as fake:
        assert fake.limits_of("ltx-2-19b") == (10000, 1000)
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            raw = [sa.RawInput(model="ltx-2-19b", input={"prompt": f"p{i}"}) for i in range(40)]
            outcomes = [o async for o in client.generate_many(raw)]
        stats = fake.stats
    assert all(outcome.ok for outcome in outcomes)
    assert stats.max_concurrent_tasks_by_model["ltx-2-19b"] == 40
    assert stats.rate_limited == 0
