"""The batch journal: one SQLite row per item, written before each create and after
each transition, so that a killed batch resumes without paying twice.

The journal is the batch's memory, not the process: items enter it a chunk at a
time as the file is read, the runner pages through the rows it needs, counts come
from SQL, and the manifest is written from it row by row. Each run of a file is a
*generation*: the rows of the current file carry its number, so that items of an
earlier version of the file are left out of this run's work and manifest.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._batch_file import BatchItem, BatchLineError, repeated_id, shared_file
from ._sqlite import SQLiteFile
from ._store import RecordState, TaskRecord

__all__ = ["ItemState", "Journal", "item_record", "manifest_line", "read_rows"]


# A batch item is a task record: one state machine for every task, whoever made it.
# A row reads queued, submitting, running, succeeded, failed (refused ones too),
# uncertain or downloaded (the video is on disk: done).
ItemState = RecordState


_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    line INTEGER NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT,
    result_urls TEXT,
    files TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    seconds REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# Columns added since the first release, added to its journals when they are opened.
_ADDED = {
    "gen": "ALTER TABLE items ADD COLUMN gen INTEGER NOT NULL DEFAULT 0",
    "stem": "ALTER TABLE items ADD COLUMN stem TEXT",
}
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS items_stem ON items (stem)",
    "CREATE INDEX IF NOT EXISTS items_work ON items (gen, state, line)",
    # The manifest's pages, in file order whatever the state (read_rows).
    "CREATE INDEX IF NOT EXISTS items_line ON items (gen, line)",
)
_UPDATE = (
    "UPDATE items SET state=?, task_id=?, result_urls=?, files=?, error=?, attempts=?, "
    "seconds=?, updated_at=? WHERE id=?"
)
_COLUMNS = (
    "id, line, request, state, task_id, result_urls, files, error, attempts, seconds, "
    "created_at, updated_at"
)


def item_record(
    item_id: str,
    line: int,
    request: str,
    state: ItemState,
    task_id: str | None = None,
    *,
    batch: str = "",
) -> TaskRecord:
    """Return a batch item's task record (``request``: its request's JSON). A journal
    keeps no fingerprint or model of its own: the request names its model."""
    return TaskRecord(
        key=item_id,
        fingerprint="",
        model="",
        request=request,
        batch=batch,
        state=state,
        task_id=task_id,
        line=line,
    )


def _record_of(row: tuple[Any, ...]) -> TaskRecord:
    """Build a record from a SELECT of _COLUMNS."""
    return TaskRecord(
        key=row[0],
        fingerprint="",
        model="",
        request=row[2],
        state=ItemState(row[3]),
        task_id=row[4],
        result_urls=json.loads(row[5]) if row[5] else [],
        error=row[7],
        created_at=row[10],
        updated_at=row[11],
        line=row[1],
        files=json.loads(row[6]) if row[6] else [],
        attempts=row[8],
        seconds=row[9],
    )


def _migrate(connection: sqlite3.Connection) -> None:
    """Bring a journal of an earlier release up to today's schema (in the file's thread)."""
    for statement in _SCHEMA:
        connection.execute(statement)
    columns = {row[1] for row in connection.execute("PRAGMA table_info(items)")}
    for name, statement in _ADDED.items():
        if name not in columns:
            connection.execute(statement)
    for statement in _INDEXES:
        connection.execute(statement)
    connection.execute("PRAGMA wal_autocheckpoint=0")  # see Journal.open


_CHECKPOINT_EVERY = 256  # writing transactions between two checkpoints


def _checkpoint(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


class Journal:
    """A batch's durable state. Open with ``await Journal.open(path)``."""

    def __init__(self, file: SQLiteFile) -> None:
        self._file = file
        self.path = file.path

    @classmethod
    async def open(cls, path: Path) -> Journal:
        """Open (or create) the journal at ``path``, and its folder if need be; a
        journal of an earlier release gains today's columns.

        Raises InputError naming the path and the reason when it cannot be opened.
        """
        file = await SQLiteFile.open(path, (), field="journal", prepare=_migrate)
        # Its own checkpoints, in its thread: not SQLite's, which would run in the
        # commit of an update written inline, on the event loop.
        file.checkpoint = _checkpoint
        file.checkpoint_every = _CHECKPOINT_EVERY
        return cls(file)

    async def _run(self, sql: str, params: Any = (), *, many: bool = False) -> list[Any]:
        return await self._file.run(sql, params, many=many)

    async def meta(self, key: str) -> str | None:
        """Return a value the journal keeps about the batch (None when unset)."""
        found = await self._run("SELECT value FROM meta WHERE key = ?", (key,))
        return str(found[0][0]) if found else None

    async def set_meta(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key``."""
        await self._run("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    async def add(self, source: str, items: list[BatchItem], gen: int) -> int:
        """Enter a chunk of the file into generation ``gen`` in one transaction; return
        how many items are new (queued). An item already known keeps its state and
        request, and takes its line in the file.

        Raises BatchLineError, writing nothing, when an id repeats an earlier line of
        the file, or two ids would share a file name.
        """
        now = time.time()

        def add(db: sqlite3.Connection) -> int:
            chunk: dict[str, BatchItem] = {}
            stems: dict[str, BatchItem] = {}
            for item in items:
                if item.id in chunk:
                    line = chunk[item.id].line
                    raise BatchLineError(source, item.line, "id", repeated_id(item, line))
                other = stems.get(item.stem)
                if other is not None:
                    rule = shared_file(item, other.id, other.line)
                    raise BatchLineError(source, item.line, "id", rule)
                chunk[item.id] = stems[item.stem] = item
            marks = ",".join("?" * len(items))
            ids = [item.id for item in items]
            # By the id and stem indexes (unary +: not an index on gen, which would
            # walk the whole generation for each chunk).
            for item_id, line in db.execute(
                f"SELECT id, line FROM items WHERE +gen = ? AND id IN ({marks})", [gen, *ids]
            ):
                item = chunk[item_id]
                raise BatchLineError(source, item.line, "id", repeated_id(item, line))
            for other_id, stem, line in db.execute(
                f"SELECT id, stem, line FROM items WHERE +gen = ? AND stem IN ({marks})",
                [gen, *stems],
            ):
                item = stems[stem]
                if other_id != item.id:
                    rule = shared_file(item, other_id, line)
                    raise BatchLineError(source, item.line, "id", rule)
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO items "
                "(id, line, request, state, created_at, updated_at, gen, stem) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                [(i.id, i.line, i.request_json, now, now, gen, i.stem) for i in items],
            )
            new = db.total_changes - before
            if new < len(items):  # known items join this generation, at their new line
                db.executemany(
                    "UPDATE items SET gen = ?, line = ?, stem = ? WHERE id = ? AND gen != ?",
                    [(gen, i.line, i.stem, i.id, gen) for i in items],
                )
            return new

        return await self._file.transaction(add)

    async def enter(self, item: BatchItem, gen: int, row: TaskRecord) -> None:
        """Enter one item already begun elsewhere, in ``row``'s state and task, at once
        (never seen queued, so never created here)."""
        now = time.time()
        await self._run(
            "INSERT OR REPLACE INTO items (id, line, request, state, task_id, error, "
            "created_at, updated_at, gen, stem) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *(item.id, item.line, item.request_json, row.state.value, row.task_id),
                *(row.error, now, now, gen, item.stem),
            ),
        )

    async def any_rows(self) -> bool:
        """Return whether the journal holds any item, of any generation."""
        return bool(await self._run("SELECT 1 FROM items LIMIT 1"))

    async def counts(self, gen: int) -> dict[str, int]:
        """Return how many items of generation ``gen`` are in each state."""
        found = await self._run(
            "SELECT state, count(*) FROM items WHERE gen = ? GROUP BY state", (gen,)
        )
        return {state: count for state, count in found}

    async def page(
        self, gen: int, state: ItemState, after_line: int, limit: int
    ) -> list[TaskRecord]:
        """Return up to ``limit`` rows of generation ``gen`` in ``state``, after
        ``after_line``, in file order."""
        found = await self._run(
            f"SELECT {_COLUMNS} FROM items WHERE gen = ? AND state = ? AND line > ? "
            "ORDER BY line LIMIT ?",
            (gen, state.value, after_line, limit),
        )
        return [_record_of(row) for row in found]

    async def move(
        self, gen: int, states: tuple[ItemState, ...], to: ItemState, **changes: Any
    ) -> int:
        """Move every row of ``gen`` in ``states`` to ``to`` (with ``changes`` to
        ``error`` or ``task_id``) in one transaction; return how many moved."""
        sets = ", ".join(f"{name} = ?" for name in changes)
        marks = ",".join("?" * len(states))

        def move(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                f"UPDATE items SET state = ?, {sets + ', ' if sets else ''}updated_at = ? "
                f"WHERE gen = ? AND state IN ({marks})",
                [to.value, *changes.values(), time.time(), gen, *(s.value for s in states)],
            )
            return cursor.rowcount

        return await self._file.transaction(move)

    async def state_of(self, item_id: str) -> ItemState | None:
        """Return where ``item_id`` stands here (None: not in this journal)."""
        found = await self._run("SELECT state FROM items WHERE id = ?", (item_id,))
        return ItemState(found[0][0]) if found else None

    async def forget(self, item_id: str) -> None:
        """Drop ``item_id``'s row (an item of a shared batch that another host takes)."""
        await self._run("DELETE FROM items WHERE id = ?", (item_id,))

    async def update(self, row: TaskRecord, state: ItemState, **changes: Any) -> None:
        """Move ``row`` to ``state`` with ``changes`` (task_id, result_urls, files, ...)."""
        row.state = state
        for name, value in changes.items():
            setattr(row, name, value)
        params = (
            row.state.value,
            row.task_id,
            json.dumps(row.result_urls),
            json.dumps(row.files),
            row.error,
            row.attempts,
            row.seconds,
            time.time(),
            row.id,
        )
        # One row: written inline when the journal's thread is idle (no thread hop).
        await self._file.transaction(lambda db: db.execute(_UPDATE, params), inline=True)

    def close(self) -> None:
        """Close the database, after any write in flight (blocks for milliseconds, so it
        also runs while a batch is being cancelled)."""
        self._file.close()


def read_rows(path: Path, gen: int, *, page: int = 5000) -> Iterator[TaskRecord]:
    """Yield the rows of generation ``gen`` in file order, from a read-only connection
    of this thread (the journal's own may be busy in its thread), a page at a time."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        after = -1
        while True:
            found = db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE gen = ? AND line > ? ORDER BY line LIMIT ?",
                (gen, after, page),
            ).fetchall()
            if not found:
                return
            for row in found:
                yield _record_of(row)
            after = found[-1][1]


_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


def manifest_line(row: TaskRecord, **more: Any) -> str:
    """Return the manifest's line for ``row`` (with ``more`` fields), newline included."""
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
        **more,
    }
    # Readable UTF-8, but no character that a line splitter might take for a line end.
    return json.dumps(entry, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"
