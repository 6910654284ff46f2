"""Durable batches: prompts from a file to MP4s on disk, resumable after any kill.

Every item has a journal row, written before its create and after each transition.
Running the same batch again skips finished items, re-adopts running task ids, and
never creates again an item whose create may have succeeded (it is reported as
``uncertain`` unless ``resubmit_uncertain`` opts in).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import msgspec

from ._client import SoraClient
from ._download import safe_stem
from ._errors import (
    APIError,
    AuthenticationError,
    InputError,
    InsufficientCreditsError,
    NotFoundError,
    ProtocolError,
    SubmitUncertainError,
    TaskAbandonedError,
    TaskFailedError,
    TaskTimeoutError,
    TransportError,
)
from ._journal import ItemState, Journal, JournalRow
from ._models import Video, VideoRequest

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
_request_decoder = msgspec.json.Decoder(VideoRequest)
_encoder = msgspec.json.Encoder(order="sorted")


class BatchLineError(InputError):
    """A line of a batch file is not a valid request; names the file and line."""

    def __init__(self, source: str, line: int, field: str, rule: str) -> None:
        super().__init__(field, rule)
        self.source = source
        self.line = line
        self.args = (f"{source}:{line}: {field}: {rule}",)


@dataclass(frozen=True)
class BatchDefaults:
    """Values for fields a line leaves out (plain-text lines leave out all but the prompt)."""

    duration: int | None = None
    size: str | None = None
    resolution: str | None = None


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch file, with its stable id."""

    id: str
    line: int
    request: VideoRequest

    @property
    def request_json(self) -> str:
        """Return the request as canonical JSON."""
        return _encoder.encode(self.request).decode()


def _with_defaults(row: dict[str, Any], defaults: BatchDefaults) -> dict[str, Any]:
    row = dict(row)
    mode = row.setdefault("mode", "image-to-video" if "image_urls" in row else "text-to-video")
    if defaults.duration is not None:
        row.setdefault("duration", defaults.duration)
    if mode == "text-to-video" and defaults.size is not None:
        row.setdefault("size", defaults.size)
    if mode == "image-to-video" and defaults.resolution is not None:
        row.setdefault("resolution", defaults.resolution)
    return row


def _item_id(row: dict[str, Any], request: VideoRequest) -> str:
    given = row.pop("id", None)
    if given is None:
        # The same request always gets the same id, so a re-run recognises it.
        return hashlib.sha256(_encoder.encode(request)).hexdigest()[:16]
    if isinstance(given, bool) or not isinstance(given, (str, int)) or not str(given).strip():
        raise InputError("id", "must be a non-empty string or a number")
    return str(given)


def load_requests(path: Path, defaults: BatchDefaults | None = None) -> list[BatchItem]:
    """Read a JSONL file (one request object a line, optional ``id``) or a plain-text
    file (one prompt a line; blank lines and ``#`` comments skipped).

    Raises BatchLineError naming the file and line of the first bad line, and
    InputError when the file cannot be read. Nothing is sent.
    """
    defaults = defaults or BatchDefaults()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError("file", f"cannot read {path}: {exc}") from exc
    jsonl = path.suffix in (".jsonl", ".json", ".ndjson")
    items: list[BatchItem] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        try:
            row: dict[str, Any] = json.loads(line) if jsonl else {"prompt": line}
            if not isinstance(row, dict):
                raise InputError("line", "must be a JSON object")
            item_id = row.get("id")
            fields = _with_defaults({k: v for k, v in row.items() if k != "id"}, defaults)
            request = msgspec.convert(fields, VideoRequest)
            item_id = _item_id(row, request)
        except InputError as exc:
            raise BatchLineError(str(path), number, exc.field, exc.rule) from exc
        except json.JSONDecodeError as exc:
            raise BatchLineError(str(path), number, "line", f"is not JSON: {exc.msg}") from exc
        except msgspec.ValidationError as exc:
            cause = exc.__cause__
            if isinstance(cause, InputError):
                raise BatchLineError(str(path), number, cause.field, cause.rule) from exc
            raise BatchLineError(str(path), number, "line", str(exc)) from exc
        if item_id in seen:
            raise BatchLineError(
                str(path),
                number,
                "id",
                f"{item_id!r} repeats line {seen[item_id]}; give each an id",
            )
        seen[item_id] = number
        items.append(BatchItem(item_id, number, request))
    return items


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

    @property
    def ok(self) -> bool:
        """Return whether every item is downloaded."""
        return all(row.state is ItemState.DOWNLOADED for row in self.rows)


