"""Money: a spend cap checked before every create, in one process and across processes
on one Redis; judged by what the fake service billed and counted."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest

import sora_async as sa
from sora_async.testing import FakeApixo, RedisServer, fixed
from tests.workers import scaled_fake, start_worker, top, write_prompts

pytestmark = pytest.mark.looptime

# What one of these test videos costs: the fake bills it, the client's prices say it.
VIDEO_USD = 1.5


def write_videos(path: Path, count: int) -> Path:
    lines = (
        json.dumps({"id": f"clip-{n:03d}", "prompt": f"clip {n}", "duration": 10})
        for n in range(count)
    )
    path.write_text("\n".join(lines) + "\n")
    return path


def billing_fake(balance: float = 1000.0) -> FakeApixo:
    """The fake at the real limits, billing VIDEO_USD a Sora 2 Pro video that succeeds."""
    return FakeApixo(
        generation_time=fixed(120.0), balance=balance, prices={"sora-2-pro": VIDEO_USD}
    )


def capped(fake: FakeApixo, cap: float) -> sa.SoraClient:
    return sa.SoraClient(
        api_key=fake.api_key,
        base_url=fake.url,
        spend_cap=cap,
        prices={"sora-2-pro": sa.Price(VIDEO_USD)},
    )


async def test_a_capped_batch_stops_within_the_cap_and_a_higher_cap_finishes_it(
    tmp_path: Path,
) -> None:
    """50 videos with a cap of 20 videos' worth: 20 are made and saved, the other 30
    stay queued and nothing more is sent; the same batch with a cap of 50 videos'
    worth makes the other 30, none twice, and the fake billed no more than the caps."""
    prompts = write_videos(tmp_path / "prompts.jsonl", 50)
    out = tmp_path / "out"
    async with billing_fake() as fake:
        async with capped(fake, 20 * VIDEO_USD) as client:
            with pytest.raises(sa.BudgetExceededError) as caught:
                await sa.run_batch(client, prompts, out)
            creates = fake.stats.creates
            assert creates == 20
            assert caught.value.cap == 20 * VIDEO_USD
            assert caught.value.spent == pytest.approx(20 * VIDEO_USD)
        assert fake.stats.creates == creates  # nothing after the stop
        assert 1000.0 - fake.balance <= 20 * VIDEO_USD + 1e-9
        rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        states = [row["state"] for row in rows]
        assert states.count("downloaded") == 20
        assert states.count("queued") == 30
        async with capped(fake, 50 * VIDEO_USD) as client:
            report = await sa.run_batch(client, prompts, out)
        assert report.ok
        # The run's spend: as the prices estimate it, and as the balance fell.
        assert report.spend_estimated == pytest.approx(30 * VIDEO_USD)
        assert report.spend_measured == pytest.approx(30 * VIDEO_USD)
        assert fake.stats.creates == 50
        assert set(fake.stats.creates_per_prompt.values()) == {1}
        assert 1000.0 - fake.balance <= 50 * VIDEO_USD + 1e-9


async def test_a_create_past_the_cap_is_refused_before_any_request() -> None:
    """submit() past the cap raises BudgetExceededError naming the cap, the spend and
    the estimate, and sends nothing; a failed task gives its reservation back, a
    succeeded one keeps it as spend."""
    async with billing_fake() as fake, capped(fake, 2 * VIDEO_USD) as client:
        made = await client.submit(sa.TextToVideo(prompt="one", duration=10))
        failing = await client.submit(sa.TextToVideo(prompt="two [fail:BOOM]", duration=10))
        sent = fake.stats.requests
        with pytest.raises(sa.BudgetExceededError) as caught:
            await client.submit(sa.TextToVideo(prompt="three", duration=10))
        assert (caught.value.cap, caught.value.estimate) == (2 * VIDEO_USD, VIDEO_USD)
        assert caught.value.spent == pytest.approx(2 * VIDEO_USD)
        assert fake.stats.requests == sent
        await client.wait(made)
        with pytest.raises(sa.TaskFailedError):
            await client.wait(failing)
        assert await client.spend() == (pytest.approx(VIDEO_USD), 0.0, 2 * VIDEO_USD)
        seen = client.snapshot()
        assert (seen.spent_usd, seen.held_usd, seen.spend_cap) == (VIDEO_USD, 0.0, 2 * VIDEO_USD)
        await client.wait(await client.submit(sa.TextToVideo(prompt="four", duration=10)))
    assert fake.stats.creates == 3
    assert fake.balance == pytest.approx(1000.0 - 2 * VIDEO_USD)  # the failed one is free


async def test_an_unpriced_model_under_a_cap_is_refused_naming_prices() -> None:
    async with billing_fake() as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url, spend_cap=10) as client:
            with pytest.raises(sa.InputError) as caught:
                await client.submit(sa.RawInput(model="ltx-2-19b", input={"prompt": "x"}))
            # Sora 2 Pro's pages state no price: it needs one too.
            with pytest.raises(sa.InputError):
                await client.submit(sa.TextToVideo(prompt="x", duration=10))
        assert caught.value.field == "prices"
        assert fake.stats.requests == 0


@pytest.mark.looptime(False)
@pytest.mark.timeout(120)
async def test_three_hosts_on_one_redis_share_one_cap(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Three `sora-async batch --redis-url --max-spend` processes of one batch of 60:
    the cap of 12 videos' worth is one budget on Redis, so together they make 12
    videos, billed within the cap; each stops with exit code 4, the rest queued."""
    video_usd = 3.0  # what the scaled fake bills a 10-s video
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"sora-2-pro": video_usd}))
    prompts = write_prompts(tmp_path, 60)
    async with scaled_fake(seed=7, api_key=secrets.token_hex(8)) as fake:
        balance = fake.balance
        hosts = [
            await start_worker(
                fake,
                redis_server.url,
                prompts,
                tmp_path / f"out-{n}",
                None,
                *("--host", f"m{n}", "--batch", "capped"),  # its own batch on the session's Redis
                *("--max-spend", str(12 * video_usd), "--prices", str(prices)),
            )
            for n in range(3)
        ]
        results = [await host.communicate() for host in hosts]
        outcomes = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in results]
        assert [outcome["exit_code"] for outcome in outcomes] == [4, 4, 4], results
        assert {outcome["error"] for outcome in outcomes} == {"BudgetExceededError"}
        assert fake.stats.creates == 12
        assert balance - fake.balance <= 12 * video_usd + 1e-9
        assert fake.stats.rate_limited == 0
        # `sora-async top` shows the one budget: every reservation kept as spend.
        budgets = (await top(redis_server.url, fake.api_key))["spend"]
        assert list(budgets.values()) == [{"spent_usd": 12 * video_usd, "held_usd": 0.0}]


