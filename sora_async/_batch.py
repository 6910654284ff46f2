"""Durable batches: prompts from a file to MP4s on disk, resumable after any kill.

Every item has a journal row, written before its create and after each transition.
Running the same batch again skips finished items, re-adopts running task ids, and
never creates again an item whose create may have succeeded (it is reported as
``uncertain`` unless ``resubmit_uncertain`` opts in).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from ._batch_file import (
    BatchDefaults,
    BatchLineError,
    load_requests,
    read_items,
    request_from,
)
from ._batch_spend import SpendWatch, paid_before
from ._catalog import Request
from ._client import SoraClient
from ._download import check_folder, file_stem
from ._errors import (
    APIError,
    AuthenticationError,
    BudgetExceededError,
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
from ._journal import ItemState, Journal, manifest_line, read_rows
from ._models import Video
from ._priority import Priority, rank_of
from ._store import TaskRecord

if TYPE_CHECKING:
    from ._batch_shared import SharedItems

__all__ = [
    "BatchDefaults",
    "BatchLineError",
    "BatchProgress",
    "BatchReport",
    "batch_name_of",
    "load_requests",
    "parse_shard",
    "run_batch",
]

logger = logging.getLogger("sora_async")

JOURNAL_NAME = ".sora-async-journal.sqlite"
MANIFEST_NAME = "manifest.jsonl"
_CHUNK = 1000  # items read into the journal per transaction
_PAGE = 256  # rows the runner reads from the journal at a time
_REPORT_EVERY = 0.1  # seconds between progress reports, at most


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

    manifest: Path
    journal: Path
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    stopped: bool = False  # ended early by ``stop``: run again to finish
    generation: int = 0  # the journal's rows of this run of the file
    batch: str | None = None  # the name of a batch shared through Redis
    # With a spend cap: this run's spend as the prices estimate it, and as the key's
    # balance measured it (read at the start and the end; None if it could not be).
    spend_estimated: float | None = None
    spend_measured: float | None = None

    @property
    def ok(self) -> bool:
        """Return whether every item is downloaded."""
        return self.counts.get(ItemState.DOWNLOADED.value, 0) == sum(self.counts.values())

    @property
    def rows(self) -> list[TaskRecord]:
        """Return every item's row, in file order, read from the journal (all of them
        in memory: for a large batch, read the manifest a line at a time instead)."""
        return list(read_rows(self.journal, self.generation))


class _Stopped(Exception):
    """The batch was asked to stop before this create was sent."""


class _Elsewhere(Exception):
    """Another host holds or began this item of a shared batch: it is not sent here."""


class _Runner:
    def __init__(
        self,
        client: SoraClient,
        journal: Journal,
        out: Path,
        generation: int,
        on_progress: Callable[[BatchProgress], None] | None,
        reader: _Reader | None,
    ) -> None:
        self.client = client
        self.journal = journal
        self.out = out
        self.generation = generation
        self.on_progress = on_progress
        self.reader = reader  # the file, still being read into the journal (or None)
        self.counts: collections.Counter[str] = collections.Counter()
        # The balance ran out, or the spend cap is reached: creates stop, items stay queued.
        self.stop_creates: InsufficientCreditsError | BudgetExceededError | None = None
        self.stopping = False  # asked to stop: no create is sent any more
        # Redis stayed unreachable (a RedisGovernor), or the file being read has a bad
        # line: the run winds down as for a stop, then run_batch raises it.
        self.outage: RedisUnavailableError | BatchLineError | None = None
        self.halt = asyncio.Event()  # set by the first outage
        self.sending = 0  # creates between their journal row and their answer
        self.quiet = asyncio.Event()  # set while no create is being sent
        self.quiet.set()
        self._next_report = 0.0
        self.shared: SharedItems | None = None  # this host's part of a shared batch
        self.batch = ""  # the name its tasks are recorded under in the client's store
        self.priority: Priority = "batch"
        self.group: anyio.abc.TaskGroup | None = None  # where follows run

    async def set(self, row: TaskRecord, state: ItemState, **changes: Any) -> None:
        self.counts[row.state.value] -= 1
        self.counts[state.value] += 1
        await self.journal.update(row, state, **changes)
        if self.shared is not None:
            await self.shared.moved(row)
        self.report()

    async def forget(self, row: TaskRecord) -> None:
        """Drop a shared batch's item from this host (another host takes it)."""
        self.counts[row.state.value] -= 1
        await self.journal.forget(row.id)
        if self.shared is not None:
            self.shared.release(row)

    def report(self, *, final: bool = False) -> None:
        if self.on_progress is None:
            return
        # A tenth of a second apart at most: a display needs no more, and the window's
        # count costs a walk over its grants.
        now = time.monotonic()
        if not final and now < self._next_report:
            return
        self._next_report = now + _REPORT_EVERY
        governor = self.client.governor
        left = sum(self.counts[s.value] for s in (ItemState.QUEUED, ItemState.RUNNING))
        mean = self.client.scheduler.times.mean
        eta = left * mean / max(1, governor.slot_limit) if left else 0.0
        self.on_progress(
            BatchProgress(
                total=sum(self.counts.values()),
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
        await self.resume(resubmit_uncertain, retry_failed)
        # The errors that stop a run (AuthenticationError, say) leave as themselves.
        with unwrap_sora_errors():
            async with anyio.create_task_group() as watch:
                async with anyio.create_task_group() as group:
                    if stop is not None:
                        watch.start_soon(self.stop_on, stop, group.cancel_scope)
                    watch.start_soon(self.halt_on_outage, group.cancel_scope)
                    if self.reader is not None:
                        watch.start_soon(self.reader.read, self)
                    if self.shared is not None:
                        watch.start_soon(self.shared.keep_leases)
                    await self.run_items(group)
                watch.cancel_scope.cancel()
        self.report(final=True)

    async def resume(self, resubmit_uncertain: bool, retry_failed: bool) -> None:
        """Requeue what the options ask for, mark cut-off creates uncertain, and count
        the items by state: in SQL, whatever the batch's size."""
        book, generation = self.journal, self.generation
        if retry_failed:
            await book.move(
                generation, (ItemState.FAILED,), ItemState.QUEUED, error=None, task_id=None
            )
        if resubmit_uncertain:
            cut_off = (ItemState.SUBMITTING, ItemState.UNCERTAIN)
            await book.move(generation, cut_off, ItemState.QUEUED, error=None)
        else:
            reason = "a create was cut off (the run was stopped): it may have made a task"
            await book.move(generation, (ItemState.SUBMITTING,), ItemState.UNCERTAIN, error=reason)
        self.counts.update(await book.counts(generation))
        self.report()

    async def run_items(self, group: anyio.abc.TaskGroup) -> None:
        self.group = group
        # Results made but not saved first: a task followed below may end meanwhile,
        # and its own follow saves it.
        async for row in self.rows_in(ItemState.SUCCEEDED):
            group.start_soon(self.fetch, row)
        async for row in self.rows_in(ItemState.RUNNING):
            assert row.task_id is not None
            model = self.client.model_for(_row_request(row))
            try:
                await self.client.adopt(row.task_id, model=model)
            except RedisUnavailableError as exc:
                self.give_up(exc)
                return
            group.start_soon(self.follow, row)
        async for row in self.rows_in(ItemState.QUEUED):
            if not await self.create(row, group):
                return

    async def rows_in(self, state: ItemState) -> AsyncIterator[TaskRecord]:
        """Yield this run's rows that were in ``state`` when their page was read, in
        file order, a page at a time; queued ones also as the file is read."""
        after = -1
        shared = self.shared if state is ItemState.QUEUED else None
        while True:
            page = await self.journal.page(self.generation, state, after, _PAGE)
            if not page:
                if shared is not None:
                    if not await shared.more(self):
                        return
                    continue
                if state is not ItemState.QUEUED or self.reader is None:
                    return
                if not await self.reader.more():
                    return
                continue
            for row in page:
                yield row
            if shared is None:  # a shared batch's items taken back come at any line
                after = page[-1].line

    async def stop_on(self, stop: asyncio.Event, scope: anyio.CancelScope) -> None:
        """Once ``stop`` is set, send no more creates, let those already sent get their
        answer (so that their task ids are journaled), then cancel the run: running
        tasks stay in the journal for the next run to adopt. A create still waiting
        for its permit or its retry is never sent: its row stays queued."""
        await stop.wait()
        self.stopping = True
        await self.quiet.wait()
        scope.cancel()

    def give_up(self, outage: RedisUnavailableError | BatchLineError) -> None:
        """Stop the run because Redis stayed unreachable, or the file has a bad line
        (run_batch then raises it)."""
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

    async def create(self, row: TaskRecord, group: anyio.abc.TaskGroup) -> bool:
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
            if not tried and self.shared is not None and not await self.shared.begin(row):
                raise _Elsewhere  # the client frees the slot; another host has it
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
        except _Elsewhere:
            await self.forget(row)
            return True
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
        row: TaskRecord,
        group: anyio.abc.TaskGroup,
        mark: Callable[[], Awaitable[None]],
        unmark: Callable[[], Awaitable[None]],
    ) -> bool:
        request = _row_request(row)
        try:
            task_id = await self.client.submit(
                request,
                batch=self.batch,
                priority=self.priority,
                before_create=mark,
                after_no_task=unmark,
            )
        except SubmitUncertainError as exc:
            await self.set(row, ItemState.UNCERTAIN, error=str(exc))
            return True
        except AuthenticationError:
            await self.set(row, ItemState.QUEUED)
            raise
        except (InsufficientCreditsError, BudgetExceededError) as exc:
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
            if not final and self.shared is not None:
                await self.forget(row)  # tried again by whichever host takes it back
            return True
        await self.set(row, ItemState.RUNNING, task_id=task_id, error=None)
        if self.shared is not None:
            await self.shared.created(row)
        group.start_soon(self.follow, row)
        return True

    async def follow(self, row: TaskRecord) -> None:
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

    async def fetch(self, row: TaskRecord) -> None:
        assert row.task_id is not None
        video = Video(task_id=row.task_id, urls=tuple(row.result_urls))
        try:
            paths = await self.client.download_all(video, self.out, name=row.id)
        except (TransportError, InputError) as exc:
            await self.set(row, ItemState.SUCCEEDED, error=f"download: {exc}")
            return
        await self.set(row, ItemState.DOWNLOADED, files=[str(p) for p in paths], error=None)


def batch_name_of(
    source: str | os.PathLike[str], defaults: BatchDefaults | None, name: str | None
) -> str:
    """Return the name a batch of ``source`` goes by: ``name``, else a digest of the
    file (and its defaults): the same on every host that runs the same file."""
    return name or _digest(Path(source), defaults, None)[:16]


def _row_request(row: TaskRecord) -> Request:
    return request_from(json.loads(row.request), BatchDefaults())


def _named_for(name: str, suffix: str) -> str:
    stem, dot, extension = name.rpartition(".")
    return f"{stem}{suffix}{dot}{extension}"


def journal_path(
    out: str | os.PathLike[str],
    journal: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
    *,
    suffix: str | None = None,
) -> Path:
    """Return where a batch into ``out`` keeps its journal (``journal`` when given);
    ``suffix`` names a shard's or a host's."""
    if journal is not None:
        return Path(journal)
    if suffix is None:
        suffix = f"-{shard[0]}of{shard[1]}" if shard is not None else ""
    return Path(out) / _named_for(JOURNAL_NAME, suffix)


def _write_manifest(path: Path, journal: Path, generation: int) -> None:
    """Write the manifest from the journal, a row at a time, unless the journal holds
    nothing new since it was last written (a finished batch run again rewrites nothing)."""
    with contextlib.closing(sqlite3.connect(journal)) as db:
        (count, updated, files), *_ = db.execute(
            "SELECT count(*), max(updated_at), sum(length(coalesce(files, ''))) "
            "FROM items WHERE gen = ?",
            (generation,),
        ).fetchall()
        mark = json.dumps([str(path), generation, count, updated, files])
        written = db.execute("SELECT value FROM meta WHERE key = 'manifest'").fetchall()
        if path.exists() and written and written[0][0] == mark:
            return
        partial = path.with_name(f".{path.name}.part")
        with partial.open("w", encoding="utf-8") as file:
            file.writelines(manifest_line(row) for row in read_rows(journal, generation))
        os.replace(partial, path)
        with db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('manifest', ?)", (mark,))


def _digest(path: Path, defaults: BatchDefaults | None, shard: tuple[int, int] | None) -> str:
    """Return a digest of the file and what shapes its items (defaults, shard)."""
    digest = hashlib.sha256(repr((defaults, shard)).encode())
    try:
        with path.open("rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise InputError("file", f"cannot read {path}: {exc}") from exc
    return digest.hexdigest()


class _Reader:
    """Read the batch file into the journal a chunk at a time, each chunk one
    transaction; the runner creates the items already in while the rest is read."""

    def __init__(
        self,
        path: Path,
        defaults: BatchDefaults | None,
        shard: tuple[int, int] | None,
        journal: Journal,
        generation: int,
        digest: str,
    ) -> None:
        self.path = path
        self.defaults = defaults
        self.shard = shard
        self.journal = journal
        self.generation = generation
        self.digest = digest
        self.done = False
        self._added = asyncio.Event()

    async def read(self, runner: _Runner | None = None) -> None:
        """Enter every item; once all are in, the journal knows the file is read.

        With a ``runner``, a bad line stops its creates (those sent get their answer)
        and is raised by run_batch; without one, it is raised here."""
        try:
            for chunk in read_items(self.path, self.defaults, chunk=_CHUNK):
                if self.shard is not None:
                    chunk = [item for item in chunk if in_shard(item.id, self.shard)]
                if not chunk:
                    continue
                new = await self.journal.add(str(self.path), chunk, self.generation)
                if runner is not None:  # a fresh journal: every item is new
                    runner.counts[ItemState.QUEUED.value] += new
                    runner.report()
                self._wake()
            await self.journal.set_meta("source", self.digest)
        except BatchLineError as exc:
            if runner is None:
                raise
            runner.give_up(exc)
        finally:
            self.done = True
            self._wake()

    def _wake(self) -> None:
        self._added.set()
        self._added = asyncio.Event()

    async def more(self) -> bool:
        """Wait for the next chunk; return False once the whole file is in."""
        if self.done:
            return False
        await self._added.wait()
        return True


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
    redis_url: str | None = None,
    batch: str | None = None,
    host: str | None = None,
    balance_every: float = 300.0,
    priority: Priority = "batch",
) -> BatchReport:
    """Generate every request of ``source`` into folder ``out``, durably.

    Journals every item (default ``out/.sora-async-journal.sqlite``), downloads each
    video as it finishes and writes ``out/manifest.jsonl``. The file is read a chunk
    at a time into the journal, and memory holds only the items in flight, whatever
    its size. On a first run the first creates go out while the rest of the file is
    read: a bad line found later (BatchLineError, naming it) stops the creates,
    lets those sent get their answer, and is raised once the journal and manifest
    are written; a file whose first chunk (1,000 items) holds a bad line sends
    nothing. A file run again unchanged is not read again; a changed one is read
    and checked whole before anything is sent.
    Run it again after any stop: finished items are skipped (counted in the
    journal, not loaded), running tasks re-adopted, no item is created twice, and an
    unchanged manifest is not rewritten. ``retry_failed`` queues failed items again;
    ``resubmit_uncertain`` creates again items whose create may have made a task
    (which may pay twice). Setting ``stop`` ends the run early and cleanly: no more
    creates are sent, those already sent get their answer and are journaled, and the
    report (``stopped=True``) leaves running tasks to the next run. Raises
    AuthenticationError (everything stops), InsufficientCreditsError and
    BudgetExceededError (the client's ``spend_cap``: creates stop, items stay queued,
    and it is raised after in-flight tasks finish; the same call with a higher cap
    resumes), RedisUnavailableError (a RedisGovernor's Redis stayed unreachable
    for its ``redis_timeout``: the run stops as for ``stop``, with the journal and
    manifest written, and the same call resumes it once Redis answers) and InputError
    (a bad file, output folder or journal path).

    ``redis_url``: one batch that any number of hosts run, each with this call on
    its own copy of the file, at any time: the items enter a queue on that Redis
    once, every host pulls from it, and no item is created twice (see
    ``sora_async._batch_shared``). ``batch`` names it (default: a digest of the
    file), ``host`` names this host (default: the machine's name; give each process
    its own). The file is checked whole before the first host sends anything. Each
    host keeps its own journal and manifest, named for it, in its ``out``.
    The client's ``store`` records each task under the batch's name (a batch not
    shared is named so too), so that a service and batches on one
    :class:`RedisStore` are one ledger: ``sora-async top`` counts both.

    With a client's spend cap, the key's balance is read at the start, every
    ``balance_every`` seconds and at the end: the report gives the estimated and the
    measured spend, and a balance falling faster than the estimate is warned of once
    and corrects the rest of the run's reservations.

    ``priority``: the batch's creates wait for slots behind every higher priority's
    (default "batch", the lowest: a service's "interactive" requests on the same
    client go first; see :data:`sa.Priority`).

    ``shard=(K, N)`` takes only the K-th of N shares of the file (by a hash of each
    id), for several hosts sharing one file and one key (with a RedisGovernor); its
    journal and manifest are named for the shard, so shards may share a folder.
    No longer needed with ``redis_url``, which it excludes.
    """
    started = time.monotonic()
    rank_of(priority)
    path = Path(source)
    suffix = ""
    if shard is not None:
        parse_shard(f"{shard[0]}/{shard[1]}")  # the same rule as the command line's
        suffix = f"-{shard[0]}of{shard[1]}"
        if redis_url is not None:
            raise InputError("shard", "is not needed with a batch shared through Redis")
    digest = _digest(path, defaults, shard)
    folder = Path(out)
    if redis_url is not None:
        host = host or socket.gethostname()
        suffix = f"-{file_stem(host)}"
    book_path = journal_path(folder, journal, shard, suffix=suffix)
    runner: _Runner | None = None
    manifest = folder / _named_for(MANIFEST_NAME, suffix)
    book: Journal | None = None
    # The first chunk is checked before anything is made (the output folder included).
    next(read_items(path, defaults, chunk=_CHUNK), None)
    check_folder(folder)
    connection: Any = None  # the shared batch's Redis connection
    spend: tuple[float | None, float | None] = (None, None)
    try:
        book = await Journal.open(book_path)
        reader: _Reader | None = None
        shared: SharedItems | None = None
        generation = int(await book.meta("generation") or 0)
        if redis_url is not None:
            # Redis is an extra: imported only for a batch shared through it.
            import redis.asyncio as aioredis

            from ._batch_shared import SharedItems
            from ._work_queue import WorkQueue
            from .redis_governor import RedisGovernor

            assert host is not None
            connection = aioredis.from_url(redis_url)
            governor = client.governor
            timing = (
                {"lease": governor.lease, "redis_timeout": governor.redis_timeout}
                if isinstance(governor, RedisGovernor)
                else {}
            )
            batch = batch_name_of(path, defaults, batch)
            queue = WorkQueue(connection, batch, consumer=host, **timing)
            generation = 1  # the items this host takes, whatever the file
            await book.set_meta("generation", "1")
            shared = SharedItems(queue, path, defaults, book, generation)
            await shared.fill(_CHUNK)
        elif not generation or await book.meta("source") != digest:
            known = await book.any_rows()
            generation += 1
            await book.set_meta("generation", str(generation))
            await book.set_meta("source", "")  # set once the whole file is in
            reader = _Reader(path, defaults, shard, book, generation, digest)
            if known:
                await reader.read()  # a changed file over a journal: checked whole first
                reader = None
        if client.budget is not None and shared is None:
            # A cap in this process's memory: the tasks this batch paid for before count.
            await client.budget.add_spent(await paid_before(client, book, generation, _PAGE))
        runner = _Runner(client, book, folder, generation, on_progress, reader)
        runner.shared = shared
        runner.batch = batch or digest[:16]
        runner.priority = priority
        watch = await SpendWatch.start(client)
        if watch is None:
            await runner.run(resubmit_uncertain, retry_failed, stop)
        else:
            # Its own task, not a task group: the run's errors leave as themselves.
            reads = asyncio.get_running_loop().create_task(watch.every(balance_every))
            try:
                await runner.run(resubmit_uncertain, retry_failed, stop)
            finally:
                reads.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reads
            spend = await watch.end()
        if shared is not None and not (runner.stopping or runner.outage or runner.stop_creates):
            # The whole batch is done: each host writes its manifest, every host's items.
            await shared.write_manifest(folder / MANIFEST_NAME)
    finally:
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.aclose()
        if book is not None:
            book.close()
        # Synchronous on purpose: this must also run when the batch is being cancelled.
        if runner is not None:
            _write_manifest(manifest, book_path, runner.generation)
    if runner.outage is not None:
        raise runner.outage
    if runner.stop_creates is not None:
        raise runner.stop_creates
    counts = {k: v for k, v in runner.counts.items() if v}
    seconds = time.monotonic() - started
    return BatchReport(
        manifest, book_path, seconds, counts, runner.stopping, runner.generation, batch, *spend
    )
