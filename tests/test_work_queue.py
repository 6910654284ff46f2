"""One batch's queue on a real redis-server: items enter once, hosts take disjoint
items, a silent host's items go to the others after one lease, and no item is ever
begun twice, even by processes of which one is killed."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import textwrap
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

import sora_async as sa
from sora_async._work_queue import Entry, QueueCounts, WorkQueue
from sora_async.testing import RedisServer


def items(count: int, start: int = 1) -> list[tuple[int, str, int, str]]:
    return [(n, f"item-{n}", n, f'{{"prompt": "p{n}"}}') for n in range(start, count + 1)]


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    connection = aioredis.from_url(redis_server.url)
    yield connection
    await connection.aclose()


def queue(redis: aioredis.Redis, batch: str, host: str, lease: float = 30.0) -> WorkQueue:
    return WorkQueue(redis, batch, consumer=host, lease=lease)


async def test_three_hosts_filling_at_once_add_each_item_once(redis: aioredis.Redis) -> None:
    """Three fillers, one starting late and one stopping halfway, add 1,000 items once."""
    batch = secrets.token_hex(4)
    everything = items(1000)

    async def fill(host: str, chunks: list[list[tuple[int, str, int, str]]]) -> int:
        return sum([await queue(redis, batch, host).fill(chunk) for chunk in chunks])

    chunked = [everything[i : i + 100] for i in range(0, 1000, 100)]
    added = await asyncio.gather(fill("a", chunked), fill("b", chunked[:5]), fill("c", chunked))
    counts = await queue(redis, batch, "d").counts()
    assert sum(added) == 1000
    assert counts.added == 1000
    taken = await queue(redis, batch, "d").take(2000)
    assert [entry.item_id for entry in taken] == [f"item-{n}" for n in range(1, 1001)]


async def test_hosts_take_disjoint_items_and_a_silent_hosts_go_to_another(
    redis: aioredis.Redis,
) -> None:
    """Two hosts take disjoint items; one stops renewing its five, and after one lease
    another host takes them (not before); the host that renews keeps its own."""
    batch = secrets.token_hex(4)
    a, b = queue(redis, batch, "a", lease=0.5), queue(redis, batch, "b", lease=0.5)
    await a.fill(items(10))
    mine, theirs = await a.take(5), await b.take(5)
    assert {e.item_id for e in mine}.isdisjoint({e.item_id for e in theirs})
    assert await b.take(5) == []  # a's items are leased to a
    for _ in range(4):
        await asyncio.sleep(0.2)
        assert await b.renew(theirs) == 5
    taken = await b.take(10)
    assert sorted(e.item_id for e in taken) == sorted(e.item_id for e in mine)
    assert await a.renew(mine) == 0  # gone: a cannot take them back by renewing
    assert (await b.counts()).taken == 10


async def test_an_item_is_begun_once_ever(redis: aioredis.Redis) -> None:
    """A host begins an item and goes silent; the host that takes the entry back is
    told who began it and cannot begin it; the first host, its entry gone, cannot
    begin its other item either."""
    batch = secrets.token_hex(4)
    a, b = queue(redis, batch, "a", lease=0.3), queue(redis, batch, "b", lease=0.3)
    await a.fill(items(2))
    first, second = await a.take(2)
    assert await a.begin(first)
    assert await a.begin(first)  # asked again (an answer lost): the same begin
    await asyncio.sleep(0.5)
    back = {entry.item_id: entry for entry in await b.take(2)}
    assert back[first.item_id].begun_by == "a"
    assert back[second.item_id].begun_by is None
    assert not await b.begin(back[first.item_id])
    assert not await a.begin(second)  # a no longer holds it
    assert await b.begin(back[second.item_id])
    for entry in back.values():
        await b.done(entry)
    assert await b.counts() == QueueCounts(added=2, taken=0, done=2)


async def test_an_unreachable_redis_is_a_sora_error() -> None:
    """A queue whose Redis stays gone for redis_timeout raises RedisUnavailableError,
    not redis-py's error."""
    connection = aioredis.from_url("redis://127.0.0.1:9", socket_connect_timeout=0.2)
    try:
        gone = WorkQueue(connection, "b", consumer="a", redis_timeout=0.5)
        with pytest.raises(sa.RedisUnavailableError):
            await gone.take(1)
        with pytest.raises(sa.RedisUnavailableError):
            await gone.begin(Entry("0-1", "x", 1, "{}"))
    finally:
        await connection.aclose()


# One host: fills the queue from the same 200 items, then takes, begins (counting
# each begin in a hash), "works" 20 ms and acknowledges; an entry another host began
# is acknowledged without a begin (its task would be adopted). It renews its lease
# while it works.
WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from sora_async._work_queue import WorkQueue

    async def main(url, batch, host):
        redis = aioredis.from_url(url)
        queue = WorkQueue(redis, batch, consumer=host, lease=0.5)
        items = [(n, f"item-{n}", n, "{}") for n in range(1, 201)]
        for i in range(0, 200, 50):
            await queue.fill(items[i : i + 50])
        print("ready", flush=True)
        while True:
            taken = await queue.take(3)
            if not taken:
                counts = await queue.counts()
                if counts.done == counts.added:
                    return
                await asyncio.sleep(0.1)
                continue
            for entry in taken:
                if entry.begun_by is None and await queue.begin(entry):
                    await redis.hincrby(f"begun:{batch}", entry.item_id, 1)
                await asyncio.sleep(0.02)
                await queue.renew(taken)
                await queue.done(entry)

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def test_three_processes_one_killed_begin_every_item_exactly_once(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """Three host processes pull 200 items; one is killed with SIGKILL mid-run and never
    restarted. The others finish: every item is done, and begun exactly once."""
    batch = secrets.token_hex(4)
    hosts = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            redis_server.url,
            batch,
            f"host-{n}",
            stdout=asyncio.subprocess.PIPE,
        )
        for n in range(3)
    ]
    for host in hosts:
        assert host.stdout is not None
        assert (await host.stdout.readline()).strip() == b"ready"
    await asyncio.sleep(0.4)
    hosts[0].send_signal(signal.SIGKILL)
    codes = [await asyncio.wait_for(host.wait(), 60) for host in hosts]
    begun = {
        key.decode(): int(value) for key, value in (await redis.hgetall(f"begun:{batch}")).items()
    }
    counts = await queue(redis, batch, "check").counts()
    assert codes == [-signal.SIGKILL, 0, 0]
    assert counts.added == 200
    assert counts.done == 200
    # An item the killed host began (its task would be adopted) counts once; none twice.
    assert set(begun.values()) == {1}
    assert len(begun) >= 197  # the killed host may die between its begin and its count
