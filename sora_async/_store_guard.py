"""Tell a SQLite task store that lost its records from a new one.

A store's content alone cannot say that records vanished: a store whose ``-wal``
file was deleted after a kill, or a new empty file at its path, reads like a store
that never held any. Every key in it would then create (and bill) its task again.
Two marks make both detectable:

- **The -wal file.** SQLite's own checkpoints are off; the store checkpoints by
  itself (at open, and every ``CHECKPOINT_EVERY`` writes) in three steps: write
  ``main_mark = k``, copy the whole WAL into the main file, write ``wal_mark = k``.
  So while the store lives, the main file alone holds ``main_mark != wal_mark``, and
  the WAL holds the write that makes them equal, before every record written since.
  A clean close (SQLite's own last checkpoint) or any later checkpoint leaves them
  equal in the main file. Opened with unequal marks and no -wal file (or an empty
  one), the store lost the writes of its last run: it is refused. (Unequal marks
  with a -wal present are a kill inside the three steps: nothing was lost.)
- **The store id.** A random id, in the store and in a file beside it (``X-id``,
  written once the store holds its id). A store at ``X`` without that id (a new
  empty file, another store's file) while ``X-id`` names one is refused.

``accept_loss`` opens such a store anyway, knowingly, and marks it whole again.

What it cannot catch: the store and ``X-id`` deleted together (a new volume), an
older copy of the same store put back (its keys since the copy are gone), and a
-wal deleted when another program kept a read transaction open across the store's
checkpoint (the copy then stops short).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import uuid
from pathlib import Path

from ._errors import InputError, StoreLossError

__all__ = ["CHECKPOINT_EVERY", "checkpoint", "guard", "id_path", "wal_present"]

logger = logging.getLogger("sora_async")

CHECKPOINT_EVERY = 256  # writes between two checkpoints: a -wal of some 5 MB at most

_META = (
    "CREATE TABLE IF NOT EXISTS store_meta (one INTEGER PRIMARY KEY CHECK (one = 1), "
    "store_id TEXT NOT NULL, main_mark INTEGER NOT NULL, wal_mark INTEGER NOT NULL)"
)


def id_path(path: Path) -> Path:
    """Return the file beside the store ``path`` that names its store id."""
    return path.with_name(path.name + "-id")


def wal_present(path: Path) -> bool:
    """Return whether the store's -wal file exists with content (look before opening)."""
    try:
        return os.path.getsize(path.with_name(path.name + "-wal")) > 0
    except OSError:
        return False


def guard(connection: sqlite3.Connection, path: Path, *, had_wal: bool, accept_loss: bool) -> None:
    """Refuse the store at ``path`` if it lost records (StoreLossError), else mark it
    live: its id beside it, and a checkpoint. ``had_wal``: whether a -wal file with
    content was there before the store was opened."""
    connection.execute("PRAGMA wal_autocheckpoint=0")  # the store checkpoints by itself
    connection.execute(_META)
    row = connection.execute("SELECT store_id, main_mark, wal_mark FROM store_meta").fetchone()
    named = _read_id(path)
    loss = _loss(path, row, named, had_wal=had_wal)
    if loss is not None:
        if not accept_loss:
            raise StoreLossError(path, loss)
        logger.warning("task store: %s %s; accept_loss=True: going on without them", path, loss)
    if row is None:
        store_id = uuid.uuid4().hex
        connection.execute(
            "INSERT INTO store_meta (one, store_id, main_mark, wal_mark) VALUES (1, ?, 0, 0)",
            (store_id,),
        )
    else:
        store_id = row[0]
    checkpoint(connection)  # the id is in the main file before it is named beside it
    if named != store_id:
        _write_id(path, store_id)


def _loss(
    path: Path, row: tuple[str, int, int] | None, named: str | None, *, had_wal: bool
) -> str | None:
    """Return what the store lost, or None when nothing shows a loss."""
    beside = id_path(path).name
    if row is None and named is not None:
        return (
            f"holds no store id, yet {beside} names store {named}: the store used here "
            "was emptied, replaced by a new file or deleted"
        )
    if row is not None and named is not None and row[0] != named:
        return f"is store {row[0]}, not store {named} that {beside} names: another store's file"
    if row is not None and row[1] != row[2] and not had_wal:
        return (
            "lost the writes of its last run: its -wal file is missing (deleted, or not "
            "copied with it, after a process using it ended without closing it)"
        )
    return None


def checkpoint(connection: sqlite3.Connection) -> None:
    """Copy the WAL into the main file between the two marks (see the module's doc)."""
    (mark,) = connection.execute("SELECT main_mark FROM store_meta").fetchone()
    connection.execute("UPDATE store_meta SET main_mark = ?", (mark + 1,))
    # RESTART keeps the WAL's frames until the next write: a kill before it leaves a
    # -wal with content (unequal marks and a -wal present: nothing lost).
    connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
    connection.execute("UPDATE store_meta SET wal_mark = ?", (mark + 1,))


def _read_id(path: Path) -> str | None:
    try:
        return id_path(path).read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError("store", f"cannot read {id_path(path)}: {exc.strerror}") from exc


def _write_id(path: Path, store_id: str) -> None:
    """Write the id beside the store atomically (a new file renamed over the old)."""
    target = id_path(path)
    fresh = target.with_name(target.name + ".new")
    try:
        with open(fresh, "w") as file:
            file.write(store_id + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(fresh, target)
    except OSError as exc:
        raise InputError("store", f"cannot write {target}: {exc.strerror}") from exc
