"""The ``sora-async`` command line: generate, batch, download, status, balance, top, simulate.

``--simulate`` runs against an in-process fake service with every timing (the key's
60-s window, ~180-s generations, back-offs) divided by ``--time-scale``. Outcomes,
exit codes and signals: see ``_cli_run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec
from rich.console import Group
from rich.live import Live
from rich.table import Column, Table

from . import _models
from ._batch import (
    BatchDefaults,
    BatchProgress,
    BatchReport,
    batch_name_of,
    journal_path,
    parse_shard,
    run_batch,
)
from ._batch_file import request_from
from ._catalog import MODELS, check_model_id, limits_for
from ._cli_run import Note, Stop, emit, fail, parse_limits, run
from ._cli_run import err as _err
from ._cli_run import out as _out
from ._client import SoraClient
from ._download import check_folder, file_stem
from ._dry_run import check_priced, dry_run_batch
from ._errors import InputError, SoraError
from ._governor import Governor
from ._journal import ItemState
from ._models import Limits
from ._prices import load_prices
from ._priority import PRIORITIES, Priority
from ._snapshot import Snapshot

if TYPE_CHECKING:  # Redis is an extra: _top is imported by `top` alone
    from ._top import WorkRow

__all__ = ["main"]


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
        click.option(
            "--limits",
            "limits",
            multiple=True,
            envvar="SORA_ASYNC_LIMITS",
            metavar="MODEL=REQUESTS/PERIOD/TASKS",
            help="A model's limits on your key, e.g. veo-3-1=120/60/20: requests per period"
            " (seconds) and tasks at once (repeatable) [env SORA_ASYNC_LIMITS, space-separated].",
        ),
        click.option(
            "--shared-budget",
            is_flag=True,
            envvar="SORA_ASYNC_SHARED_BUDGET",
            help="Put every model on one budget, the --model's: for a key whose limits "
            "span all models [env SORA_ASYNC_SHARED_BUDGET=1].",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _params(
    kwargs: dict[str, Any], *, simulate: bool = True, needs_key: bool = True
) -> dict[str, Any]:
    """Take the common options out of ``kwargs``; ``simulate``: whether a fresh fake
    service can answer this command at all; ``needs_key``: whether it sends requests."""
    scale = kwargs.pop("time_scale")
    names = ("api_key", "base_url", "model", "simulate", "as_json", "redis_url", "shared_budget")
    params = {k: kwargs.pop(k) for k in names}
    params["time_scale"] = scale if scale is not None else (20.0 if params["simulate"] else 1.0)
    as_json = params["as_json"]
    try:
        params["limits"] = parse_limits(kwargs.pop("limits"))
    except InputError as exc:
        fail(str(exc), as_json=as_json, field=exc.field)
    if params["simulate"] and not simulate:
        fail(
            "--simulate starts an empty fake service that knows no task and no balance;"
            " serve one with `sora-async simulate` and point APIXO_BASE_URL at it instead",
            as_json=as_json,
            field="simulate",
        )
    if needs_key and not params["simulate"] and not params["api_key"]:
        fail(
            "no API key: set APIXO_API_KEY or pass --api-key (or try --simulate)",
            as_json=as_json,
            field="api_key",
        )
    return params


_media_options = [
    click.option("--duration", type=int, help="Seconds (4, 8, 10, 12 or 15)."),
    click.option("--size", type=click.Choice(_models.SIZES), help="Text-to-video frame size."),
    click.option("--resolution", type=click.Choice(_models.RESOLUTIONS), help="Image-to-video."),
]


@click.group()
@click.version_option(package_name="sora-async")
def cli() -> None:
    """Generate videos and images through the APIXO task API, inside the key's limits."""


