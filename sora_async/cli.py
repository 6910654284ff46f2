"""The ``sora-async`` command line: generate, batch, status, balance, simulate.

``--simulate`` runs against an in-process fake service with every timing (the key's
60-s window, ~180-s generations, back-offs) divided by ``--time-scale``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import click
import msgspec
from rich.console import Console
from rich.live import Live
from rich.table import Table

from . import _models
from ._batch import BatchDefaults, BatchProgress, BatchReport, parse_shard, run_batch
from ._client import SoraClient
from ._errors import APIError, InputError, SoraError
from ._governor import Governor, LocalGovernor
from ._journal import ItemState
from ._models import ImageToVideo, Limits, TextToVideo, VideoRequest
from ._scheduler import PollPolicy
from ._transport import RetryPolicy

__all__ = ["main"]

_err = Console(stderr=True)
_out = Console()


def _fail(message: str, code: int = 2) -> NoReturn:
    _err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def scaled_client_options(
    scale: float, *, redis_url: str | None = None, api_key: str | None = None, model: str = ""
) -> dict[str, Any]:
    """Return SoraClient options with every timing divided by ``scale``.

    With ``redis_url`` the governor is a RedisGovernor shared by every process using
    the key. The jitter margin is not cut below 0.1 s: network delays do not scale.
    """
    limits = Limits(period=60.0 / scale)
    timings: dict[str, Any] = {
        "jitter_margin": max(1.0 / scale, 0.1) if scale != 1.0 else 1.0,
        "backoff_base": 1.0 / scale,
        "backoff_cap": 60.0 / scale,
    }
    governor: Governor
    if redis_url:
        from .redis_governor import RedisGovernor

        governor = RedisGovernor(
            redis_url,
            api_key=api_key,
            model=model or "sora-2-pro",
            limits=limits,
            lease=max(15.0 / scale, 3.0),
            uncertain_hold=600.0 / scale,
            **timings,
        )
    else:
        governor = LocalGovernor(limits, **timings)
    return {
        "limits": limits,
        "governor": governor,
        "poll_policy": PollPolicy(prior_mean=180.0 / scale, min_interval=2.0 / scale),
        "retry": RetryPolicy(
            base=0.5 / scale, cap=30.0 / scale, deadline=300.0 / scale, timeout=60.0 / scale
        ),
        "uncertain_hold": 600.0 / scale,
        "wait_timeout": 3600.0 / scale,
    }


@contextlib.asynccontextmanager
async def _client(params: dict[str, Any]) -> AsyncIterator[SoraClient]:
    """Open a client on the real service, or on an in-process fake with ``--simulate``."""
    scale = params["time_scale"]
    options: dict[str, Any] = {}
    if scale != 1.0 or params["redis_url"]:
        options = scaled_client_options(
            scale, redis_url=params["redis_url"], api_key=params["api_key"], model=params["model"]
        )
    if not params["simulate"]:
        async with SoraClient(
            api_key=params["api_key"], base_url=params["base_url"], model=params["model"], **options
        ) as client:
            yield client
        return
    from .testing import FakeApixo, lognormal

    async with (
        FakeApixo(
            period=60.0 / scale,
            generation_time=lognormal(180.0 / scale, 0.35),
            pending_time=2.0 / scale,
            balance=1e9,
            seed=int(time.time()),
        ) as fake,
        SoraClient(api_key=fake.api_key, base_url=fake.url, **options) as client,
    ):
        yield client


def _run(params: dict[str, Any], work: Callable[[SoraClient], Coroutine[Any, Any, int]]) -> None:
    async def go() -> int:
        async with _client(params) as client:
            return await work(client)

    try:
        code = asyncio.run(go())
    except InputError as exc:
        _fail(str(exc))
    except APIError as exc:
        _fail(f"the service refused: {exc}", 1)
    except SoraError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", 130)
    sys.exit(code)


def _common(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--api-key", envvar="APIXO_API_KEY", help="API key [env APIXO_API_KEY]"),
        click.option("--base-url", envvar="APIXO_BASE_URL", help="[env APIXO_BASE_URL]"),
        click.option("--model", default="sora-2-pro", show_default=True),
        click.option("--simulate", is_flag=True, help="Use a built-in fake service."),
        click.option(
            "--time-scale",
            type=click.FloatRange(min=1.0),
            default=None,
            help="Divide every timing by this (default 20 with --simulate, else 1).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
        click.option(
            "--redis-url",
            envvar="SORA_ASYNC_REDIS_URL",
            help="Share the key's limits with every process using this Redis "
            "[env SORA_ASYNC_REDIS_URL].",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _params(kwargs: dict[str, Any]) -> dict[str, Any]:
    scale = kwargs.pop("time_scale")
    names = ("api_key", "base_url", "model", "simulate", "as_json", "redis_url")
    params = {k: kwargs.pop(k) for k in names}
    params["time_scale"] = scale if scale is not None else (20.0 if params["simulate"] else 1.0)
    if not params["simulate"] and not params["api_key"]:
        _fail("no API key: set APIXO_API_KEY or pass --api-key (or try --simulate)")
    return params


_media_options = [
    click.option("--duration", type=int, help="Seconds (4, 8, 10, 12 or 15)."),
    click.option("--size", type=click.Choice(_models.SIZES), help="Text-to-video frame size."),
    click.option("--resolution", type=click.Choice(_models.RESOLUTIONS), help="Image-to-video."),
]


@click.group()
@click.version_option(package_name="sora-async")
def cli() -> None:
    """Generate Sora 2 Pro videos through the APIXO task API, inside the key's limits."""


