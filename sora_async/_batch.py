"""Durable batches: prompts from a file to MP4s on disk, resumable after any kill.

Every item has a journal row, written before its create and after each transition.
Running the same batch again skips finished items, re-adopts running task ids, and
never creates again an item whose create may have succeeded (it is reported as
``uncertain`` unless ``resubmit_uncertain`` opts in).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from ._batch_file import BatchDefaults, BatchLineError, load_requests, request_from
from ._catalog import Request
from ._client import SoraClient
from ._download import check_folder
from ._errors import (
    APIError,
    AuthenticationError,
    InputError,
    InsufficientCreditsError,
    NotFoundError,
    ProtocolError,
    RedisUnavailableError,
    SubmitUncertainError,
    TaskAbandonedError,
    TaskFailedError,
    TaskTimeoutError,
    TransportError,
    unwrap_sora_errors,
)
from ._journal import ItemState, Journal, JournalRow
from ._models import Video

__all__ = [
    "BatchDefaults",
    "BatchLineError",
    "BatchProgress",
    "BatchReport",
    "load_requests",
    "parse_shard",
    "run_batch",
]

logger = logging.getLogger("sora_async")

JOURNAL_NAME = ".sora-async-journal.sqlite"
MANIFEST_NAME = "manifest.jsonl"


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"K/N"`` (the K-th of N shares, 1 <= K <= N) into ``(K, N)``.

    Raises InputError naming ``shard`` when it is not of that form.
    """
    k, slash, n = text.partition("/")
    if not slash or not k.strip().isdigit() or not n.strip().isdigit():
        raise InputError("shard", f"must be K/N such as 2/8, got {text!r}")
    share = (int(k), int(n))
    if not 1 <= share[0] <= share[1]:
        raise InputError("shard", f"must have 1 <= K <= N, got {text!r}")
    return share


def in_shard(item_id: str, shard: tuple[int, int]) -> bool:
    """Return whether an item belongs to shard ``(K, N)``: by a hash of its id, so that
    every host that reads the same file agrees, whatever order it reads it in."""
    k, n = shard
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:12], 16) % n == k - 1


@dataclass(frozen=True)
class BatchProgress:
    """A snapshot of a running batch, for progress displays."""

    total: int
    counts: dict[str, int]
    slots_in_use: int
    slot_limit: int
    requests_last_period: int
    eta_seconds: float | None


@dataclass
class BatchReport:
    """What a batch run ended with."""

    rows: list[JournalRow]
    manifest: Path
    journal: Path
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    stopped: bool = False  # ended early by ``stop``: run again to finish

    @property
    def ok(self) -> bool:
        """Return whether every item is downloaded."""
        return all(row.state is ItemState.DOWNLOADED for row in self.rows)


class _Stopped(Exception):
    """The batch was asked to stop before this create was sent."""