@cli.command()
@click.argument("prompt")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("."))
@click.option("--image-url", "image_urls", multiple=True, help="Animate this image (repeatable).")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Another input field of the model, named as `sora-async models` shows it or as on "
    "the wire (generation_type or generationType); VALUE as JSON, else text; repeatable.",
)
@_common
def generate(
    prompt: str, out: Path, image_urls: tuple[str, ...], settings: tuple[str, ...], **kwargs: Any
) -> None:
    """Generate from PROMPT on --model and save the result files in the output folder."""
    params = _params(kwargs)
    fields = {k: v for k, v in kwargs.items() if v is not None}
    fields["prompt"] = prompt
    if image_urls:
        fields["image_urls"] = list(image_urls)
    for pair in settings:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            fail(f"--set: {pair!r} must be FIELD=VALUE", as_json=params["as_json"], field="set")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value  # a bare word is a string
    if params["model"] != "sora-2-pro":
        fields["model"] = params["model"]
    try:
        request = request_from(fields, BatchDefaults())
        check_folder(out)  # before the create: never pay for a video with nowhere to go
    except InputError as exc:
        fail(str(exc), as_json=params["as_json"], field=exc.field)

    # A signal while the create is in flight waits for its answer, so that the task
    # (paid for) can be named.
    stop = Stop(cancel=True)

    async def work(client: SoraClient, note: Note) -> int:
        with _err.status("generating..."):
            task_id = await client.submit(
                request, before_create=stop.sending, after_no_task=stop.not_sent
            )
            note["task_id"] = task_id
            stop.answered()
            video = await client.wait(task_id)
            note["urls"] = list(video.urls)
        return await _save(client, video, out, note, params["as_json"])

    run(params, work, stop)


async def _save(
    client: SoraClient, video: _models.Result, out: Path, note: Note, as_json: bool
) -> int:
    """Download the video and print where it went; if that fails, say how to get it."""
    try:
        with _err.status("downloading..."):
            paths = await client.download_all(video, out)
    except SoraError as exc:
        fail(
            f"the video was made but not saved: {exc}; task {video.task_id}, result:"
            f" {' '.join(video.urls)}; fetch it with"
            f" `sora-async download {video.task_id} -o DIR` before the URL expires",
            1,
            as_json=as_json,
            error="NotSaved",
            **note,
        )
    files = [str(path) for path in paths]
    text = f"{files[0]}  (task {video.task_id})"
    emit(as_json, text, task_id=video.task_id, file=files[0], files=files, urls=list(video.urls))
    return 0


for _option in reversed(_media_options):
    generate = _option(generate)


def _progress_line(progress: BatchProgress, seen: Snapshot) -> str:
    order = [state.value for state in ItemState]
    counts = " · ".join(
        f"{state} {progress.counts[state]}" for state in order if progress.counts.get(state)
    )
    eta = f"{progress.eta_seconds / 60:.1f} min" if progress.eta_seconds else "-"
    # The snapshot's figures an operator acts on: 429s (someone else on the key), a rate
    # cut, and the generation time learned so far.
    pressure = (
        f" | 429s {seen.rate_limited} (rate x{seen.rate_factor:.2f})" if seen.rate_limited else ""
    )
    return (
        f"{progress.total} items: {counts} | slots {progress.slots_in_use}/{progress.slot_limit}"
        f" | {progress.requests_last_period} requests in the last minute{pressure}"
        f" | generation ~{seen.generation_mean:.3g} s | ETA {eta}"
    )


def _summary(report: BatchReport) -> Table:
    table = Table(caption=f"in {report.seconds:.1f} s", caption_justify="left")
    for column in ("state", "items"):
        table.add_column(column)
    for state in ItemState:
        if report.counts.get(state.value):
            table.add_row(state.value, str(report.counts[state.value]))
    return table


