"""The task store on Redis: one record of every task, shared by every process and host
using one API key (needs the ``redis`` extra, like :class:`RedisGovernor`)."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import redis.asyncio as aioredis

from ._errors import InputError
from ._store import Counts, TaskRecord, counts_of
from .redis_governor import patiently, redis_url_and_key

__all__ = ["RedisStore"]

_T = TypeVar("_T")

_record_decoder = msgspec.json.Decoder(TaskRecord)

# Between a batch's name and a state in a field of the counts hash.
_SEPARATOR = "\x1f"


def _count_field(batch: str, state: str) -> str:
    return f"{batch}{_SEPARATOR}{state}"


# Insert a record unless its key is known, and count it; else return the stored one.
# KEYS: record, counts. ARGV: body, its count field.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
    redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
    return false
end
return redis.call('GET', KEYS[1])
"""

# Write a record, its task index and the unfinished set, and move its count from the
# state it had to the one it has (once, however often the same state is written).
# KEYS: record, task index, unfinished set, counts. ARGV: body, expiry (0: none), the
# record's key, has a task id (1/0), unfinished (1/0), its batch and the separator,
# its state.
_SAVE = """
local was = nil
local old = redis.call('GET', KEYS[1])
if old then
    local ok, decoded = pcall(cjson.decode, old)
    if ok and type(decoded) == 'table' then was = decoded['state'] end
end
local expiry = tonumber(ARGV[2])
local function write(key, value)
    if expiry > 0 then
        redis.call('SET', key, value, 'EX', expiry)
    else
        redis.call('SET', key, value)
    end
end
write(KEYS[1], ARGV[1])
if ARGV[4] == '1' then write(KEYS[2], ARGV[3]) end
if ARGV[5] == '1' then
    redis.call('SADD', KEYS[3], ARGV[3])
else
    redis.call('SREM', KEYS[3], ARGV[3])
end
if was ~= ARGV[7] then
    if was then redis.call('HINCRBY', KEYS[4], ARGV[6] .. was, -1) end
    redis.call('HINCRBY', KEYS[4], ARGV[6] .. ARGV[7], 1)
end
return 1
"""


def _decode_record(body: bytes | str) -> TaskRecord:
    try:
        return _record_decoder.decode(body)
    except msgspec.DecodeError as exc:  # written by something else
        raise InputError("store", f"a task record in Redis cannot be read: {exc}") from exc


class RedisStore:
    """Task records in Redis, shared by the processes and hosts using one API key.

    An idempotency key then holds across all of them: a retry that reaches another
    worker finds the task the first one made. Use it with :class:`RedisGovernor`,
    which adopts the tasks of a dead process by its leases; the store tells the
    adopter which record the task belongs to, so its end is written down too.
    Settled records are kept ``keep`` seconds (default 7 days), then forgotten with
    their keys; unfinished ones are kept until they end. When Redis cannot be
    reached, writes wait up to ``redis_timeout`` seconds, then raise
    :class:`RedisUnavailableError`. Key names carry a hash of the API key, never
    the key. Raises :class:`InputError` for a bad URL, key or setting.
    """

    durable = True
    #: Several processes use it at once: each adopts only through its governor.
    shared = True

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        keep: float = 7 * 86400.0,
        redis_timeout: float = 120.0,
    ) -> None:
        self.url, key = redis_url_and_key(url, api_key)
        if keep <= 0:
            raise InputError("keep", "must be a positive number of seconds")
        if redis_timeout <= 0:
            raise InputError("redis_timeout", "must be a positive number of seconds")
        identity = hashlib.sha256(f"{key}\0store".encode()).hexdigest()[:16]
        self.prefix = f"sora-async:{{{identity}}}:store"
        self.keep = keep
        self.redis_timeout = redis_timeout
        self._redis: aioredis.Redis | None = None
        self._random = random.Random()  # jitter of reconnection attempts

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"

    def _db(self) -> aioredis.Redis:
        if self._redis is None:
            raise InputError("store", "is not open: the client opens it when entered")
        return self._redis

    def _record_key(self, key: str) -> str:
        return f"{self.prefix}:record:{key}"

    def _task_key(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    @property
    def _unfinished_key(self) -> str:
        return f"{self.prefix}:unfinished"

    @property
    def _counts_key(self) -> str:
        return f"{self.prefix}:counts"

    async def _patiently(self, call: Callable[[], Awaitable[_T]]) -> _T:
        return await patiently(
            call,
            url=self.url,
            timeout=self.redis_timeout,
            rng=self._random,
        )

    async def open(self) -> None:
        """Connect (lazily: the first command waits out an outage like any other)."""
        self._redis = aioredis.from_url(
            self.url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=10
        )
        self._claim = self._redis.register_script(_CLAIM)
        self._save = self._redis.register_script(_SAVE)

    async def close(self) -> None:
        """Close the connection pool."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def claim(self, record: TaskRecord) -> TaskRecord:
        """Insert ``record`` unless its key is known; return the record now stored."""
        db = self._db()
        body = msgspec.json.encode(record)
        keys = [self._record_key(record.key), self._counts_key]
        args: list[bytes | str | int] = [body, _count_field(record.batch, record.state.value)]
        stored = await self._patiently(lambda: self._claim(keys, args, client=db))
        return record if stored is None else _decode_record(stored)

    async def save(self, record: TaskRecord) -> None:
        """Write the record, its task id's index, the set of unfinished records and the
        counts by batch and state, at once."""
        db = self._db()
        record.updated_at = time.time()
        body = msgspec.json.encode(record)
        keys = [
            self._record_key(record.key),
            self._task_key(record.task_id or ""),
            self._unfinished_key,
            self._counts_key,
        ]
        args: list[bytes | str | int] = [
            body,
            0 if record.state.unfinished else int(self.keep),
            record.key,
            1 if record.task_id is not None else 0,
            1 if record.state.unfinished else 0,
            record.batch + _SEPARATOR,
            record.state.value,
        ]
        await self._patiently(lambda: self._save(keys, args, client=db))

    async def counts(self) -> Counts:
        """Return how many records stand in each state, by batch ("" for the rest).

        Settled records are counted beyond ``keep``: the counts are of every task the
        store recorded."""
        db = self._db()
        fields = await self._patiently(lambda: db.hgetall(self._counts_key))
        assert isinstance(fields, dict)
        named = ((_text(name).partition(_SEPARATOR), number) for name, number in fields.items())
        return counts_of((batch, state, number) for (batch, _, state), number in named if state)

    async def unfinished(self) -> list[TaskRecord]:
        """Return the records whose task may still hold a slot, oldest first."""
        db = self._db()
        keys = await self._patiently(lambda: db.smembers(self._unfinished_key))
        assert isinstance(keys, set)
        if not keys:
            return []
        names = [self._record_key(_text(key)) for key in keys]
        bodies = await self._patiently(lambda: db.mget(names))
        assert isinstance(bodies, list)
        records = [_decode_record(body) for body in bodies if body is not None]
        return sorted(
            (record for record in records if record.state.unfinished),
            key=lambda record: record.created_at,
        )

    async def find_task(self, task_id: str) -> TaskRecord | None:
        """Return the record of task ``task_id``, if any."""
        db = self._db()
        key = await self._patiently(lambda: db.get(self._task_key(task_id)))
        if key is None:
            return None
        body = await self._patiently(lambda: db.get(self._record_key(_text(key))))
        if body is None:
            return None
        return _decode_record(body)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