class _Runner:
    def __init__(
        self,
        client: SoraClient,
        journal: Journal,
        out: Path,
        rows: list[JournalRow],
        on_progress: Callable[[BatchProgress], None] | None,
    ) -> None:
        self.client = client
        self.journal = journal
        self.out = out
        self.rows = rows
        self.on_progress = on_progress
        self.counts = collections.Counter(row.state.value for row in rows)
        self.stop_creates: InsufficientCreditsError | None = None
        self.stopping = False  # asked to stop: no create is sent any more
        # Redis stayed unreachable (a RedisGovernor): the run winds down as for a stop,
        # then run_batch raises it.
        self.outage: RedisUnavailableError | None = None
        self.halt = asyncio.Event()  # set by the first outage
        self.sending = 0  # creates between their journal row and their answer
        self.quiet = asyncio.Event()  # set while no create is being sent
        self.quiet.set()

    async def set(self, row: JournalRow, state: ItemState, **changes: Any) -> None:
        self.counts[row.state.value] -= 1
        self.counts[state.value] += 1
        await self.journal.update(row, state, **changes)
        self.report()

    def report(self) -> None:
        if self.on_progress is None:
            return
        governor = self.client.governor
        left = sum(self.counts[s.value] for s in (ItemState.QUEUED, ItemState.RUNNING))
        mean = self.client.scheduler.times.mean
        eta = left * mean / max(1, governor.slot_limit) if left else 0.0
        self.on_progress(
            BatchProgress(
                total=len(self.rows),
                counts={k: v for k, v in self.counts.items() if v},
                slots_in_use=governor.slots_in_use,
                slot_limit=governor.slot_limit,
                requests_last_period=governor.requests_in_window(),
                eta_seconds=eta,
            )
        )

    async def run(
        self, resubmit_uncertain: bool, retry_failed: bool, stop: asyncio.Event | None
    ) -> None:
        self.report()
        # The errors that stop a run (AuthenticationError, say) leave as themselves.
        with unwrap_sora_errors():
            async with anyio.create_task_group() as watch:
                async with anyio.create_task_group() as group:
                    if stop is not None:
                        watch.start_soon(self.stop_on, stop, group.cancel_scope)
                    watch.start_soon(self.halt_on_outage, group.cancel_scope)
                    await self.run_items(group, resubmit_uncertain, retry_failed)
                watch.cancel_scope.cancel()

    async def run_items(
        self, group: anyio.abc.TaskGroup, resubmit_uncertain: bool, retry_failed: bool
    ) -> None:
        for row in self.rows:
            if row.state is ItemState.FAILED and retry_failed:
                await self.set(row, ItemState.QUEUED, error=None, task_id=None)
            if row.state is ItemState.SUBMITTING or (
                row.state is ItemState.UNCERTAIN and resubmit_uncertain
            ):
                if resubmit_uncertain:
                    await self.set(row, ItemState.QUEUED, error=None)
                else:
                    reason = "a create was cut off (the run was stopped): it may have made a task"
                    await self.set(row, ItemState.UNCERTAIN, error=reason)
        for row in self.rows:
            if row.state is ItemState.RUNNING:
                assert row.task_id is not None
                model = self.client.model_for(_row_request(row))
                try:
                    await self.client.adopt(row.task_id, model=model)
                except RedisUnavailableError as exc:
                    self.give_up(exc)
                    return
                group.start_soon(self.follow, row)
            elif row.state is ItemState.SUCCEEDED:
                group.start_soon(self.fetch, row)
        for row in self.rows:
            if row.state is ItemState.QUEUED and not await self.create(row, group):
                break

    async def stop_on(self, stop: asyncio.Event, scope: anyio.CancelScope) -> None:
        """Once ``stop`` is set, send no more creates, let those already sent get their
        answer (so that their task ids are journaled), then cancel the run: running
        tasks stay in the journal for the next run to adopt. A create still waiting
        for its permit or its retry is never sent: its row stays queued."""
        await stop.wait()
        self.stopping = True
        await self.quiet.wait()
        scope.cancel()

    def give_up(self, outage: RedisUnavailableError) -> None:
        """Stop the run because Redis stayed unreachable (run_batch then raises it)."""
        if self.outage is None:
            self.outage = outage
            self.halt.set()

    async def halt_on_outage(self, scope: anyio.CancelScope) -> None:
        """After an outage, send no more creates, let those already sent get their
        answer (journaled), then cancel the run: the journal stays whole, every item
        in it resumable by running the batch again."""
        await self.halt.wait()
        await self.quiet.wait()
        scope.cancel()

    async def create(self, row: JournalRow, group: anyio.abc.TaskGroup) -> bool:
        """Create the item's task; return False when no more creates should be tried."""
        if self.stop_creates is not None or self.outage is not None:
            return False
        tried = False  # the row's attempts count this create once
        on_wire = False  # counted in self.sending

        async def mark() -> None:
            # Called once the permit is granted, just before the create is sent (again
            # before each retry's send): never while a slot, a permit or a back-off
            # is awaited, so only a create whose bytes may be out reads submitting.
            nonlocal tried, on_wire
            if self.stopping or self.outage is not None:
                raise _Stopped  # the client frees the slot; the row stays queued
            if not on_wire:
                on_wire = True
                self.sending += 1
                self.quiet.clear()
            attempts = row.attempts if tried else row.attempts + 1
            tried = True
            await self.set(row, ItemState.SUBMITTING, attempts=attempts)

        async def unmark() -> None:
            # An answer proved that the send made no task: queued while the retry waits.
            nonlocal on_wire
            try:
                await self.set(row, ItemState.QUEUED)
            finally:
                if on_wire:
                    on_wire = False
                    self._sent()

        try:
            return await self._create(row, group, mark, unmark)
        except _Stopped:
            return False
        finally:
            if on_wire:
                on_wire = False
                self._sent()

    def _sent(self) -> None:
        """A create is answered, or proved to have made no task."""
        self.sending -= 1
        if not self.sending:
            self.quiet.set()

    async def _create(
        self,
        row: JournalRow,
        group: anyio.abc.TaskGroup,
        mark: Callable[[], Awaitable[None]],
        unmark: Callable[[], Awaitable[None]],
    ) -> bool:
        request = _row_request(row)
        try:
            task_id = await self.client.submit(request, before_create=mark, after_no_task=unmark)
        except SubmitUncertainError as exc:
            await self.set(row, ItemState.UNCERTAIN, error=str(exc))
            return True
        except AuthenticationError:
            await self.set(row, ItemState.QUEUED)
            raise
        except InsufficientCreditsError as exc:
            self.stop_creates = exc
            await self.set(row, ItemState.QUEUED, error=str(exc))
            return False
        except RedisUnavailableError as exc:
            # No permit, no request: the create was not sent, so the next run sends it.
            await self.set(row, ItemState.QUEUED, error=str(exc))
            self.give_up(exc)
            return False
        except (TransportError, APIError) as exc:
            # No task was made: a refusal is final, a passing fault is tried next run.
            final = isinstance(exc, APIError) and exc.code < 500 and exc.code != 429
            state = ItemState.FAILED if final else ItemState.QUEUED
            await self.set(row, state, error=str(exc))
            return True
        await self.set(row, ItemState.RUNNING, task_id=task_id, error=None)
        group.start_soon(self.follow, row)
        return True

    async def follow(self, row: JournalRow) -> None:
        assert row.task_id is not None
        try:
            video = await self.client.wait(row.task_id)
        except TaskFailedError as exc:
            await self.set(row, ItemState.FAILED, error=f"{exc.fail_code}: {exc.fail_msg}")
            return
        except (NotFoundError, ProtocolError, TaskAbandonedError) as exc:
            # Gone, answering nonsense, or never finishing: the client gave it up.
            await self.set(row, ItemState.FAILED, error=str(exc))
            return
        except TaskTimeoutError as exc:
            row.error = str(exc)  # still running: the next run picks it up
            return
        except RedisUnavailableError as exc:
            self.give_up(exc)  # still running: the next run adopts it
            return
        model = video.model or self.client.model
        status = self.client.scheduler_for(model).result(row.task_id)
        seconds = status.generation_seconds if status is not None else None
        await self.set(row, ItemState.SUCCEEDED, result_urls=list(video.urls), seconds=seconds)
        await self.fetch(row)

    async def fetch(self, row: JournalRow) -> None:
        assert row.task_id is not None
        video = Video(task_id=row.task_id, urls=tuple(row.result_urls))
        try:
            paths = await self.client.download_all(video, self.out, name=row.id)
        except (TransportError, InputError) as exc:
            await self.set(row, ItemState.SUCCEEDED, error=f"download: {exc}")
            return
        await self.set(row, ItemState.DOWNLOADED, files=[str(p) for p in paths], error=None)