def _advice(report: BatchReport) -> str:
    """Return what to run next, given how the batch ended."""
    counts = report.counts
    hints = []
    if report.stopped:
        running = counts.get("running", 0) + counts.get("succeeded", 0)
        hints.append(
            f"stopped: {running} videos still being made or fetched are in the journal;"
            " run the same command again to resume"
        )
    if counts.get("failed"):
        hints.append(f"{counts['failed']} failed: add --retry-failed to try them again")
    if counts.get("uncertain"):
        hints.append(
            f"{counts['uncertain']} uncertain (a create may have made and charged a task):"
            " add --retry-uncertain to create them again, which may pay twice"
        )
    if counts.get("succeeded") and not report.stopped:
        hints.append(
            f"{counts['succeeded']} made but not saved (see the manifest's task_id and urls):"
            " run the same command again to fetch them"
        )
    return "\n".join(hints)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option(
    "--journal", type=click.Path(path_type=Path), help="Default: OUTPUT/.sora-async-journal.sqlite"
)
@click.option("--retry-failed", is_flag=True, help="Queue failed items again.")
@click.option(
    "--retry-uncertain",
    "--resubmit-uncertain",
    "retry_uncertain",
    is_flag=True,
    help="Create again items whose create may have made a task (may pay twice).",
)
@click.option(
    "--shard",
    metavar="K/N",
    help="Take only the K-th of N shares of FILE (no longer needed: with --redis-url and "
    "no --shard, every host pulls from one shared batch).",
)
@click.option(
    "--batch",
    "batch_name",
    metavar="NAME",
    help="With --redis-url: the shared batch's name (default: a digest of FILE).",
)
@click.option(
    "--host",
    metavar="NAME",
    help="With --redis-url: this host's name in the shared batch (default: the machine's; "
    "give each process on one machine its own).",
)
@click.option(
    "--max-spend",
    type=click.FloatRange(min=0.0),
    metavar="USD",
    help="Stop creating before the batch's estimated spend would pass USD (one budget for "
    "every host with --redis-url); the same command with a higher cap resumes.",
)
@click.option(
    "--keep-balance",
    type=click.FloatRange(min=0.0),
    metavar="USD",
    help="Stop creating before the key's balance would fall below USD (read at the start).",
)
@click.option(
    "--prices",
    "prices_file",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Prices (JSON) for models the catalogue has none for, or to override it.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check every line and print the estimate (items, cost, time); send nothing.",
)
@click.option("--balance", "show_balance", is_flag=True, help="With --dry-run: read the balance.")
@click.option(
    "--priority",
    type=click.Choice(PRIORITIES),
    default="batch",
    show_default=True,
    help="The creates' priority on the key: higher ones (a service's) go first.",
)
@_common
def batch(
    file: Path,
    out: Path,
    journal: Path | None,
    retry_failed: bool,
    retry_uncertain: bool,
    shard: str | None,
    batch_name: str | None,
    host: str | None,
    max_spend: float | None,
    keep_balance: float | None,
    prices_file: Path | None,
    dry_run: bool,
    show_balance: bool,
    priority: Priority,
    **kwargs: Any,
) -> None:
    """Generate every request of FILE into the output folder: JSONL (.jsonl), CSV (.csv,
    a header row naming the fields) or one prompt a line (any other extension).

    Safe to stop at any moment: the same command resumes without paying twice.
    SIGINT / SIGTERM stop new creates, write the journal and manifest, and exit 130 / 143.
    """
    params = _params(kwargs, needs_key=not dry_run or show_balance)
    as_json = params["as_json"]
    defaults = BatchDefaults(**{k: kwargs.pop(k) for k in ("duration", "size", "resolution")})
    try:
        params["prices"] = load_prices(prices_file) if prices_file is not None else {}
        params["spend_cap"] = max_spend
        params["keep_balance"] = keep_balance
        if dry_run:
            dry_run_batch(params, file, defaults, show_balance)
        share = parse_shard(shard) if shard is not None else None
        # A simulated service keeps its tasks beside the journal: a rerun resumes as on
        # the real service.
        shared_url = params["redis_url"] if share is None else None
        if shared_url is not None:
            host = host or socket.gethostname()
        suffix = f"-{file_stem(host)}" if shared_url is not None and host else None
        if max_spend is not None or keep_balance is not None:
            # With Redis the cap is one budget for every host of the batch, named for it.
            params["spend_scope"] = batch_name_of(file, defaults, batch_name)
            check_priced(file, defaults, params["model"], params["prices"])
        book = journal_path(out, journal, share, suffix=suffix)
        params["state_file"] = book.with_name(f"{book.stem}.simulated.jsonl")
        check_folder(out)
        if params["simulate"]:
            check_folder(book.parent, "journal")
    except InputError as exc:
        fail(str(exc), as_json=as_json, field=exc.field)
    stop = Stop()

    async def work(client: SoraClient, note: Note) -> int:
        note["journal"] = str(book)  # a batch that fails midway resumes from it
        interactive = _err.is_terminal and not as_json
        live = Live(console=_err, refresh_per_second=4) if interactive else None
        last_line = [0.0]

        def show(progress: BatchProgress) -> None:
            if live is not None:
                live.update(_progress_line(progress, client.snapshot()))
            elif not as_json and time.monotonic() - last_line[0] > 2.0:
                last_line[0] = time.monotonic()
                line = _progress_line(progress, client.snapshot())
                _err.print(line, highlight=False, soft_wrap=True)

        with live if live is not None else contextlib.nullcontext():
            report = await run_batch(
                client,
                file,
                out,
                journal=journal,
                defaults=defaults,
                resubmit_uncertain=retry_uncertain,
                retry_failed=retry_failed,
                on_progress=show,
                shard=share,
                stop=stop.event,
                redis_url=shared_url,
                batch=batch_name,
                host=host,
                priority=priority,
            )
        code = stop.exit_code if report.stopped else 0 if report.ok else 1
        advice = _advice(report)
        if as_json:
            fields = {
                "ok": report.ok,
                "exit_code": code,
                "counts": report.counts,
                "manifest": str(report.manifest),
                "journal": str(report.journal),
            }
            if report.batch is not None:
                fields["batch"] = report.batch
            if report.spend_estimated is not None:
                fields["spend_estimated"] = round(report.spend_estimated, 6)
                fields["spend_measured"] = report.spend_measured
            if not report.ok:
                error = "Interrupted" if report.stopped else "ItemsNotDone"
                fields |= {"error": error, "message": advice.replace("\n", "; ")}
            print(json.dumps(fields, ensure_ascii=False), flush=True)
        else:
            _out.print(_summary(report))
            _out.print(f"manifest: {report.manifest}", highlight=False, soft_wrap=True)
            if report.batch is not None:
                line = f"batch: {report.batch} (the whole batch: sora-async manifest --batch ...)"
                _out.print(line, highlight=False, soft_wrap=True)
            if report.spend_estimated is not None:
                measured = report.spend_measured
                by_balance = "unknown" if measured is None else f"${measured:,.2f}"
                line = (
                    f"spend: estimated ${report.spend_estimated:,.2f}, by the balance {by_balance}"
                )
                _out.print(line, highlight=False, soft_wrap=True)
            if advice:
                _err.print(advice, highlight=False, soft_wrap=True)
        return code

    run(params, work, stop)


