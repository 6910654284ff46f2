"""The client's ledger of its tasks: one record per create, kept in a task store.

A record follows its task from the submit to its end (queued, submitting, running,
then succeeded, failed, refused, or uncertain when a create may have made a task
nobody can name). The ledger holds the idempotency keys (a key given twice never
creates twice), writes each transition the moment it happens, hands a restarted
client the tasks its predecessor left running, and remembers the window's sends so
that a restart does not overrun the key's limits. The client asks it, and knows
nothing of stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio.abc
import msgspec

from ._errors import (
    IdempotencyConflictError,
    NotFoundError,
    ProtocolError,
    SoraError,
    SubmitUncertainError,
    TaskTimeoutError,
)
from ._lanes import Lanes
from ._models import CreateRequest, TaskState, TaskStatus
from ._priority import ADOPTED
from ._sends import SendMemory
from ._store import (
    MemoryStore,
    RecordState,
    SendLog,
    TaskRecord,
    TaskStore,
    fingerprint_of,
)

__all__ = ["Hooks", "Ledger", "NotSent", "Recorded", "note"]

logger = logging.getLogger("sora_async")

# The records of submits without a key get one made up, with this prefix.
AUTO_KEY = "sora-async-auto:"

#: A create's record and the store that keeps it.
Recorded = tuple[TaskStore, TaskRecord]
#: Sends a create with a slot already taken: (model, body), hooks, its record.
CreateWithSlot = Callable[
    [tuple[str, CreateRequest], "Hooks | None", "Recorded | None"], Awaitable[str]
]


class Ledger:
    """The records of one client's tasks, in its ``store`` (or, for idempotency keys
    given without one, in the process's memory)."""

    def __init__(self, store: TaskStore | None, lanes: Lanes, *, uncertain_hold: float) -> None:
        self.store = store
        self._lanes = lanes
        self._uncertain_hold = uncertain_hold
        # Idempotency keys given without a store live as long as the process.
        self._key_records: TaskStore | None = store
        self._key_locks: dict[str, _KeyLock] = {}
        # Creates in flight by idempotency key: a second submit of a key joins them.
        self._creating: dict[str, asyncio.Future[str]] = {}
        self._end_writes: set[asyncio.Task[None]] = set()
        self._sends: SendMemory | None = None  # the window's sends, kept in the store
        self._group: anyio.abc.TaskGroup | None = None

    @property
    def durable(self) -> bool:
        """Return whether the records outlive the process."""
        return self.store is not None and self.store.durable

    async def open(self) -> None:
        """Open the store and read the last window's sends, which each governor counts
        before its first request (0 x 429 at a restart)."""
        if self.store is None:
            return
        await self.store.open()
        if self.store.durable and isinstance(self.store, SendLog):
            self._sends = SendMemory(self.store)
            try:
                await self._sends.load()
            except BaseException:
                await self.store.close()
                raise
            self._lanes.on_governor = self._sends.watch

    def start(self, group: anyio.abc.TaskGroup) -> None:
        """Run background writes (the records of adopted tasks) in ``group``."""
        self._group = group

    async def settle(self) -> None:
        """Let ends already learned reach the store (the client is closing)."""
        if self._end_writes:
            await asyncio.wait(set(self._end_writes), timeout=10.0)

    async def close(self) -> None:
        """Write the window's sends and close the store; tasks still running stay
        recorded, and the next client on the store adopts them."""
        if self._sends is not None:
            await self._sends.flush()
        if self.store is not None:
            await self.store.close()

    # --- creates ----------------------------------------------------------------------------

    def records_for(self, idempotency_key: str | None) -> TaskStore | None:
        """Return where a submit is recorded: the store, or (for a key given without a
        store) the process's memory; None when nothing needs recording."""
        if self._key_records is None and idempotency_key is not None:
            self._key_records = MemoryStore()
        return self.store if idempotency_key is None else self._key_records

    async def submit(
        self,
        records: TaskStore,
        key: str | None,
        batch: str,
        prepared: tuple[str, CreateRequest],
        hooks: Hooks | None,
        create: CreateWithSlot,
        acquire_slot: Callable[[], Awaitable[None]],
    ) -> str:
        """Return the task made for ``key``, or record a create and make it once."""
        key = key or f"{AUTO_KEY}{secrets.token_hex(16)}"
        model, body = prepared
        fingerprint = fingerprint_of(model, body.input)
        async with self._key_lock(key):
            record = await records.claim(
                TaskRecord(
                    key=key,
                    fingerprint=fingerprint,
                    model=model,
                    request=msgspec.json.encode(body.input).decode(),
                    batch=batch,
                )
            )
            if record.fingerprint != fingerprint:
                raise IdempotencyConflictError(key)
            creating = self._creating.get(key)
            if creating is not None:  # its first caller stopped waiting; the create goes on
                return await asyncio.shield(creating)
            if record.task_id is not None:
                return record.task_id
            if record.state in (RecordState.SUBMITTING, RecordState.UNCERTAIN):
                raise SubmitUncertainError(
                    f"the create for idempotency key {key!r} may have made a task whose id "
                    "was never learned; it is not sent again (never pay twice) unless the "
                    "key is released (release_key)"
                )
            # Queued or refused: no task exists for this key, so creating is safe;
            # released: an operator chose to create again, knowing it may pay twice.
            await acquire_slot()
            return await create(prepared, hooks, (records, record))

    def creating(self, key: str, created: asyncio.Future[str]) -> None:
        """Note a create in flight for ``key``: a submit of the key meanwhile joins it."""
        self._creating[key] = created
        created.add_done_callback(lambda _: self._creating.pop(key, None))

    @staticmethod
    def may_resubmit(recorded: Recorded | None) -> bool:
        """Return whether an uncertain create may be sent again: never under a
        caller's idempotency key, which promises one task."""
        return recorded is None or recorded[1].key.startswith(AUTO_KEY)

    async def uncertain_keys(self) -> list[str]:
        """Return the idempotency keys whose create may have made a task nobody can name."""
        records = self._key_records
        if records is None:
            return []
        return sorted(
            record.key
            for record in await records.unfinished()
            if record.state is RecordState.UNCERTAIN and not record.key.startswith(AUTO_KEY)
        )

    async def release_key(self, key: str) -> bool:
        """Let the next submit with ``key`` create again (see SoraClient.release_key)."""
        records = self._key_records
        if records is None:
            return False
        async with self._key_lock(key):
            if key in self._creating:
                return False
            for record in await records.unfinished():
                if record.key == key and record.state is RecordState.UNCERTAIN:
                    was = record.error or "uncertain"
                    record.state = RecordState.RELEASED
                    record.error = f"released: the next submit creates again ({was})"
                    await records.save(record)
                    logger.warning(
                        "idempotency key %r released: its next submit creates a task, "
                        "though its earlier create may have made one",
                        key,
                    )
                    return True
        return False

    @contextlib.asynccontextmanager
    async def _key_lock(self, key: str) -> AsyncIterator[None]:
        """Serialise submits of one key (and drop the lock when nobody holds it)."""
        entry = self._key_locks.setdefault(key, _KeyLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._key_locks[key]

    # --- tasks of earlier processes ---------------------------------------------------------

    async def adopt_recorded(self, adopt: Callable[[str, str], Awaitable[bool]]) -> None:
        """Take over the unfinished tasks a previous process recorded in the store.

        A task with an id holds a slot and is polled to its end (``adopt(task_id,
        model)`` tracks it); a create whose fate was never learned holds a slot for
        what is left of ``uncertain_hold`` (its task may run, unnamed). Where the
        model's governor adopts the tasks of dead processes itself (Redis), it does,
        by its leases, and holds their uncertain creates: the store then only names
        the record of a task adopted here.
        """
        store = self.store
        if store is None or not store.durable:
            return
        for record in await store.unfinished():
            lane = self._lanes.get(record.model)
            if lane.governor.adopts_orphans:
                continue
            if store.shared:
                logger.warning(
                    "task store: %s's records are shared by processes; only a RedisGovernor "
                    "for that model may adopt them (record %s left alone)",
                    record.model,
                    record.key,
                )
                continue
            if record.task_id is not None and record.state is RecordState.RUNNING:
                if await adopt(record.task_id, record.model):
                    logger.info("adopting task %s from the store", record.task_id)
                    self.record_end_of((store, record))
                continue
            if record.state is RecordState.SUBMITTING:
                record.state = RecordState.UNCERTAIN
                record.error = "the process that sent its create stopped before the answer"
                await store.save(record)
            left = self._uncertain_hold - (time.time() - record.updated_at)
            if left > 0:
                await lane.governor.acquire_slot(ADOPTED)
                lane.governor.release_slot_later(left, ADOPTED)

    def adopted_by_governor(self, task_id: str) -> None:
        """A governor handed us a dead process's task: write its end in its record."""
        if self.durable and self._group is not None:
            self._group.start_soon(self._watch_record_of, task_id)

    async def _watch_record_of(self, task_id: str) -> None:
        assert self.store is not None
        try:
            record = await self.store.find_task(task_id)
        except SoraError as exc:
            logger.warning("task store: cannot look up adopted task %s: %s", task_id, exc)
            return
        if record is None or not record.state.unfinished:
            return
        with contextlib.suppress(KeyError):  # it ended while we looked
            self.record_end_of((self.store, record), task_id=task_id)

    async def find(self, task_id: str) -> TaskRecord | None:
        """Return the record of ``task_id``, if the store has one."""
        return None if self.store is None else await self.store.find_task(task_id)

    # --- ends -------------------------------------------------------------------------------

    async def created(self, recorded: Recorded | None, task_id: str) -> None:
        """Record that ``recorded``'s create made ``task_id``, and write its end when
        its scheduler learns it."""
        if recorded is None:
            return
        self.record_end_of(recorded, task_id=task_id)
        await note(recorded, RecordState.RUNNING, task_id=task_id)

    def record_end_of(self, recorded: Recorded, *, task_id: str | None = None) -> None:
        """Write the task's end to its store the moment its scheduler learns it (the
        write is started before any waiter resumes, and ``settle`` awaits it)."""
        record = recorded[1]
        task_id = task_id or record.task_id
        assert task_id is not None

        def ended(done: asyncio.Future[TaskStatus]) -> None:
            write = asyncio.get_running_loop().create_task(_record_end(recorded, done))
            self._end_writes.add(write)
            write.add_done_callback(self._end_writes.discard)

        self._lanes.get(record.model).scheduler.when_ended(task_id, ended)


async def _record_end(recorded: Recorded, done: asyncio.Future[TaskStatus]) -> None:
    if done.cancelled():
        return
    error = done.exception()
    if isinstance(error, (NotFoundError, ProtocolError, TaskTimeoutError)):
        # Unknown to the service, or given up: it no longer holds a slot of ours.
        await note(recorded, RecordState.FAILED, error=str(error))
    elif error is not None:
        return  # tracking stopped without an answer (the key was refused): unknown
    elif (status := done.result()).state is TaskState.SUCCESS:
        await note(recorded, RecordState.SUCCEEDED, urls=list(status.result_urls))
    else:
        failure = f"{status.fail_code or 'failed'}: {status.fail_msg or ''}"
        await note(recorded, RecordState.FAILED, error=failure)


class NotSent(Exception):
    """A create's hook failed before its bytes left: the create is not sent."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Hooks:
    """A create's record and its caller's hooks, told of each attempt's bytes (the
    transport's CreateHooks): ``submitting`` just before a send, ``queued`` again
    after an answer that proved no task was made."""

    __slots__ = ("after_no_task", "before_create", "recorded", "written")

    def __init__(
        self,
        before_create: Callable[[], Awaitable[None]] | None,
        after_no_task: Callable[[], Awaitable[None]] | None,
        recorded: Recorded | None = None,
    ) -> None:
        self.before_create = before_create
        self.after_no_task = after_no_task
        self.recorded = recorded
        self.written = False  # the record reads submitting in its store

    async def sending(self) -> None:
        """Await the caller's hook, then write the record ``submitting``; a failure of
        either raises NotSent (the create is not sent)."""
        if self.before_create is not None:
            try:
                await self.before_create()
            except Exception as exc:
                raise NotSent(exc) from exc
        if self.recorded is None:
            return
        store, record = self.recorded
        before = record.state, record.error
        record.state, record.error = RecordState.SUBMITTING, None
        try:
            await store.save(record)
        except Exception as exc:
            record.state, record.error = before
            with contextlib.suppress(NotSent):
                await self.no_task()  # the caller's row goes back: nothing is sent
            raise NotSent(exc) from exc
        self.written = True

    async def no_task(self) -> None:
        """Write the record ``queued`` again, then await the caller's hook."""
        if self.written:
            self.written = False
            await note(self.recorded, RecordState.QUEUED)
        if self.after_no_task is not None:
            try:
                await self.after_no_task()
            except Exception as exc:
                raise NotSent(exc) from exc


class _KeyLock:
    """The lock of one idempotency key, and how many submits hold or await it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


async def note(
    recorded: Recorded | None,
    state: RecordState,
    *,
    task_id: str | None = None,
    urls: list[str] | None = None,
    error: str | None = None,
) -> None:
    """Move a recorded task to ``state`` and write it (nothing when not recorded)."""
    if recorded is None:
        return
    store, record = recorded
    record.state = state
    if task_id is not None:
        record.task_id = task_id
    if urls is not None:
        record.result_urls = urls
    record.error = error
    try:
        await store.save(record)
    except SoraError as exc:  # the task goes on in memory; the operator must hear of it
        logger.error("task store: cannot record %s as %s: %s", record.key, state.value, exc)