@cli.command()
@click.argument("prompt")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("."))
@click.option("--image-url", "image_urls", multiple=True, help="Animate this image (repeatable).")
@_common
def generate(prompt: str, out: Path, image_urls: tuple[str, ...], **kwargs: Any) -> None:
    """Generate one video from PROMPT and save it in the output folder."""
    params = _params(kwargs)
    fields = {k: v for k, v in kwargs.items() if v is not None}
    try:
        request: VideoRequest = (
            ImageToVideo(prompt=prompt, image_urls=image_urls, **fields)
            if image_urls
            else TextToVideo(prompt=prompt, **fields)
        )
    except InputError as exc:
        _fail(str(exc))

    async def work(client: SoraClient) -> int:
        with _err.status("generating..."):
            video = await client.generate(request)
            path = await client.download(video, out)
        if params["as_json"]:
            _out.print_json(json.dumps({"task_id": video.task_id, "file": str(path)}))
        else:
            _out.print(f"{path}  (task {video.task_id})", highlight=False)
        return 0

    _run(params, work)


for _option in reversed(_media_options):
    generate = _option(generate)


def _progress_line(progress: BatchProgress) -> str:
    order = [state.value for state in ItemState]
    counts = " · ".join(
        f"{state} {progress.counts[state]}" for state in order if progress.counts.get(state)
    )
    eta = f"{progress.eta_seconds / 60:.1f} min" if progress.eta_seconds else "-"
    return (
        f"{progress.total} items: {counts} | slots {progress.slots_in_use}/{progress.slot_limit}"
        f" | {progress.requests_last_period} requests in the last minute | ETA {eta}"
    )


def _summary(report: BatchReport) -> Table:
    table = Table(caption=f"in {report.seconds:.1f} s", caption_justify="left")
    for column in ("state", "items"):
        table.add_column(column)
    for state in ItemState:
        if report.counts.get(state.value):
            table.add_row(state.value, str(report.counts[state.value]))
    return table


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option(
    "--journal", type=click.Path(path_type=Path), help="Default: OUTPUT/.sora-async-journal.sqlite"
)
@click.option(
    "--resubmit-uncertain", is_flag=True, help="Create again items whose create may have succeeded."
)
@click.option(
    "--shard",
    metavar="K/N",
    help="Take only the K-th of N shares of FILE (hosts sharing one file and one key).",
)
@_common
def batch(
    file: Path,
    out: Path,
    journal: Path | None,
    resubmit_uncertain: bool,
    shard: str | None,
    **kwargs: Any,
) -> None:
    """Generate every prompt of FILE (JSONL, or one prompt a line) into the output folder.

    Safe to stop at any moment: the same command resumes without paying twice.
    """
    params = _params(kwargs)
    defaults = BatchDefaults(**{k: kwargs.pop(k) for k in ("duration", "size", "resolution")})
    try:
        share = parse_shard(shard) if shard is not None else None
    except InputError as exc:
        _fail(str(exc))

    async def work(client: SoraClient) -> int:
        interactive = _err.is_terminal and not params["as_json"]
        live = Live(console=_err, refresh_per_second=4) if interactive else None
        last_line = [0.0]

        def show(progress: BatchProgress) -> None:
            if live is not None:
                live.update(_progress_line(progress))
            elif not params["as_json"] and time.monotonic() - last_line[0] > 2.0:
                last_line[0] = time.monotonic()
                _err.print(_progress_line(progress), highlight=False, soft_wrap=True)

        with live if live is not None else contextlib.nullcontext():
            report = await run_batch(
                client,
                file,
                out,
                journal=journal,
                defaults=defaults,
                resubmit_uncertain=resubmit_uncertain,
                on_progress=show,
                shard=share,
            )
        if params["as_json"]:
            summary = {"ok": report.ok, "counts": report.counts, "manifest": str(report.manifest)}
            _out.print_json(json.dumps(summary))
        else:
            _out.print(_summary(report))
            _out.print(f"manifest: {report.manifest}", highlight=False)
        return 0 if report.ok else 1

    _run(params, work)


for _option in reversed(_media_options):
    batch = _option(batch)


@cli.command()
@click.argument("task_id")
@_common
def status(task_id: str, **kwargs: Any) -> None:
    """Show a task's status."""
    params = _params(kwargs)

    async def work(client: SoraClient) -> int:
        found = await client.status(task_id)
        if params["as_json"]:
            _out.print_json(msgspec.json.encode(found).decode())
        else:
            urls = " ".join(found.result_urls)
            detail = urls or f"{found.fail_code or ''} {found.fail_msg or ''}".strip()
            _out.print(f"{found.task_id}: {found.state.value} {detail}", highlight=False)
        return 0

    _run(params, work)


@cli.command()
@_common
def balance(**kwargs: Any) -> None:
    """Show the key's remaining balance in USD."""
    params = _params(kwargs)

    async def work(client: SoraClient) -> int:
        usd = await client.balance()
        _out.print(json.dumps({"usd": usd}) if params["as_json"] else f"{usd:.2f} USD")
        return 0

    _run(params, work)


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def simulate(args: tuple[str, ...]) -> None:
    """Serve the fake service on loopback (options: simulate --help)."""
    from .testing import main as serve_fake

    sys.exit(serve_fake(list(args)))


def main() -> None:
    """Run the command line."""
    cli()