for _option in reversed(_media_options):
    batch = _option(batch)


@cli.command()
@click.option(
    "--redis-url", envvar="SORA_ASYNC_REDIS_URL", required=True, help="The batch's Redis."
)
@click.option(
    "--batch",
    "batch_name",
    required=True,
    metavar="NAME",
    help="The batch's name (--batch of the batch command, or the one it printed).",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    default=Path("manifest.jsonl"),
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
def manifest(redis_url: str, batch_name: str, out: Path, as_json: bool) -> None:
    """Write the manifest of a batch shared through Redis: every host's items, in file
    order, each with the host that saved its video."""
    from ._batch_shared import write_shared_manifest

    try:
        count = asyncio.run(write_shared_manifest(redis_url, batch_name, out))
    except SoraError as exc:
        fail(str(exc), 1, as_json=as_json, field=getattr(exc, "field", None))
    except (ValueError, OSError) as exc:
        fail(f"cannot write the manifest: {exc}", 1, as_json=as_json)
    emit(as_json, f"manifest: {out} ({count} items)", manifest=str(out), items=count)


@cli.command()
@click.argument("task_id")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("."))
@_common
def download(task_id: str, out: Path, **kwargs: Any) -> None:
    """Save the video of task TASK_ID (made here or elsewhere) in the output folder.

    Waits for the task if it is still running. The download is atomic, resumable and
    size-capped, as in a batch; the file is named after the task id.
    """
    params = _params(kwargs, simulate=False)
    try:
        check_folder(out)
    except InputError as exc:
        fail(str(exc), as_json=params["as_json"], field=exc.field)

    async def work(client: SoraClient, note: Note) -> int:
        with _err.status("waiting for the task..."):
            video = await client.wait(task_id)
        note |= {"task_id": task_id, "urls": list(video.urls)}
        return await _save(client, video, out, note, params["as_json"])

    run(params, work)


@cli.command()
@click.argument("task_id")
@_common
def status(task_id: str, **kwargs: Any) -> None:
    """Show a task's status."""
    params = _params(kwargs, simulate=False)

    async def work(client: SoraClient, note: Note) -> int:
        found = await client.status(task_id)
        urls = " ".join(found.result_urls)
        detail = urls or f"{found.fail_code or ''} {found.fail_msg or ''}".strip()
        text = f"{found.task_id}: {found.state.value} {detail}"
        emit(params["as_json"], text, **msgspec.to_builtins(found))
        return 0

    run(params, work)