def _row_request(row: JournalRow) -> Request:
    return request_from(json.loads(row.request), BatchDefaults())


def _named_for(name: str, suffix: str) -> str:
    stem, dot, extension = name.rpartition(".")
    return f"{stem}{suffix}{dot}{extension}"


def journal_path(
    out: str | os.PathLike[str],
    journal: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Return where a batch into ``out`` keeps its journal (``journal`` when given)."""
    if journal is not None:
        return Path(journal)
    suffix = f"-{shard[0]}of{shard[1]}" if shard is not None else ""
    return Path(out) / _named_for(JOURNAL_NAME, suffix)


_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


def _manifest_line(row: JournalRow) -> str:
    request = json.loads(row.request)
    entry = {
        "id": row.id,
        "model": request.get("model", "sora-2-pro"),
        "prompt": request.get("prompt"),
        "task_id": row.task_id,
        "state": row.state.value,
        "files": row.files,
        "urls": row.result_urls,
        "error": row.error,
        "seconds": row.seconds,
    }
    # Readable UTF-8, but no character that a line splitter might take for a line end.
    return json.dumps(entry, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


def _write_manifest(path: Path, rows: list[JournalRow]) -> None:
    partial = path.with_name(f".{path.name}.part")
    partial.write_text("".join(_manifest_line(row) for row in rows), encoding="utf-8")
    os.replace(partial, path)


async def run_batch(
    client: SoraClient,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    journal: str | os.PathLike[str] | None = None,
    defaults: BatchDefaults | None = None,
    resubmit_uncertain: bool = False,
    retry_failed: bool = False,
    on_progress: Callable[[BatchProgress], None] | None = None,
    shard: tuple[int, int] | None = None,
    stop: asyncio.Event | None = None,
) -> BatchReport:
    """Generate every request of ``source`` into folder ``out``, durably.

    Reads and checks the whole file first (BatchLineError names a bad line before
    any request is sent), journals every item (default ``out/.sora-async-journal.sqlite``),
    downloads each video as it finishes and writes ``out/manifest.jsonl``. Run it
    again after any stop: finished items are skipped, running tasks re-adopted, and
    no item is created twice. ``retry_failed`` queues failed items again;
    ``resubmit_uncertain`` creates again items whose create may have made a task
    (which may pay twice). Setting ``stop`` ends the run early and cleanly: no more
    creates are sent, those already sent get their answer and are journaled, and the
    report (``stopped=True``) leaves running tasks to the next run. Raises
    AuthenticationError (everything stops), InsufficientCreditsError (after in-flight
    tasks finish), RedisUnavailableError (a RedisGovernor's Redis stayed unreachable
    for its ``redis_timeout``: the run stops as for ``stop``, with the journal and
    manifest written, and the same call resumes it once Redis answers) and InputError
    (a bad file, output folder or journal path).

    ``shard=(K, N)`` takes only the K-th of N shares of the file (by a hash of each
    id), for several hosts sharing one file and one key (with a RedisGovernor); its
    journal and manifest are named for the shard, so shards may share a folder.
    """
    started = time.monotonic()
    items = load_requests(Path(source), defaults)
    suffix = ""
    if shard is not None:
        parse_shard(f"{shard[0]}/{shard[1]}")  # the same rule as the command line's
        items = [item for item in items if in_shard(item.id, shard)]
        suffix = f"-{shard[0]}of{shard[1]}"
    folder = Path(out)
    check_folder(folder)
    book_path = journal_path(folder, journal, shard)
    book = await Journal.open(book_path)
    runner: _Runner | None = None
    manifest = folder / _named_for(MANIFEST_NAME, suffix)
    try:
        await book.add([(item.id, item.line, item.request_json) for item in items])
        wanted = {item.id for item in items}
        rows = [row for row in await book.rows() if row.id in wanted]
        runner = _Runner(client, book, folder, rows, on_progress)
        await runner.run(resubmit_uncertain, retry_failed, stop)
    finally:
        # Synchronous on purpose: this must also run when the batch is being cancelled,
        # and it takes milliseconds.
        if runner is not None:
            _write_manifest(manifest, runner.rows)
        book.close()
    if runner.outage is not None:
        raise runner.outage
    if runner.stop_creates is not None:
        raise runner.stop_creates
    counts = {k: v for k, v in runner.counts.items() if v}
    seconds = time.monotonic() - started
    return BatchReport(runner.rows, manifest, book_path, seconds, counts, runner.stopping)