def file_stem(item_id: str) -> str:
    """Return a file stem for an item id: the id itself when safe, else a safe form plus
    a hash (so two unsafe ids never share a file)."""
    stem = safe_stem(item_id) if item_id.strip("._") else ""
    if stem == item_id:
        return stem
    digest = hashlib.sha256(item_id.encode()).hexdigest()[:8]
    return f"{stem}-{digest}" if stem else digest


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

    async def run(self, resubmit_uncertain: bool) -> None:
        self.report()
        async with anyio.create_task_group() as group:
            for row in self.rows:
                if row.state is ItemState.SUBMITTING or (
                    row.state is ItemState.UNCERTAIN and resubmit_uncertain
                ):
                    if resubmit_uncertain:
                        await self.set(row, ItemState.QUEUED, error=None)
                    else:
                        reason = (
                            "a create was cut off (the run was stopped): it may have made a task"
                        )
                        await self.set(row, ItemState.UNCERTAIN, error=reason)
            for row in self.rows:
                if row.state is ItemState.RUNNING:
                    assert row.task_id is not None
                    await self.client.adopt(row.task_id)
                    group.start_soon(self.follow, row)
                elif row.state is ItemState.SUCCEEDED:
                    group.start_soon(self.fetch, row)
            for row in self.rows:
                if row.state is ItemState.QUEUED and not await self.create(row, group):
                    break

    async def create(self, row: JournalRow, group: anyio.abc.TaskGroup) -> bool:
        """Create the item's task; return False when no more creates should be tried."""
        if self.stop_creates is not None:
            return False
        request = _request_decoder.decode(row.request)
        mark = functools.partial(self.set, row, ItemState.SUBMITTING, attempts=row.attempts + 1)
        try:
            task_id = await self.client.submit(request, before_create=mark)
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
        status = self.client.scheduler.result(row.task_id)
        seconds = status.generation_seconds if status is not None else None
        await self.set(row, ItemState.SUCCEEDED, result_urls=list(video.urls), seconds=seconds)
        await self.fetch(row)

    async def fetch(self, row: JournalRow) -> None:
        assert row.task_id is not None
        video = Video(task_id=row.task_id, urls=tuple(row.result_urls))
        try:
            paths = await self.client.download_all(video, self.out, name=file_stem(row.id))
        except (TransportError, InputError) as exc:
            await self.set(row, ItemState.SUCCEEDED, error=f"download: {exc}")
            return
        await self.set(row, ItemState.DOWNLOADED, files=[str(p) for p in paths], error=None)


def _named_for(name: str, suffix: str) -> str:
    stem, dot, extension = name.rpartition(".")
    return f"{stem}{suffix}{dot}{extension}"


def _check_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A probe of its own: shards of one batch may check one folder at once.
        with tempfile.NamedTemporaryFile(dir=out, prefix=".sora-async-write-test-"):
            pass
    except OSError as exc:
        raise InputError("output", f"cannot write to {out}: {exc.strerror or exc}") from exc


def _manifest_line(row: JournalRow) -> str:
    request = json.loads(row.request)
    entry = {
        "id": row.id,
        "prompt": request.get("prompt"),
        "task_id": row.task_id,
        "state": row.state.value,
        "files": row.files,
        "error": row.error,
        "seconds": row.seconds,
    }
    return json.dumps(entry, ensure_ascii=False) + "\n"


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
    on_progress: Callable[[BatchProgress], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> BatchReport:
    """Generate every request of ``source`` into folder ``out``, durably.

    Reads and checks the whole file first (BatchLineError names a bad line before
    any request is sent), journals every item (default ``out/.sora-async-journal.sqlite``),
    downloads each video as it finishes and writes ``out/manifest.jsonl``. Run it
    again after any stop: finished items are skipped, running tasks re-adopted, and
    no item is created twice. Raises AuthenticationError (everything stops) and
    InsufficientCreditsError (after in-flight tasks finish).

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
    _check_output(folder)
    journal_path = (
        Path(journal) if journal is not None else folder / _named_for(JOURNAL_NAME, suffix)
    )
    book = await Journal.open(journal_path)
    runner: _Runner | None = None
    manifest = folder / _named_for(MANIFEST_NAME, suffix)
    try:
        await book.add([(item.id, item.line, item.request_json) for item in items])
        wanted = {item.id for item in items}
        rows = [row for row in await book.rows() if row.id in wanted]
        runner = _Runner(client, book, folder, rows, on_progress)
        await runner.run(resubmit_uncertain)
    finally:
        # Synchronous on purpose: this must also run when the batch is being cancelled,
        # and it takes milliseconds.
        if runner is not None:
            _write_manifest(manifest, runner.rows)
        book.close()
    if runner.stop_creates is not None:
        raise runner.stop_creates
    counts = {k: v for k, v in runner.counts.items() if v}
    return BatchReport(runner.rows, manifest, journal_path, time.monotonic() - started, counts)