@cli.command()
@_common
def balance(**kwargs: Any) -> None:
    """Show the key's remaining balance in USD."""
    params = _params(kwargs, simulate=False)

    async def work(client: SoraClient, note: Note) -> int:
        usd = await client.balance()
        emit(params["as_json"], f"{usd:.2f} USD", usd=usd)
        return 0

    run(params, work)


def _key_table(governor: Governor, watched: str) -> Table:
    """Render the figures of a key shared through Redis as one table."""
    table = Table("figure", "value", title=watched, title_justify="left")
    table.add_row("task slots", f"{governor.slots_in_use} / {governor.slot_limit}")
    table.add_row("creates waiting for a slot", str(governor.slot_waiters))
    by_priority = getattr(governor, "key_by_priority", None)
    if by_priority is not None:
        waiting, slots = by_priority()
        for priority in PRIORITIES:
            table.add_row(
                f"  {priority}: slots, waiting", f"{slots[priority]}, {waiting[priority]}"
            )
    limit = governor.limits.requests
    table.add_row("requests in the window", f"{governor.requests_in_window()} / {limit}")
    table.add_row("rate factor", f"{governor.rate_factor:.2f}")
    table.add_row("429s seen", str(governor.rate_limited_seen))
    return table


def _work_table(rows: list[WorkRow]) -> Table:
    """Render the ledger's tasks, by batch and for the service, as one table."""
    table = Table(
        "tasks of",
        "waiting",
        "in flight",
        "succeeded",
        "failed",
        "uncertain",
        title="the key's ledger (every model)",
        title_justify="left",
    )
    for row in rows:
        waiting = "-" if row.waiting is None else str(row.waiting)
        figures = (row.in_flight, row.succeeded, row.failed, row.uncertain)
        table.add_row(row.name, waiting, *(str(figure) for figure in figures))
    if not rows:
        table.add_row("(nothing recorded yet)", "", "", "", "", "")
    return table


def _spend_table(spend: dict[str, tuple[float, float]], rates: dict[str, float | None]) -> Table:
    """Render the spend caps' budgets on the key: spent, held by tasks in flight, and
    the rate of spend since the last refresh (USD an hour)."""
    table = Table(
        "budget",
        "spent (USD)",
        "held by tasks in flight (USD)",
        "rate (USD/h)",
        title="spend under a cap (estimated)",
        title_justify="left",
    )
    for scope, (spent, held) in sorted(spend.items()):
        rate = rates.get(scope)
        shown = "-" if rate is None else f"{rate:,.2f}"
        table.add_row(scope or "(key)", f"{spent:,.2f}", f"{held:,.2f}", shown)
    return table


