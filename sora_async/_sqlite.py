"""One SQLite file served by one thread: the batch journal and the task store.

WAL mode; every call runs in the file's own thread, off the event loop. One thread
owns the connection, so calls are serialised without locks, in the order they were
made (and ``run_in_executor`` keeps virtual-time test loops aware of the work in
flight).
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._errors import InputError

__all__ = ["SQLiteFile"]


class SQLiteFile:
    """A SQLite database used from asyncio. Open with ``await SQLiteFile.open(...)``."""

    def __init__(
        self, connection: sqlite3.Connection, path: Path, field: str, thread: ThreadPoolExecutor
    ) -> None:
        self._db = connection
        self.path = path
        self.field = field
        self._thread = thread

    @classmethod
    async def open(cls, path: Path, schema: tuple[str, ...], *, field: str) -> SQLiteFile:
        """Open (or create) the database at ``path``, its folder and ``schema``.

        Raises InputError naming ``field``, the path and the reason when it cannot be
        opened.
        """
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sora-async-{field}")

        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process; only power loss may undo
            # the last commits.
            connection.execute("PRAGMA synchronous=NORMAL")
            for statement in schema:
                connection.execute(statement)
            return connection

        try:
            connection = await asyncio.get_running_loop().run_in_executor(thread, connect)
        except (sqlite3.Error, OSError) as exc:
            thread.shutdown(wait=False)
            reason = getattr(exc, "strerror", None) or str(exc)
            raise InputError(field, f"cannot open {path}: {reason}") from exc
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(connection, path, field, thread)

    async def run(self, sql: str, params: Any = (), *, many: bool = False) -> list[Any]:
        """Run one statement (or ``many``) in one transaction; return the rows it read."""

        def work() -> list[Any]:
            # Explicitly: the connection is in autocommit mode (isolation_level=None),
            # where `with connection:` begins nothing and each row would commit alone.
            self._db.execute("BEGIN")
            try:
                if many:
                    self._db.executemany(sql, params)
                    rows: list[Any] = []
                else:
                    rows = self._db.execute(sql, params).fetchall()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return rows

        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work)
        except (sqlite3.Error, OSError) as exc:  # a full disk, a file removed under us
            raise InputError(self.field, f"cannot write {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the database, after any write in flight (blocks for milliseconds, so it
        also runs while its user is being cancelled)."""
        self._thread.submit(self._db.close)
        self._thread.shutdown(wait=True)
