"""Priorities across processes: two OS processes on one key through a real
redis-server. The other process's batch creates wait in the key's line first; a user's
create of this process takes the next slot that frees, and a reserve set by the
interactive side keeps a slot from the other process's batch."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest

import sora_async as sa
from sora_async.testing import RedisServer

pytestmark = [pytest.mark.looptime(False), pytest.mark.timeout(60)]

# The other process: a governor on the same key, driven line by line through stdin.
# "hold": take a slot (it prints "held"); "queue N": N batch creates wait for a slot
# (each prints "got K" when it gets one); "free": give one slot back.
BATCH_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    import sora_async as sa

    async def main(url, key, slots):
        governor = sa.RedisGovernor(
            url, api_key=key, limits=sa.Limits(concurrent_tasks=slots), lease=3.0,
            trust_empty_redis=True,
        )
        run = asyncio.ensure_future(governor.run(None))
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        waiting = []

        async def wait(number):
            await governor.acquire_slot("batch")
            print("got", number, flush=True)

        while line := (await reader.readline()).decode().split():
            if line[0] == "hold":
                await governor.acquire_slot("batch")
                print("held", flush=True)
            elif line[0] == "queue":
                waiting += [asyncio.ensure_future(wait(n)) for n in range(int(line[1]))]
                await asyncio.sleep(0.5)  # their tickets are in the key's line
                print("queued", flush=True)
            elif line[0] == "free":
                governor.release_slot()
                print("freed", flush=True)
            elif line[0] == "slots":
                print("slots", governor.slots_in_use, flush=True)
        for task in waiting:
            task.cancel()
        run.cancel()
        await governor.aclose()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


class Other:
    """The other process, and what it printed."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def say(self, line: str, *, answer: str | None) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        await self.process.stdin.drain()
        if answer is not None:
            await self.until(answer)

    async def until(self, start: str) -> str:
        assert self.process.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.process.stdout.readline(), 20)
            assert raw, "the other process ended"
            text = raw.decode().strip()
            self.lines.append(text)
            if text.startswith(start):
                return text

    def got(self) -> list[str]:
        return [line for line in self.lines if line.startswith("got")]


async def other_process(redis_url: str, key: str, slots: int) -> Other:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        BATCH_PROCESS,
        redis_url,
        key,
        str(slots),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    return Other(process)


@contextlib.asynccontextmanager
async def running_governor(
    url: str, key: str, slots: int, **settings: Any
) -> AsyncIterator[sa.RedisGovernor]:
    """A RedisGovernor of this process on the key, its background work running."""
    governor = sa.RedisGovernor(
        url,
        api_key=key,
        limits=sa.Limits(concurrent_tasks=slots),
        lease=3.0,
        trust_empty_redis=True,
        **settings,
    )
    run = asyncio.ensure_future(governor.run(None))  # type: ignore[arg-type]
    try:
        yield governor
    finally:
        run.cancel()
        await governor.aclose()


async def test_a_user_create_takes_the_next_slot_before_another_process_batch(
    redis_server: RedisServer,
) -> None:
    key = secrets.token_hex(8)
    other = await other_process(redis_server.url, key, slots=1)
    async with running_governor(redis_server.url, key, slots=1) as governor:
        await users_first(other, governor)


async def users_first(other: Other, governor: sa.RedisGovernor) -> None:
    try:
        await other.say("hold", answer="held")  # the key's one slot
        await other.say("queue 3", answer="queued")  # three batch creates wait first
        mine = asyncio.ensure_future(governor.acquire_slot("interactive"))
        await asyncio.sleep(0.5)
        assert governor.slot_waiters_by_priority()["interactive"] == 1
        await other.say("free", answer="freed")
        await asyncio.wait_for(mine, 10)  # the user's create got the slot ...
        await asyncio.sleep(1.0)
        assert other.got() == []  # ... and no batch create of the other process did
        governor.release_slot(priority="interactive")
        await other.until("got")  # then the batch goes on
        assert len(other.got()) == 1
    finally:
        await other.say("", answer=None)
        await other.process.wait()


async def test_a_reserve_set_by_the_interactive_side_holds_back_another_process_batch(
    redis_server: RedisServer,
) -> None:
    key = secrets.token_hex(8)
    other = await other_process(redis_server.url, key, slots=3)
    async with (
        running_governor(redis_server.url, key, 3, reserved=1, lend_after=600) as service,
        running_governor(redis_server.url, key, 3) as reserving_nothing,
    ):
        await reserve_holds(other, service, reserving_nothing)


async def reserve_holds(
    other: Other, service: sa.RedisGovernor, reserving_nothing: sa.RedisGovernor
) -> None:
    try:
        await service.acquire_slot("interactive")  # a user came: the reserve holds
        service.release_slot(priority="interactive")
        # A process that reserves nothing (a batch host adopting a running task takes
        # its slot at the highest priority) leaves the service's reserve on the key.
        await reserving_nothing.acquire_slot("interactive")
        reserving_nothing.release_slot(priority="interactive")
        await other.say("queue 3", answer="queued")
        await asyncio.sleep(1.0)
        # The batch (which set no reserve itself) took 2 of 3 slots, not 3.
        assert len(other.got()) == 2
        loop = asyncio.get_running_loop()
        asked = loop.time()
        await service.acquire_slot("interactive")  # the next user starts at once
        assert loop.time() - asked < 1.0
        await service.refresh()  # what sora-async top shows of the key
        waiting, slots = service.key_by_priority()
        assert slots == {"interactive": 1, "normal": 0, "batch": 2}
        assert waiting == {"interactive": 0, "normal": 0, "batch": 1}
    finally:
        await other.say("", answer=None)
        await other.process.wait()
