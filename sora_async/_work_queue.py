"""One batch's queue of items on Redis, pulled by any number of hosts.

The items sit in a Redis Stream, read through one consumer group: each host is a
consumer that takes entries (``XREADGROUP``), keeps them while it works on them, and
acknowledges each once its item is done (``XACK``). A host that stops renewing its
entries (it died, or lost Redis) loses them to the next host that asks, after one
lease (``XAUTOCLAIM``).

Two guarantees, each one atomic step on Redis:
- Every item enters the stream once, however many hosts fill it at once and
  whichever of them dies halfway: an item's stream id is its position in the
  file, and a chunk is added by a script that skips ids already there. Every filler
  reads the same file, so a second filler finishes what the first began.
- No item is ever begun twice. ``begin`` is taken just before an item's create is
  sent: it succeeds only for the host that holds the entry now, and only once per
  item, ever. An entry taken back from a dead host after its item was begun says by
  whom (``Entry.begun_by``): its task is adopted, never created again.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .redis_governor import patiently

__all__ = ["Entry", "QueueCounts", "WorkQueue"]

T = TypeVar("T")

_GROUP = "hosts"

# KEYS: stream, total. ARGV: n, then per item: position, item id, line, request.
# Adds the items whose position is past the stream's last id; returns how many.
_FILL = """
local last = redis.call('XINFO', 'STREAM', KEYS[1])
local top = 0
for i = 1, #last, 2 do
  if last[i] == 'last-generated-id' then
    top = tonumber(string.match(last[i + 1], '%-(%d+)$'))
  end
end
local added = 0
for i = 1, tonumber(ARGV[1]) do
  local at = 1 + (i - 1) * 4
  local position = tonumber(ARGV[at + 1])
  if position > top then
    redis.call('XADD', KEYS[1], '0-' .. position,
      'id', ARGV[at + 2], 'line', ARGV[at + 3], 'request', ARGV[at + 4])
    top = position
    added = added + 1
  end
end
return added
"""

# KEYS: stream, begun. ARGV: group, consumer, entry id, item id.
# 1: begun by this host; 0: the entry is no longer this host's; -1: begun before.
_BEGIN = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then
  return 0
end
local owner = redis.call('HGET', KEYS[2], ARGV[4])
if owner == ARGV[2] then
  return 1  -- this host's begin, asked again (its answer was lost)
end
if owner then
  return -1
end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[2])
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""

# KEYS: stream. ARGV: group, consumer, entry ids... Resets the idle time of the
# entries this host still holds (never takes one another host took back).
_RENEW = """
local kept = 0
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #pending > 0 and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""


@dataclass(frozen=True)
class Entry:
    """An item taken from the queue: its stream entry, its id, line and request JSON,
    and the host that began it already (None: nobody, it may be begun)."""

    entry_id: str
    item_id: str
    line: int
    request: str
    begun_by: str | None = None


@dataclass(frozen=True)
class QueueCounts:
    """Where a batch's items stand on Redis."""

    added: int  # entered the queue
    taken: int  # held by a host, not yet done
    done: int


