"""One SQLite file served by one thread: the batch journal and the task store.

WAL mode; every call runs in the file's own thread, off the event loop. One thread
owns the connection, so calls are serialised without locks, in the order they were
made (and ``run_in_executor`` keeps virtual-time test loops aware of the work in
flight).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ._errors import InputError

T = TypeVar("T")

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
        #: run in the file's thread after every ``checkpoint_every`` writing transactions
        self.checkpoint: Callable[[sqlite3.Connection], None] | None = None
        self.checkpoint_every = 0
        self._writes = 0
        self._changes = connection.total_changes
        # Calls handed to the thread (counted here) and finished (counted there): equal
        # when the thread is idle and nothing waits for it (see transaction's inline).
        self._handed = 0
        self._finished = 0

    @classmethod
    async def open(
        cls,
        path: Path,
        schema: tuple[str, ...],
        *,
        field: str,
        prepare: Callable[[sqlite3.Connection], None] | None = None,
    ) -> SQLiteFile:
        """Open (or create) the database at ``path``, its folder and ``schema``.

        A damaged file is refused (``PRAGMA quick_check``). ``prepare`` runs next, in
        the file's thread, before ``schema`` (it may raise InputError to refuse the
        file). Raises InputError naming ``field``, the path and the reason when the file
        cannot be opened.
        """
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sora-async-{field}")

        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Not only this thread's: an inline transaction runs on the loop's, while
            # this one is idle.
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                _damaged_if_unreadable(connection, path, field)
                connection.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode survives a killed process; only power loss may undo
                # the last commits.
                connection.execute("PRAGMA synchronous=NORMAL")
                _check_whole(connection, path, field)
                if prepare is not None:
                    prepare(connection)
                for statement in schema:
                    connection.execute(statement)
            except BaseException:
                connection.close()
                raise
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

        def work(db: sqlite3.Connection) -> list[Any]:
            if many:
                db.executemany(sql, params)
                return []
            return db.execute(sql, params).fetchall()

        return await self.transaction(work)

    async def transaction(
        self, work: Callable[[sqlite3.Connection], T], *, inline: bool = False
    ) -> T:
        """Run ``work`` with the connection in one transaction, in the file's thread:
        all of its writes are kept, or none (an error rolls them back and is raised).

        ``inline``: a short ``work`` runs at once in the caller's thread instead when
        the file's thread is idle with nothing queued (so still in call order): the
        two thread switches of a hop cost several times what a one-row write does."""

        def atomic(here: bool = False) -> T:
            # Explicitly: the connection is in autocommit mode (isolation_level=None),
            # where `with connection:` begins nothing and each row would commit alone.
            self._db.execute("BEGIN")
            try:
                result = work(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._after_write(inline=here)  # outside the transaction: a checkpoint may run
            return result

        try:
            if inline and self._finished == self._handed:
                return atomic(True)
            return await self._in_thread(atomic)
        except (sqlite3.Error, OSError) as exc:  # a full disk, a file removed under us
            raise InputError(self.field, f"cannot write {self.path}: {exc}") from exc

    async def call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` with the connection in the file's thread; return what it returns."""
        try:
            return await self._in_thread(lambda: work(self._db))
        except (sqlite3.Error, OSError) as exc:
            raise InputError(self.field, f"cannot write {self.path}: {exc}") from exc

    async def _in_thread(self, work: Callable[[], T]) -> T:
        def counted() -> T:
            try:
                return work()
            finally:
                self._finished += 1  # only this thread writes it

        self._handed += 1  # a call cancelled before it started leaves the two unequal:
        # inline calls then go to the thread too (safe, only slower)
        return await asyncio.get_running_loop().run_in_executor(self._thread, counted)

    def _after_write(self, *, inline: bool = False) -> None:
        """Count a transaction that changed rows; checkpoint when it is time (every
        writer of the file counts, whichever table it writes)."""
        if self.checkpoint is None or self._db.total_changes == self._changes:
            return
        self._changes = self._db.total_changes
        self._writes += 1
        if self._writes >= self.checkpoint_every:
            self._writes = 0
            if inline:  # not on the loop: a checkpoint writes pages back and syncs
                self._handed += 1
                self._thread.submit(self._checkpoint, True)
            else:
                self._checkpoint()

    def _checkpoint(self, handed: bool = False) -> None:
        assert self.checkpoint is not None
        try:
            self.checkpoint(self._db)
            self._changes = self._db.total_changes
        finally:
            if handed:
                self._finished += 1

    def close(self) -> None:
        """Close the database, after any write in flight (blocks for milliseconds, so it
        also runs while its user is being cancelled)."""
        self._handed += 1  # never inline again
        self._thread.submit(self._db.close)
        self._thread.shutdown(wait=True)


def _damaged(path: Path, field: str, found: str) -> InputError:
    """Return the error that refuses a damaged file, with what SQLite ``found``."""
    damage = (
        "is not a SQLite database, or is damaged" if "not a database" in found else "is damaged"
    )
    return InputError(
        field,
        f"cannot open {path}: it {damage} (SQLite: {found}): restore it from a backup, "
        "or move it aside with its -wal and -shm files to start afresh",
    )


def _damaged_if_unreadable(connection: sqlite3.Connection, path: Path, field: str) -> None:
    """Raise InputError if SQLite cannot even read the file's schema (not a database,
    or its first pages are damaged)."""
    try:
        connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
    except sqlite3.OperationalError:  # cannot open, locked, I/O: the caller says so
        raise
    except sqlite3.DatabaseError as exc:
        raise _damaged(path, field, str(exc)) from exc


def _check_whole(connection: sqlite3.Connection, path: Path, field: str) -> None:
    """Raise InputError unless SQLite's quick integrity check finds the file whole
    (it reads every page once: a second or so for a file of hundreds of MB)."""
    try:
        found = [row[0] for row in connection.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as exc:
        found = [str(exc)]
    if found != ["ok"]:
        raise _damaged(path, field, "; ".join(map(str, found)))
