"""The task store: one record of every task a client creates, written before its
create is sent and after every transition, so that a restarted process knows the
tasks it paid for (and adopts the unfinished ones) and an idempotency key never
creates twice.

Two stores keep the same records: :class:`SQLiteStore` on disk (one host, any
number of restarts) and :class:`MemoryStore` (one process's life: idempotency keys
without durability, the client's default when a key is given and no store is).
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import msgspec

from ._errors import InputError
from ._sqlite import SQLiteFile
from ._store_guard import CHECKPOINT_EVERY, checkpoint, guard, wal_present

__all__ = [
    "Counts",
    "MemoryStore",
    "RecordState",
    "SQLiteStore",
    "SendLog",
    "TaskRecord",
    "TaskStore",
    "check_idempotency_key",
    "counts_of",
    "fingerprint_of",
]

# As the IETF draft of the Idempotency-Key header suggests, a key is an opaque
# string of bounded length (a UUID is typical).
MAX_KEY_LENGTH = 255


class RecordState(str, enum.Enum):
    """Where a task stands: one state machine for every task, whoever made it (a
    submit, a service, a batch item; ``sa.ItemState`` is this same enum)."""

    QUEUED = "queued"  # recorded, no create sent yet
    SUBMITTING = "submitting"  # a create's bytes may be on the wire: its fate is not known
    RUNNING = "running"  # the task exists: its id is known, its end is not
    SUCCEEDED = "succeeded"  # ended with results
    FAILED = "failed"  # ended without results (failed, given up, or unknown to the service)
    REFUSED = "refused"  # the service refused the create: no task, nothing paid
    UNCERTAIN = "uncertain"  # a create may have made a task we cannot name
    # An operator released an uncertain create's key: the next submit with it creates
    # again, knowingly (it may pay twice). Nothing holds a slot for it any more.
    RELEASED = "released"
    DOWNLOADED = "downloaded"  # a batch item's video is on disk: done

    @property
    def unfinished(self) -> bool:
        """Return whether a task may hold a slot on the service: it was, or may have
        been, created, and its end is not known."""
        return self in (RecordState.SUBMITTING, RecordState.RUNNING, RecordState.UNCERTAIN)


@dataclass
class TaskRecord:
    """One task as the ledger holds it, whoever made it: a client's store and a
    batch's journal keep this same record. ``key`` is the caller's idempotency key,
    one the client made up, or a batch item's id."""

    key: str
    fingerprint: str  # of the model and the input: the same key must come with the same
    model: str
    request: str  # the input's JSON, for the operator
    # The batch the task belongs to ("" for a service's or a script's own submits):
    # the ledger counts its tasks by it (see ``counts`` and ``sora-async top``).
    batch: str = ""
    state: RecordState = RecordState.QUEUED
    task_id: str | None = None
    result_urls: list[str] = field(default_factory=list)
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    # A batch item's: its line in the batch's file, the files its results were saved
    # to, the creates tried for it, and its task's generation time in seconds.
    line: int = 0
    files: list[str] = field(default_factory=list)
    attempts: int = 0
    seconds: float | None = None

    @property
    def id(self) -> str:
        """Return a batch item's id: its record's ``key``."""
        return self.key


#: How many records stand in each state (by its value), by batch ("" for the rest).
Counts = dict[str, dict[str, int]]


def counts_of(rows: Iterable[tuple[Any, Any, Any]]) -> Counts:
    """Sum (batch, state, number) rows into :data:`Counts` (zeros left out)."""
    counts: Counts = {}
    for batch, state, number in rows:
        if int(number) > 0:
            by_state = counts.setdefault(str(batch), {})
            by_state[str(state)] = by_state.get(str(state), 0) + int(number)
    return counts


def fingerprint_of(model: str, payload: Any) -> str:
    """Return a short hash of ``model`` and the request ``payload`` (keys sorted)."""
    body = msgspec.json.encode([model, payload], order="sorted")
    return hashlib.sha256(body).hexdigest()[:32]