@cli.command()
@click.option(
    "--redis-url",
    envvar="SORA_ASYNC_REDIS_URL",
    required=True,
    help="The Redis the workers share [env SORA_ASYNC_REDIS_URL].",
)
@click.option("--api-key", envvar="APIXO_API_KEY", help="API key [env APIXO_API_KEY]")
@click.option("--model", default="sora-2-pro", show_default=True)
@click.option(
    "--time-scale",
    type=click.FloatRange(min=1.0),
    default=1.0,
    help="The workers' --time-scale (their window is 60 s divided by it).",
)
@click.option("--once", is_flag=True, help="Print the figures once and exit.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (implies --once).")
def top(
    redis_url: str, api_key: str | None, model: str, time_scale: float, once: bool, as_json: bool
) -> None:
    """Watch a key shared through Redis: slots, window, 429s, and the ledger's tasks
    by batch and for the service, refreshed each second.

    Reads only: it takes no permit and no slot. Ctrl-C to leave.
    """
    try:
        check_model_id(model)
        from ._top import spend_on, work_rows
        from .redis_governor import RedisGovernor
        from .redis_store import RedisStore

        limits = limits_for(model, {})
        limits = Limits(
            requests=limits.requests,
            period=limits.period / time_scale,
            concurrent_tasks=limits.concurrent_tasks,
        )
        governor = RedisGovernor(
            redis_url, api_key=api_key, model=model, limits=limits, redis_timeout=5.0
        )
        store = RedisStore(redis_url, api_key=api_key, redis_timeout=5.0)
    except ImportError:
        fail("sora-async top needs Redis: pip install 'sora-async[redis]'", as_json=as_json)
    except InputError as exc:
        fail(str(exc), as_json=as_json, field=exc.field)
    watched = f"{model} on {redis_url.rsplit('@', 1)[-1]}"

    last_spend: dict[str, tuple[float, float]] = {}  # scope: (loop time, spent)

    async def read() -> Group:
        await governor.refresh()
        rows = await work_rows(await store.counts(), redis_url)
        spend = await spend_on(redis_url, governor.key_prefix)
        now = asyncio.get_running_loop().time()
        rates: dict[str, float | None] = {}
        for scope, (spent, _) in spend.items():
            before = last_spend.get(scope)
            elapsed = now - before[0] if before else 0.0
            rates[scope] = (spent - before[1]) / elapsed * 3600 if before and elapsed else None
            last_spend[scope] = (now, spent)
        if as_json:
            waiting_by_priority, slots_by_priority = governor.key_by_priority()
            emit(
                True,
                "",
                model=model,
                slots_in_use=governor.slots_in_use,
                slot_limit=governor.slot_limit,
                slot_waiters=governor.slot_waiters,
                requests_in_window=governor.requests_in_window(),
                request_limit=limits.requests,
                rate_factor=governor.rate_factor,
                rate_limited=governor.rate_limited_seen,
                slots_by_priority=slots_by_priority,
                waiting_by_priority=waiting_by_priority,
                work=[row.as_json() for row in rows],
                spend={
                    scope: {"spent_usd": spent, "held_usd": held}
                    for scope, (spent, held) in spend.items()
                },
            )
        tables = [_key_table(governor, watched), _work_table(rows)]
        if spend:
            tables.append(_spend_table(spend, rates))
        return Group(*tables)

    async def watch() -> None:
        await store.open()
        try:
            figures = await read()
            if once or as_json:
                if not as_json:
                    _out.print(figures)
                return
            with Live(figures, console=_out, auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(1.0)
                    live.update(await read(), refresh=True)
        finally:
            await governor.aclose()
            await store.close()

    try:
        asyncio.run(watch())
    except SoraError as exc:
        fail(str(exc), 1, as_json=as_json, error=type(exc).__name__)
    except KeyboardInterrupt:
        sys.exit(0)


@cli.command()
def models() -> None:
    """List the models this client knows: id, kind, typed fields and default limits."""
    # A model id is what the user types next: it never wraps, other columns do.
    table = Table(
        Column("model", no_wrap=True), "kind", "input", "fields", "limits (requests/min, tasks)"
    )
    for info in MODELS.values():
        names = ", ".join(f"sa.{kind.__name__}" for kind in info.inputs) or "sa.RawInput"
        limits = info.limits
        per_minute = round(limits.requests * 60 / limits.period)
        source = "published" if info.limits_documented else "none published: Sora 2 Pro's used"
        figures = f"{per_minute}, {limits.concurrent_tasks} ({source})"
        table.add_row(info.id, info.kind, names, info.fields, figures)
    _out.print(table)
    sora = MODELS["sora-2-pro"].limits
    _out.print(
        "none published: the provider states no limits for that model, so sora-async uses"
        f" Sora 2 Pro's ({sora.requests} requests a minute, {sora.concurrent_tasks} tasks) as"
        " a cautious default. If your key allows more, say so: --limits veo-3-1=120/60/20"
        " (requests, period in seconds, tasks) on any command, or in Python"
        ' SoraClient(model_limits={"veo-3-1": sa.Limits(requests=120, concurrent_tasks=20)}).'
        " Fields go by these names or their wire names (--set generation_type=... or"
        " --set generationType=...).",
        highlight=False,
        soft_wrap=True,
    )


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def simulate(args: tuple[str, ...]) -> None:
    """Serve the fake service on loopback (options: simulate --help)."""
    from .testing import main as serve_fake

    sys.exit(serve_fake(list(args), prog="sora-async simulate"))


def main() -> None:
    """Run the command line: every outcome one clear line, or one JSON object with --json."""
    as_json = "--json" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.ClickException as exc:  # a usage error: bad option, missing argument
        if as_json:
            fail(exc.format_message(), exc.exit_code, as_json=True, error="UsageError")
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        fail("interrupted", 130, as_json=as_json, error="Interrupted")
    sys.exit(0)