class WorkQueue:
    """The queue of batch ``batch_id`` on ``redis``, seen by host ``consumer``.

    ``lease``: seconds after which a host's entries go to another host unless it
    renews them (see :meth:`renew`). Every call waits out a Redis outage for up to
    ``redis_timeout`` seconds, as the governor does, then raises
    RedisUnavailableError; each is safe to send again after a lost answer."""

    def __init__(
        self,
        redis: aioredis.Redis,
        batch_id: str,
        *,
        consumer: str,
        lease: float = 30.0,
        redis_timeout: float = 120.0,
    ) -> None:
        if lease <= 0 or redis_timeout <= 0:
            raise ValueError("lease and redis_timeout must be positive seconds")
        self._redis = redis
        self.redis_timeout = redis_timeout
        self._rng = random.Random()
        self.consumer = consumer
        self.lease = lease
        digest = hashlib.sha256(batch_id.encode()).hexdigest()[:16]
        prefix = f"sora-async:batch:{digest}"
        self._stream = f"{prefix}:items"
        self._begun = f"{prefix}:begun"
        self._filled = f"{prefix}:filled"
        self._tasks = f"{prefix}:tasks"
        self._results = f"{prefix}:results"
        self._fill = redis.register_script(_FILL)
        self._begin = redis.register_script(_BEGIN)
        self._renew = redis.register_script(_RENEW)
        self._ready = False

    async def _patiently(self, call: Callable[[], Awaitable[T]]) -> T:
        async def ready() -> T:
            if not self._ready:
                await self._create_group()
            return await call()

        return await self._patiently_raw(ready)

    async def _patiently_raw(self, call: Callable[[], Awaitable[T]]) -> T:
        return await patiently(
            call, url="the batch's Redis", timeout=self.redis_timeout, rng=self._rng
        )

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._patiently(lambda: script(keys=keys, args=args))

    async def _create_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._stream, _GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready = True

    async def fill(self, items: Iterable[tuple[int, str, int, str]]) -> int:
        """Add a chunk of items, each (position in the file from 1, id, line, request
        JSON), in file order; return how many were new. Items already in are skipped,
        so every host may fill from its own copy of the file, at the same time."""
        args: list[Any] = [0]
        for position, item_id, line, request in items:
            args += [position, item_id, line, request]
        args[0] = (len(args) - 1) // 4
        if not args[0]:
            return 0
        return int(await self._call(self._fill, [self._stream], args))

    async def take(self, count: int) -> list[Entry]:
        """Take up to ``count`` entries: first those whose host let its lease lapse,
        then new ones. Returns at once, with fewer (or none) if there are none."""
        return await self._patiently(lambda: self._take(count))

    async def _take(self, count: int) -> list[Entry]:
        idle = int(self.lease * 1000)
        _, reclaimed, *_ = await self._redis.xautoclaim(
            self._stream, _GROUP, self.consumer, idle, "0-0", count=count
        )
        taken = [_entry(entry_id, fields) for entry_id, fields in reclaimed if fields]
        if len(taken) < count:
            found: Any = await self._redis.xreadgroup(
                _GROUP, self.consumer, {self._stream: ">"}, count=count - len(taken)
            )
            for _, entries in found or []:
                taken += [_entry(entry_id, fields) for entry_id, fields in entries]
        if not reclaimed or not taken:
            return taken
        owners = await self._redis.hmget(self._begun, [entry.item_id for entry in taken])
        return [
            entry if owner is None else _with_owner(entry, owner)
            for entry, owner in zip(taken, owners, strict=True)
        ]

    async def begin(self, entry: Entry) -> bool:
        """Claim ``entry``'s item for a create, just before it is sent; return False if
        this host no longer holds the entry, or anyone began the item before."""
        found = await self._call(
            self._begin,
            [self._stream, self._begun],
            [_GROUP, self.consumer, entry.entry_id, entry.item_id],
        )
        return int(found) == 1

    async def renew(self, entries: Iterable[Entry]) -> int:
        """Keep this host's lease on ``entries``; return how many it still holds."""
        ids = [entry.entry_id for entry in entries]
        if not ids:
            return 0
        return int(await self._call(self._renew, [self._stream], [_GROUP, self.consumer, *ids]))

    async def done(self, entry: Entry) -> None:
        """Acknowledge ``entry``: its item is finished (saved, failed, or uncertain)."""
        await self._patiently(lambda: self._redis.xack(self._stream, _GROUP, entry.entry_id))

    async def filled(self) -> bool:
        """Return whether some host added the whole file already."""
        return bool(await self._patiently(lambda: self._redis.exists(self._filled)))

    async def mark_filled(self) -> None:
        """Note that the whole file is in: later hosts skip reading it into Redis."""
        await self._patiently(lambda: self._redis.set(self._filled, 1))

    async def created(self, item_id: str, task_id: str) -> None:
        """Record the task made for ``item_id``: a host that takes the item back from
        a dead one follows that task instead of creating."""
        await self._patiently(lambda: self._redis.hset(self._tasks, item_id, task_id))

    async def task_of(self, item_id: str) -> str | None:
        """Return the task made for ``item_id``, if its create was answered."""
        found = await self._patiently(lambda: self._redis.hget(self._tasks, item_id))
        return None if found is None else _text(found)

    async def record(self, item_id: str, result: str) -> None:
        """Keep ``item_id``'s result (its manifest line) for the batch's manifest."""
        await self._patiently(lambda: self._redis.hset(self._results, item_id, result))

    async def results(self, page: int = 1000) -> AsyncIterator[tuple[Entry, str | None]]:
        """Yield every item in file order with its recorded result (None: none yet),
        a page at a time."""
        start = "-"
        while True:
            read = functools.partial(self._redis.xrange, self._stream, start, "+", page)
            found: Any = await self._patiently(read)
            if not found:
                return
            entries = [_entry(entry_id, fields) for entry_id, fields in found]
            ids = [entry.item_id for entry in entries]
            results = await self._patiently(
                functools.partial(self._redis.hmget, self._results, ids)
            )
            for entry, result in zip(entries, results, strict=True):
                yield entry, None if result is None else _text(result)
            start = f"({entries[-1].entry_id}"

    async def peek(self) -> QueueCounts | None:
        """Return :meth:`counts`, or None when no host filled this queue (nothing is
        made on Redis: a watcher's read)."""
        if not await self._patiently_raw(lambda: self._redis.exists(self._stream)):
            return None
        return await self.counts()

    async def counts(self) -> QueueCounts:
        """Return how many items were added, are held by a host, and are done."""

        async def read() -> QueueCounts:
            added = await self._redis.xlen(self._stream)
            groups = await self._redis.xinfo_groups(self._stream)
            group = next(g for g in groups if _text(g["name"]) == _GROUP)
            taken = int(group["pending"])
            read_ = int(group.get("entries-read") or 0)
            return QueueCounts(added, taken, read_ - taken)

        return await self._patiently(read)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(entry_id: Any, fields: dict[Any, Any]) -> Entry:
    values = {_text(key): _text(value) for key, value in fields.items()}
    return Entry(_text(entry_id), values["id"], int(values["line"]), values["request"])


def _with_owner(entry: Entry, owner: Any) -> Entry:
    return Entry(entry.entry_id, entry.item_id, entry.line, entry.request, _text(owner))
