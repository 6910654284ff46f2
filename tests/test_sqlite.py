"""The SQLite file under the journal and the task store: one call, one transaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import sora_async as sa
from sora_async._sqlite import SQLiteFile

SCHEMA = ("CREATE TABLE IF NOT EXISTS rows (id TEXT PRIMARY KEY, value INTEGER)",)


async def test_a_many_row_write_that_fails_halfway_leaves_nothing(tmp_path: Path) -> None:
    """A write of many rows whose third row breaks a constraint writes none of them:
    the call is one transaction, not one commit per row."""
    db = await SQLiteFile.open(tmp_path / "t.sqlite", SCHEMA, field="store")
    try:
        with pytest.raises(sa.InputError, match="store"):
            await db.run(
                "INSERT INTO rows VALUES (?, ?)",
                [("a", 1), ("b", 2), ("a", 3), ("c", 4)],
                many=True,
            )
        assert await db.run("SELECT COUNT(*) FROM rows") == [(0,)]
        await db.run("INSERT INTO rows VALUES (?, ?)", [("a", 1), ("b", 2)], many=True)
    finally:
        db.close()
    with sqlite3.connect(tmp_path / "t.sqlite") as reader:
        assert reader.execute("SELECT id FROM rows ORDER BY id").fetchall() == [("a",), ("b",)]
