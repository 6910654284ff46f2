"""The batch journal: one SQLite row per item, written before each create and after
each transition, so that a killed batch resumes without paying twice."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._sqlite import SQLiteFile
from ._store import RecordState

__all__ = ["ItemState", "Journal", "JournalRow"]


# A batch item is a task record: one state machine for every task, whoever made it.
# A row reads queued, submitting, running, succeeded, failed (refused ones too),
# uncertain or downloaded (the video is on disk: done).
ItemState = RecordState


_SCHEMA = """
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
"""
_COLUMNS = (
    "id, line, request, state, task_id, result_urls, files, error, attempts, seconds, "
    "created_at, updated_at"
)


@dataclass
class JournalRow:
    """One batch item as the journal holds it."""

    id: str
    line: int
    request: str  # the request's JSON
    state: ItemState
    task_id: str | None = None
    result_urls: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    error: str | None = None
    attempts: int = 0
    seconds: float | None = None

    @classmethod
    def from_sql(cls, row: tuple[Any, ...]) -> JournalRow:
        """Build a row from a SELECT of _COLUMNS."""
        return cls(
            id=row[0],
            line=row[1],
            request=row[2],
            state=ItemState(row[3]),
            task_id=row[4],
            result_urls=json.loads(row[5]) if row[5] else [],
            files=json.loads(row[6]) if row[6] else [],
            error=row[7],
            attempts=row[8],
            seconds=row[9],
        )


class Journal:
    """A batch's durable state. Open with ``await Journal.open(path)``."""

    def __init__(self, file: SQLiteFile) -> None:
        self._file = file
        self.path = file.path

    @classmethod
    async def open(cls, path: Path) -> Journal:
        """Open (or create) the journal at ``path``, and its folder if need be.

        Raises InputError naming the path and the reason when it cannot be opened.
        """
        return cls(await SQLiteFile.open(path, (_SCHEMA,), field="journal"))

    async def _run(self, sql: str, params: Any = (), *, many: bool = False) -> list[Any]:
        return await self._file.run(sql, params, many=many)

    async def add(self, items: list[tuple[str, int, str]]) -> None:
        """Record new items (id, line, request JSON) as queued; known ids are kept as they are."""
        now = time.time()
        await self._run(
            "INSERT OR IGNORE INTO items (id, line, request, state, created_at, updated_at) "
            "VALUES (?, ?, ?, 'queued', ?, ?)",
            [(item_id, line, request, now, now) for item_id, line, request in items],
            many=True,
        )

    async def rows(self) -> list[JournalRow]:
        """Return every item, in input order."""
        found = await self._run(f"SELECT {_COLUMNS} FROM items ORDER BY line")
        return [JournalRow.from_sql(row) for row in found]

    async def update(self, row: JournalRow, state: ItemState, **changes: Any) -> None:
        """Move ``row`` to ``state`` with ``changes`` (task_id, result_urls, files, ...)."""
        row.state = state
        for name, value in changes.items():
            setattr(row, name, value)
        await self._run(
            "UPDATE items SET state=?, task_id=?, result_urls=?, files=?, error=?, attempts=?, "
            "seconds=?, updated_at=? WHERE id=?",
            (
                row.state.value,
                row.task_id,
                json.dumps(row.result_urls),
                json.dumps(row.files),
                row.error,
                row.attempts,
                row.seconds,
                time.time(),
                row.id,
            ),
        )

    def close(self) -> None:
        """Close the database, after any write in flight (blocks for milliseconds, so it
        also runs while a batch is being cancelled)."""
        self._file.close()
