"""One batch that any number of hosts pull from through Redis.

Every host runs the same command on its own copy of the file. The first to come adds
the items to the batch's queue on Redis (``_work_queue``); then each host takes a few
items at a time into its own journal and works them as any batch does. Just before an
item's create is sent, its host *begins* it on Redis, once per item ever: an item is
never created twice, whichever host dies when. A host that dies loses the items it
took but had not begun to the others after one lease; an item it had begun is taken
over by another host, which follows the task it made (its id is on Redis) and saves
the video into its own folder, or reports the item uncertain if the create's answer
never came. Every host stays until the whole batch is done.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ._batch_file import BatchDefaults, BatchItem, read_items, request_from
from ._errors import InputError
from ._journal import ItemState, Journal, item_record, manifest_line
from ._store import TaskRecord
from ._work_queue import Entry, WorkQueue

if TYPE_CHECKING:
    from ._batch import _Runner

__all__ = ["SharedItems", "write_batch_manifest", "write_shared_manifest"]

# Items a host holds beyond the one it is creating: few, so that others find work.
_PREFETCH = 4
# The states that end an item's time in the queue; so does a video made whose download
# failed (saved by its host's next run, from its journal).
_FINISHED = (ItemState.DOWNLOADED, ItemState.FAILED, ItemState.UNCERTAIN)


class SharedItems:
    """This host's part of a batch on ``queue``: the items it holds, by id."""

    def __init__(
        self,
        queue: WorkQueue,
        path: Path,
        defaults: BatchDefaults | None,
        journal: Journal,
        generation: int,
    ) -> None:
        self.queue = queue
        self.path = path
        self.defaults = defaults
        self.journal = journal
        self.generation = generation
        self.held: dict[str, Entry] = {}

    async def fill(self, chunk: int) -> None:
        """Check the whole file, then add its items to the queue (skipped when some
        host did already: a bad line is found before any host sends anything)."""
        if await self.queue.filled():
            return
        for _ in read_items(self.path, self.defaults, chunk=chunk):
            await asyncio.sleep(0)  # checked whole first
        position = 0
        for items in read_items(self.path, self.defaults, chunk=chunk):
            entries = []
            for item in items:
                position += 1
                entries.append((position, item.id, item.line, item.request_json))
            await self.queue.fill(entries)
        await self.queue.mark_filled()

    async def keep_leases(self) -> None:
        """Renew the lease on the items held, a third of a lease apart, forever."""
        while True:
            await anyio.sleep(self.queue.lease / 3)
            await self.queue.renew(list(self.held.values()))

    async def more(self, runner: _Runner) -> bool:
        """Take the next items into the journal; return False once the whole batch is
        done (every host's items). Items begun by a host that stopped are followed."""
        while True:
            taken = await self.queue.take(_PREFETCH)
            if taken:
                await self._enter(taken, runner)
                return True
            counts = await self.queue.counts()
            if counts.added and counts.done >= counts.added:
                return False
            # Others still work: their items come back here if they stop.
            await anyio.sleep(min(1.0, self.queue.lease / 4))

    async def _enter(self, taken: list[Entry], runner: _Runner) -> None:
        fresh: list[BatchItem] = []
        for entry in taken:
            self.held[entry.item_id] = entry
            request = request_from(json.loads(entry.request), BatchDefaults())
            item = BatchItem(entry.item_id, entry.line, request)
            if entry.begun_by is None:
                fresh.append(item)
            else:
                await self._take_over(entry, item, runner)
        if fresh:
            new = await self.journal.add(str(self.path), fresh, self.generation)
            runner.counts[ItemState.QUEUED.value] += new
            runner.report()

    async def _take_over(self, entry: Entry, item: BatchItem, runner: _Runner) -> None:
        """An item another host began: follow its task, or report it uncertain."""
        if await self.journal.state_of(item.id) is not None:
            return  # ours already (this host's lease lapsed): its row goes on
        assert runner.group is not None
        runner.group.start_soon(self._follow_task_of, entry, item, runner)

    async def _follow_task_of(self, entry: Entry, item: BatchItem, runner: _Runner) -> None:
        # Its host may only be slow (paused, or its create's answer on the way): its
        # task id may still come. Two leases without one, and it is uncertain.
        task_id = await self.queue.task_of(item.id)
        waited = 0.0
        while task_id is None and waited < 2 * self.queue.lease:
            await anyio.sleep(self.queue.lease / 4)
            waited += self.queue.lease / 4
            task_id = await self.queue.task_of(item.id)
        if task_id is None:
            reason = f"host {entry.begun_by} stopped while its create was on the wire"
            row = item_record(item.id, item.line, item.request_json, ItemState.UNCERTAIN)
            row.error = reason
        else:
            row = item_record(item.id, item.line, item.request_json, ItemState.RUNNING, task_id)
        await self.journal.enter(item, self.generation, row)
        runner.counts[row.state.value] += 1
        await self.moved(row)
        runner.report()
        if task_id is not None:
            # Followed, not adopted: the key's slot for it is held by whichever process
            # the governor handed the dead host's task to.
            await runner.follow(row)

    async def begin(self, row: TaskRecord) -> bool:
        """Begin ``row``'s item on Redis just before its create; False: not ours."""
        entry = self.held.get(row.id)
        if entry is not None and await self.queue.begin(entry):
            return True
        self.held.pop(row.id, None)
        return False

    async def created(self, row: TaskRecord) -> None:
        """Tell other hosts which task ``row``'s create made."""
        assert row.task_id is not None
        await self.queue.created(row.id, row.task_id)

    async def moved(self, row: TaskRecord) -> None:
        """An item ended here (or is left for a later run): its result is recorded for
        the batch's manifest, and it is done on the queue."""
        if row.state in _FINISHED or (row.state is ItemState.SUCCEEDED and row.error):
            entry = self.held.pop(row.id, None)
            if entry is not None:
                await self.queue.record(row.id, manifest_line(row, host=self.queue.consumer))
                await self.queue.done(entry)

    def release(self, row: TaskRecord) -> None:
        """Stop holding ``row``'s item (not sent, a passing fault): after one lease it
        goes to the next host that asks, this one included."""
        self.held.pop(row.id, None)

    async def write_manifest(self, path: Path) -> int:
        """Write the whole batch's manifest (see write_batch_manifest)."""
        return await write_batch_manifest(self.queue, path)


async def write_batch_manifest(queue: WorkQueue, path: Path) -> int:
    """Write the manifest of ``queue``'s batch: every host's items in file order, each
    with the host that saved it (an item nobody finished reads queued). Return how
    many items it lists."""
    partial = path.with_name(f".{path.name}.part")
    count = 0
    with partial.open("w", encoding="utf-8") as file:
        async for entry, result in queue.results():
            if result is None:
                row = item_record(entry.item_id, entry.line, entry.request, ItemState.QUEUED)
                result = manifest_line(row, host=None)
            file.write(result)
            count += 1
    os.replace(partial, path)
    return count


async def write_shared_manifest(redis_url: str, batch: str, path: Path) -> int:
    """Write the manifest of the batch named ``batch`` on the Redis at ``redis_url``;
    return how many items it lists. Raises InputError when Redis holds no such batch."""
    import redis.asyncio as aioredis

    connection = aioredis.from_url(redis_url)
    try:
        queue = WorkQueue(connection, batch, consumer="manifest", redis_timeout=10.0)
        if not (await queue.counts()).added:
            raise InputError("batch", f"no batch named {batch!r} on that Redis")
        return await write_batch_manifest(queue, path)
    finally:
        await connection.aclose()