def check_idempotency_key(key: object) -> str:
    """Return ``key`` if it is a usable idempotency key, else raise InputError."""
    if not isinstance(key, str) or not key.strip():
        raise InputError("idempotency_key", "must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InputError("idempotency_key", f"must be at most {MAX_KEY_LENGTH} characters")
    return key


@runtime_checkable
class TaskStore(Protocol):
    """Where a client records its tasks. Both methods of a record are awaited in
    the order they were called."""

    #: whether records outlive the process (a restarted client adopts from it)
    durable: bool
    #: whether several processes use it at once (their governor must adopt orphans)
    shared: bool

    async def open(self) -> None:
        """Open the store (the client calls it when entered)."""

    async def close(self) -> None:
        """Close the store, after any write in flight."""

    async def claim(self, record: TaskRecord) -> TaskRecord:
        """Insert ``record`` unless its key is known; return the record now stored."""

    async def save(self, record: TaskRecord) -> None:
        """Write ``record``'s state, task id, result URLs and error."""

    async def unfinished(self) -> list[TaskRecord]:
        """Return the records whose task may still hold a slot on the service
        (submitting, running or uncertain)."""

    async def find_task(self, task_id: str) -> TaskRecord | None:
        """Return the record of task ``task_id``, if any."""


@runtime_checkable
class SendLog(Protocol):
    """A store that also keeps the request sends of the last window (wall-clock
    times, by budget), so that a client restarted on it waits for the window its
    predecessor spent instead of earning 429s."""

    async def record_sends(
        self, budget: str, times: Sequence[float], *, forget_before: float
    ) -> None:
        """Add ``times`` (``time.time()`` seconds) to ``budget``'s sends, and forget
        its sends before ``forget_before``."""

    async def recent_sends(self) -> dict[str, list[float]]:
        """Return the recorded sends of each budget, oldest first."""


class MemoryStore:
    """Records in this process's memory: idempotency keys for its life, no durability.

    Keeps every unfinished record and the ``keep`` most recent settled ones.
    """

    durable = False
    shared = False

    def __init__(self, *, keep: int = 10_000) -> None:
        self.keep = keep
        self._records: OrderedDict[str, TaskRecord] = OrderedDict()

    async def open(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def claim(self, record: TaskRecord) -> TaskRecord:
        """Insert ``record`` unless its key is known; return the record now stored."""
        found = self._records.setdefault(record.key, record)
        self._records.move_to_end(record.key)
        excess = len(self._records) - self.keep
        if excess > 0:  # forget the oldest settled records (unfinished ones may hold slots)
            oldest = itertools.islice(self._records.items(), 2 * excess + 16)
            settled = [key for key, old in oldest if not old.state.unfinished]
            for key in settled[:excess]:
                del self._records[key]
        return found

    async def save(self, record: TaskRecord) -> None:
        """Records are shared with the caller: nothing to write."""
        record.updated_at = time.time()

    async def unfinished(self) -> list[TaskRecord]:
        """Return the records whose task may still hold a slot."""
        return [record for record in self._records.values() if record.state.unfinished]

    async def counts(self) -> Counts:
        """Return how many records stand in each state, by batch ("" for the rest)."""
        return counts_of(
            (batch, state.value, 1)
            for batch, state in ((record.batch, record.state) for record in self._records.values())
        )

    async def find_task(self, task_id: str) -> TaskRecord | None:
        """Return the record of task ``task_id``, if any."""
        for record in self._records.values():
            if record.task_id == task_id:
                return record
        return None


_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS tasks (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        model TEXT NOT NULL,
        request TEXT NOT NULL,
        batch TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,
        task_id TEXT,
        result_urls TEXT NOT NULL DEFAULT '[]',
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS tasks_by_task_id ON tasks (task_id)",
    "CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state)",
    # The requests sent in the last window, by budget (see SendLog): a few dozen rows.
    "CREATE TABLE IF NOT EXISTS sends (budget TEXT NOT NULL, at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sends_by_budget ON sends (budget, at)",
)
_COLUMNS = (
    "key, fingerprint, model, request, state, task_id, result_urls, error, created_at, updated_at, "
    "batch"
)


def _record_of(row: tuple[Any, ...]) -> TaskRecord:
    try:
        return _decode_row(row)
    except (ValueError, TypeError) as exc:  # a file written by something else
        raise InputError("store", f"record {row[0]!r} cannot be read: {exc}") from exc


def _decode_row(row: tuple[Any, ...]) -> TaskRecord:
    return TaskRecord(
        key=row[0],
        fingerprint=row[1],
        model=row[2],
        request=row[3],
        state=RecordState(row[4]),
        task_id=row[5],
        result_urls=json.loads(row[6]),
        error=row[7],
        created_at=row[8],
        updated_at=row[9],
        batch=row[10],
    )


class SQLiteStore:
    """Records in a SQLite file (WAL): they survive a killed process, and the next
    client opened on the same file adopts the unfinished tasks.

    One process at a time should write a file; processes sharing a key on several
    hosts share the slots through :class:`RedisGovernor`, each with its own file.

    A store is four files: ``path``, ``path-wal`` and ``path-shm`` (SQLite's) and
    ``path-id`` (its id). Opening refuses, with InputError naming ``store``, a damaged
    file, and with :class:`StoreLossError` a store that lost records: its -wal
    deleted after a kill, or a new or other file at a path whose ``-id`` names
    another store. ``accept_loss=True`` opens such a store anyway, knowingly.

    The file also keeps the times of the requests sent in the last window (see
    :class:`SendLog`): a client restarted on it waits for the window its predecessor
    spent.
    """

    durable = True
    shared = False

    def __init__(self, path: str | Path, *, accept_loss: bool = False) -> None:
        self.path = Path(path)
        self.accept_loss = accept_loss
        self._file: SQLiteFile | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    async def open(self) -> None:
        """Open (or create) the file; raises InputError naming ``store`` if it cannot,
        or if it is damaged, and StoreLossError if it lost records."""
        had_wal = wal_present(self.path)
        self._file = await SQLiteFile.open(
            self.path,
            _SCHEMA,
            field="store",
            prepare=lambda db: guard(db, self.path, had_wal=had_wal, accept_loss=self.accept_loss),
        )
        columns = {row[1] for row in await self._file.run("PRAGMA table_info(tasks)")}
        if "batch" not in columns:  # a store of an earlier release
            await self._file.run("ALTER TABLE tasks ADD COLUMN batch TEXT NOT NULL DEFAULT ''")
        # The store checkpoints by itself (see _store_guard), after any writer's writes.
        self._file.checkpoint = checkpoint
        self._file.checkpoint_every = CHECKPOINT_EVERY

    async def close(self) -> None:
        """Close the file, after any write in flight."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _db(self) -> SQLiteFile:
        if self._file is None:
            raise InputError("store", "is not open: the client opens it when entered")
        return self._file

    async def claim(self, record: TaskRecord) -> TaskRecord:
        """Insert ``record`` unless its key is known; return the record now stored."""
        rows = await self._db().run(
            "INSERT INTO tasks "
            "(key, fingerprint, model, request, batch, state, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING "
            f"RETURNING {_COLUMNS}",
            (
                record.key,
                record.fingerprint,
                record.model,
                record.request,
                record.batch,
                record.state.value,
                record.created_at,
                record.updated_at,
            ),
        )
        if rows:
            return record
        found = await self._db().run(f"SELECT {_COLUMNS} FROM tasks WHERE key = ?", (record.key,))
        return _record_of(found[0])

    async def save(self, record: TaskRecord) -> None:
        """Write ``record``'s state, task id, result URLs and error."""
        record.updated_at = time.time()
        await self._db().run(
            "UPDATE tasks SET state=?, task_id=?, result_urls=?, error=?, updated_at=? WHERE key=?",
            (
                record.state.value,
                record.task_id,
                json.dumps(record.result_urls),
                record.error,
                record.updated_at,
                record.key,
            ),
        )

    async def unfinished(self) -> list[TaskRecord]:
        """Return the records whose task may still hold a slot, oldest first."""
        rows = await self._db().run(
            f"SELECT {_COLUMNS} FROM tasks WHERE state IN ('submitting', 'running', 'uncertain') "
            "ORDER BY created_at"
        )
        return [_record_of(row) for row in rows]

    async def find_task(self, task_id: str) -> TaskRecord | None:
        """Return the record of task ``task_id``, if any."""
        rows = await self._db().run(
            f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ? LIMIT 1", (task_id,)
        )
        return _record_of(rows[0]) if rows else None

    async def counts(self) -> Counts:
        """Return how many records stand in each state, by batch ("" for the rest)."""
        rows = await self._db().run(
            "SELECT batch, state, COUNT(*) FROM tasks GROUP BY batch, state"
        )
        return counts_of((batch, state, number) for batch, state, number in rows)

    async def record_sends(
        self, budget: str, times: Sequence[float], *, forget_before: float
    ) -> None:
        """Add ``times`` to ``budget``'s sends and forget those before ``forget_before``."""
        db = self._db()
        await db.run(
            "INSERT INTO sends (budget, at) VALUES (?, ?)",
            [(budget, at) for at in times],
            many=True,
        )
        await db.run("DELETE FROM sends WHERE budget = ? AND at < ?", (budget, forget_before))

    async def recent_sends(self) -> dict[str, list[float]]:
        """Return the recorded sends of each budget, oldest first."""
        sends: dict[str, list[float]] = {}
        for budget, at in await self._db().run("SELECT budget, at FROM sends ORDER BY at"):
            if isinstance(budget, str) and isinstance(at, (int, float)):
                sends.setdefault(budget, []).append(float(at))
        return sends