def test_estimates_follow_the_pages_and_the_users_prices() -> None:
    """The catalogue's prices as the pages state them, by mode where they differ; the
    user's prices override them; a model without one is unpriced."""
    fast = sa.estimate(sa.Veo31(prompt="kite", mode="fast"))
    assert fast is not None
    assert (fast.model, fast.low, fast.high) == ("veo-3-1", 0.20, 0.20)
    either = sa.estimate(sa.RawInput(model="veo-3-1", input={"prompt": "kite"}))
    assert either is not None
    assert (either.low, either.high) == (0.20, 1.50)
    sora = sa.estimate(sa.Sora2(prompt="kite"))
    assert sora is not None
    assert (sora.low, sora.high) == (0.10, 0.15)
    assert sa.estimate(sa.TextToVideo(prompt="kite")) is None
    mine = sa.estimate(sa.TextToVideo(prompt="kite"), {"sora-2-pro": sa.Price(1.0, 1.5)})
    assert mine is not None
    assert (mine.low, mine.high) == (1.0, 1.5)
    # Wan 2.5 by the second and by resolution, 5 s and 720p unless the request says.
    wan = sa.estimate(sa.Wan25(prompt="kite"))
    assert wan is not None
    assert (wan.low, wan.high) == (0.40, 0.40)
    wan_hd = sa.estimate(sa.Wan25(prompt="kite", resolution="1080p", duration=10))
    assert wan_hd is not None
    assert wan_hd.high == pytest.approx(1.30)
    assert sa.MODELS["veo-3-1"].price == sa.Price(
        0.20, 1.50, rates={"fast": (0.20, 0.20), "quality": (1.50, 1.50)}
    )
    per_second = {"sora-2-pro": sa.Price(0.1, unit="second")}
    twelve = sa.estimate(sa.TextToVideo(prompt="kite", duration=12), per_second)
    assert twelve is not None
    assert twelve.high == pytest.approx(1.2)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[1]", "prices"),
        ('{"sora-2-pro": -1}', "prices.sora-2-pro.low"),
        ('{"sora-2-pro": {"low": 2, "high": 1}}', "prices.sora-2-pro.high"),
        ('{"sora-2-pro": {"low": 1, "per": "video"}}', "prices.sora-2-pro"),
        ('{"veo-3-1": {"low": 1, "rates": {"fast": 1}}}', "prices.veo-3-1.rates"),
        (
            '{"veo-3-1": {"low": 1, "rates": {"fast": [1, 2]}, "default": "slow"}}',
            "prices.veo-3-1.default",
        ),
        ("not json", "prices"),
    ],
)
def test_a_bad_price_file_names_the_entry_and_the_rule(
    tmp_path: Path, text: str, field: str
) -> None:
    path = tmp_path / "prices.json"
    path.write_text(text)
    with pytest.raises(sa.InputError) as caught:
        sa.load_prices(path)
    assert caught.value.field == field


@pytest.mark.looptime(False)
async def test_a_dry_run_checks_every_line_sends_nothing_and_sums_each_model(
    tmp_path: Path,
) -> None:
    """`batch --dry-run --json` on a file mixing four models: the fake sees no request
    (one with --balance), and the totals are the pages' prices: 2 Veo 3.1 fast and 1
    quality (1.90), 3 Sora 2 (0.30-0.45), 1 Nano Banana (0.03), 2 Sora 2 Pro unpriced.
    With --limits, a model's time follows the limits given."""
    lines = [
        *({"model": "veo-3-1", "prompt": f"veo {n}", "mode": "fast"} for n in range(2)),
        {"model": "veo-3-1", "prompt": "veo q", "mode": "quality"},
        *({"model": "sora-2", "prompt": f"sora {n}"} for n in range(3)),
        {"model": "nano-banana", "prompt": "a banana"},
        *({"prompt": f"pro {n}", "duration": 10} for n in range(2)),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    async with FakeApixo() as fake:

        async def dry_run(*extra: str) -> dict[str, Any]:
            command = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "sora_async", "batch", str(path), "-o", str(tmp_path)),
                *("--dry-run", "--json", "--base-url", fake.url, "--api-key", fake.api_key),
                *extra,
                stdout=asyncio.subprocess.PIPE,
            )
            printed, _ = await command.communicate()
            assert command.returncode == 0, printed
            found: dict[str, Any] = json.loads(printed)["dry_run"]
            return found

        summary = await dry_run()
        assert fake.stats.requests == 0
        with_balance = await dry_run("--balance")
        assert fake.stats.requests == 1
        one_veo_slot = await dry_run("--limits", "veo-3-1=60/60/1")
    assert (summary["items"], summary["unpriced"]) == (9, 2)
    assert summary["low_usd"] == pytest.approx(1.90 + 0.30 + 0.03)
    assert summary["high_usd"] == pytest.approx(1.90 + 0.45 + 0.03)
    assert summary["models"]["veo-3-1"]["items"] == 3
    assert summary["models"]["sora-2-pro"]["unpriced"] == 2
    assert with_balance["balance_usd"] == fake.balance
    # The key's own limits (--limits) set the time: Veo 3.1's three items on one slot
    # take about ten times as long as on the catalogue's ten; the other models as before.
    veo_hours = summary["models"]["veo-3-1"]["hours"]
    assert one_veo_slot["models"]["veo-3-1"]["hours"] == pytest.approx(10 * veo_hours, rel=0.1)
    assert one_veo_slot["models"]["sora-2"] == summary["models"]["sora-2"]
    assert not list(tmp_path.glob("*.mp4"))


async def test_keep_balance_stops_creates_before_the_balance_falls_below_it() -> None:
    """keep_balance reads the balance when the client opens (one request) and caps the
    spend at what lies above it: with $10.00 and $5.50 to keep, three $1.50 videos
    are made and the fourth is not sent; the fake's balance ends above $5.50."""
    async with (
        billing_fake(balance=10.0) as fake,
        sa.SoraClient(
            api_key=fake.api_key,
            base_url=fake.url,
            keep_balance=5.5,
            prices={"sora-2-pro": sa.Price(VIDEO_USD)},
        ) as client,
    ):
        assert fake.stats.requests_by_kind["balance"] == 1
        made = [
            await client.submit(sa.TextToVideo(prompt=f"keep {n}", duration=10)) for n in range(3)
        ]
        with pytest.raises(sa.BudgetExceededError) as caught:
            await client.submit(sa.TextToVideo(prompt="one too many", duration=10))
        assert caught.value.cap == pytest.approx(4.5)
        for task_id in made:
            await client.wait(task_id)
    assert fake.stats.creates == 3
    assert fake.balance == pytest.approx(10.0 - 3 * VIDEO_USD)


async def test_a_balance_falling_faster_than_the_estimate_corrects_the_rest_of_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's price is half what the fake bills: the balance read a minute in
    shows it, the client warns once, counts the measured spend against the cap and
    reserves twice the estimate from then on; the fake billed no more than the cap."""
    prompts = write_videos(tmp_path / "prompts.jsonl", 40)
    async with FakeApixo(
        generation_time=fixed(120.0), balance=1000.0, prices={"sora-2-pro": 2 * VIDEO_USD}
    ) as fake:
        async with capped(fake, 20 * VIDEO_USD) as client:
            with pytest.raises(sa.BudgetExceededError):
                await sa.run_batch(client, prompts, tmp_path / "out", balance_every=60.0)
            assert client.spending.price_factor == pytest.approx(2.0)
        assert fake.stats.creates == 10
        assert 1000.0 - fake.balance <= 20 * VIDEO_USD + 1e-9
    warnings = [r for r in caplog.records if "the balance fell by" in r.getMessage()]
    assert len(warnings) == 1
