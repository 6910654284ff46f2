"""The task store and idempotency keys: one task per key, across restarts, adoption on start."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sora_async as sa
from sora_async.testing import FakeApixo, fixed

pytestmark = pytest.mark.looptime

PROMPT = sa.TextToVideo(prompt="a lighthouse at dusk", duration=10)


def client_on(fake: FakeApixo, store: sa.TaskStore | None = None) -> sa.SoraClient:
    return sa.SoraClient(api_key=fake.api_key, base_url=fake.url, store=store)


async def test_a_key_makes_one_task_however_often_it_is_sent(
    client: sa.SoraClient, fake: FakeApixo
) -> None:
    """Ten concurrent submits and one later with the same key: one create, one task id."""
    ids = await asyncio.gather(*(client.submit(PROMPT, idempotency_key="k-1") for _ in range(10)))
    assert len(set(ids)) == 1
    assert await client.submit(PROMPT, idempotency_key="k-1") == ids[0]
    other = await client.submit(PROMPT, idempotency_key="k-2")
    assert other != ids[0]
    assert fake.stats.creates == 2
    assert fake.stats.creates_per_prompt[PROMPT.prompt] == 2


async def test_a_key_with_another_request_is_refused_before_any_request(
    client: sa.SoraClient, fake: FakeApixo
) -> None:
    """The same key with a different body raises IdempotencyConflictError, sending nothing."""
    await client.submit(PROMPT, idempotency_key="k")
    requests = fake.stats.requests
    with pytest.raises(sa.IdempotencyConflictError) as caught:
        await client.submit(sa.TextToVideo(prompt="another prompt"), idempotency_key="k")
    assert caught.value.field == "idempotency_key"
    assert isinstance(caught.value, sa.InputError)
    assert fake.stats.requests == requests


@pytest.mark.parametrize("key", ["", "   ", "x" * 256, 7])
async def test_a_bad_key_is_refused_before_any_request(
    client: sa.SoraClient, fake: FakeApixo, key: object
) -> None:
    with pytest.raises(sa.InputError) as caught:
        await client.submit(PROMPT, idempotency_key=key)  # type: ignore[arg-type]
    assert caught.value.field == "idempotency_key"
    assert fake.stats.requests == 0


async def test_a_caller_that_gave_up_finds_its_task_by_its_key(
    client: sa.SoraClient, fake: FakeApixo
) -> None:
    """Callers give up while all slots are busy; their retries get one task per key."""
    for index in range(10):
        await client.submit(sa.TextToVideo(prompt=f"filler {index}"))
    keys = [f"abandoned-{index}" for index in range(5)]
    for key in keys:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                client.submit(sa.TextToVideo(prompt=key), idempotency_key=key), 1.0
            )
    ids = await asyncio.gather(
        *(client.submit(sa.TextToVideo(prompt=key), idempotency_key=key) for key in keys)
    )
    again = [await client.submit(sa.TextToVideo(prompt=key), idempotency_key=key) for key in keys]
    assert ids == again
    assert len(set(ids)) == 5
    assert all(fake.stats.creates_per_prompt[key] == 1 for key in keys)
    assert fake.stats.rate_limited == 0


async def test_a_caller_cancelled_during_the_create_gets_the_same_task_on_retry(
    fake: FakeApixo,
) -> None:
    """A create in flight when its caller gives up still makes one task, found by key."""
    fake.inject("slow", on="create", delay=5.0)
    async with client_on(fake) as client:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.submit(PROMPT, idempotency_key="slow"), 1.0)
        task_id = await client.submit(PROMPT, idempotency_key="slow")
        assert (await client.wait(task_id)).task_id == task_id
    assert fake.stats.creates == 1


async def test_a_restarted_client_adopts_its_running_tasks(fake: FakeApixo, tmp_path: Path) -> None:
    """Tasks recorded by a closed client hold their slots in the next one, which polls
    them to their end: no 429, no second create, every task retrievable."""
    store_path = tmp_path / "tasks.db"
    async with client_on(fake, sa.SQLiteStore(store_path)) as first:
        ids = [await first.submit(PROMPT, idempotency_key=f"key-{n}") for n in range(10)]
    async with client_on(fake, sa.SQLiteStore(store_path)) as second:
        assert second.governor.slots_in_use == 10
        fresh = [sa.TextToVideo(prompt=f"after restart {n}") for n in range(10)]
        videos = await asyncio.gather(*(second.generate(request) for request in fresh))
        assert len(videos) == 10
        again = [await second.submit(PROMPT, idempotency_key=f"key-{n}") for n in range(10)]
        assert again == ids
        for task_id in ids:
            assert (await second.wait(task_id)).task_id == task_id
    assert fake.stats.rate_limited == 0
    assert fake.stats.max_concurrent_tasks == 10
    assert fake.stats.creates_per_prompt[PROMPT.prompt] == 10
    with sqlite3.connect(store_path) as db:
        states = dict(db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())
    assert states == {"succeeded": 20}


async def test_a_task_recorded_as_succeeded_is_answered_without_a_request(
    fake: FakeApixo, tmp_path: Path
) -> None:
    store = tmp_path / "tasks.db"
    async with client_on(fake, sa.SQLiteStore(store)) as first:
        video = await first.generate(PROMPT)
    requests = fake.stats.requests
    async with client_on(fake, sa.SQLiteStore(store)) as second:
        again = await second.wait(video.task_id)
    assert again.urls == video.urls
    assert fake.stats.requests == requests


async def test_a_create_cut_off_by_a_dead_process_is_never_sent_again(
    fake: FakeApixo, tmp_path: Path
) -> None:
    """A record left 'submitting' (the process died with its create in flight) becomes
    uncertain: its key raises SubmitUncertainError and its slot stays held a while."""
    store = tmp_path / "tasks.db"
    async with client_on(fake, sa.SQLiteStore(store)) as first:
        await first.submit(PROMPT, idempotency_key="cut")
    with sqlite3.connect(store) as db:  # as a kill -9 between record and answer leaves it
        db.execute(
            "UPDATE tasks SET state='submitting', task_id=NULL, updated_at=?", (time.time(),)
        )
    async with client_on(fake, sa.SQLiteStore(store)) as second:
        assert second.governor.slots_in_use == 1
        with pytest.raises(sa.SubmitUncertainError):
            await second.submit(PROMPT, idempotency_key="cut")
    assert fake.stats.creates == 1


async def test_a_refused_create_is_recorded_and_its_key_may_try_again(
    client: sa.SoraClient, fake: FakeApixo
) -> None:
    """A refused create made no task: the same key may create (nothing is paid twice)."""
    fake.inject("error_in_200", on="create", status=400)
    with pytest.raises(sa.APIError):
        await client.submit(PROMPT, idempotency_key="refused")
    fake.clear_faults()
    task_id = await client.submit(PROMPT, idempotency_key="refused")
    assert task_id
    assert fake.stats.creates == 1


async def test_a_store_that_cannot_be_opened_names_itself(fake: FakeApixo, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(sa.InputError) as caught:
        async with client_on(fake, sa.SQLiteStore(blocker / "tasks.db")):
            pass
    assert caught.value.field == "store"
    with pytest.raises(sa.InputError) as wrong:
        client_on(fake, "tasks.db")  # type: ignore[arg-type]
    assert wrong.value.field == "store"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    keys=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=12),
)
async def test_any_sequence_of_keys_makes_one_task_per_key(keys: list[str]) -> None:
    """Whatever the order and overlap of keys, each distinct key costs exactly one create."""
    async with FakeApixo(generation_time=fixed(30.0)) as fake:
        async with client_on(fake) as client:
            ids = await asyncio.gather(
                *(client.submit(sa.TextToVideo(prompt=key), idempotency_key=key) for key in keys)
            )
        by_key = dict(zip(keys, ids, strict=True))
        assert all(by_key[key] == task_id for key, task_id in zip(keys, ids, strict=True))
        assert fake.stats.creates == len(set(keys))


async def test_a_key_is_never_resubmitted_after_an_uncertain_create(fake: FakeApixo) -> None:
    """on_uncertain='resubmit' never creates twice under a caller's key; its record and
    any later submit of the key say uncertain."""
    fake.inject("reset_after_create", on="create")
    async with sa.SoraClient(
        api_key=fake.api_key, base_url=fake.url, on_uncertain="resubmit"
    ) as client:
        with pytest.raises(sa.SubmitUncertainError):
            await client.submit(PROMPT, idempotency_key="once")
        with pytest.raises(sa.SubmitUncertainError):
            await client.submit(PROMPT, idempotency_key="once")
        assert await client.submit(sa.TextToVideo(prompt="no key")) is not None
    assert fake.stats.creates_per_prompt[PROMPT.prompt] == 1


async def test_a_damaged_store_is_an_input_error_naming_it(fake: FakeApixo, tmp_path: Path) -> None:
    """A record the client cannot read stops its start with InputError('store'), no traceback."""
    store = tmp_path / "tasks.db"
    async with client_on(fake, sa.SQLiteStore(store)) as first:
        await first.submit(PROMPT, idempotency_key="k")
    with sqlite3.connect(store) as db:
        db.execute("UPDATE tasks SET result_urls='{broken'")
    with pytest.raises(sa.InputError) as caught:
        async with client_on(fake, sa.SQLiteStore(store)):
            pass
    assert caught.value.field == "store"


def record_state(store: Path, key: str) -> str:
    """Return the state a kill at this instant would leave ``key``'s record in."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        (state,) = db.execute("SELECT state FROM tasks WHERE key = ?", (key,)).fetchone()
    return str(state)


async def spend_the_window(client: sa.SoraClient) -> None:
    """Spend every request of the client's window (balance calls), so a create waits."""
    for _ in range(client.limits.requests):
        await client.balance()


@pytest.mark.parametrize("wait", ["429", "503", "permit"])
async def test_a_create_stopped_before_its_bytes_leave_stays_queued(
    fake: FakeApixo, tmp_path: Path, wait: str
) -> None:
    """A create backing off after a 429 or a 503 (no task made), or waiting for its
    permit, reads queued, not submitting, in the store; stopped there (its client
    closed, as a kill would), the next client creates it once under the same key."""
    store = tmp_path / "tasks.db"
    if wait == "429":
        fake.inject("rate_limit", on="create", retry_after=60.0)
    elif wait == "503":
        fake.inject("server_error", on="create", status=503, retry_after=60.0)
    limits = sa.Limits(requests=5, period=60.0)
    async with sa.SoraClient(
        api_key=fake.api_key, base_url=fake.url, limits=limits, store=sa.SQLiteStore(store)
    ) as first:
        if wait == "permit":
            await spend_the_window(first)
        requests = fake.stats.requests
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(first.submit(PROMPT, idempotency_key="waits"), 20.0)
        # The create still holds its slot and waits, inside the client.
        assert first.governor.slots_in_use == 1
        assert fake.stats.requests == requests + (wait != "permit")
        assert record_state(store, "waits") == "queued"
    assert record_state(store, "waits") == "queued"
    assert fake.stats.creates == 0
    async with client_on(fake, sa.SQLiteStore(store)) as second:
        assert second.governor.slots_in_use == 0  # nothing to hold: no task may exist
        task_id = await second.submit(PROMPT, idempotency_key="waits")
        assert (await second.wait(task_id)).task_id == task_id
    assert fake.stats.creates_per_prompt == {PROMPT.prompt: 1}
    assert record_state(store, "waits") == "succeeded"


async def test_a_create_retried_after_a_429_is_recorded_submitting_only_while_sent(
    fake: FakeApixo, tmp_path: Path
) -> None:
    """Each send of a create is recorded submitting just before it leaves, and queued
    again once a 429 proved it made no task: the record follows the bytes."""
    store = tmp_path / "tasks.db"
    fake.inject("rate_limit", on="create", times=2, retry_after=30.0)
    async with client_on(fake, sa.SQLiteStore(store)) as client:
        creating = asyncio.ensure_future(client.submit(PROMPT, idempotency_key="retried"))
        seen = []
        for _ in range(8):
            await asyncio.sleep(10.0)
            seen.append((fake.stats.rate_limited, record_state(store, "retried")))
        task_id = await creating
    assert seen[0] == (1, "queued")
    assert (2, "queued") in seen
    assert seen[-1] == (2, "running")
    assert task_id in fake.tasks
    assert fake.stats.creates == 1


async def test_a_create_retrying_a_refused_connection_stays_queued(tmp_path: Path) -> None:
    """While nothing listens, a create's record reads queued between its attempts (a
    refused connection proves no task was made); stopped there (its client closed), the
    service once up gets the create once under the same key."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = tmp_path / "tasks.db"
    retry = sa.RetryPolicy(attempts=100, cap=5.0)
    async with sa.SoraClient(
        api_key="a-key-that-reaches-nobody",
        base_url=f"http://127.0.0.1:{port}/api/v1",
        retry=retry,
        store=sa.SQLiteStore(store),
    ) as first:
        creating = asyncio.ensure_future(first.submit(PROMPT, idempotency_key="refused"))
        for _ in range(20):
            await asyncio.sleep(1.0)
            assert record_state(store, "refused") == "queued"
        assert not creating.done()
    assert creating.cancelled()
    async with FakeApixo(port=port, generation_time=fixed(60.0)) as fake:
        async with client_on(fake, sa.SQLiteStore(store)) as second:
            task_id = await second.submit(PROMPT, idempotency_key="refused")
            assert (await second.wait(task_id)).task_id == task_id
        assert fake.stats.creates_per_prompt == {PROMPT.prompt: 1}


class FullDisk(sa.MemoryStore):
    """A store that cannot write a record as submitting (say, its disk is full)."""

    async def save(self, record: sa.TaskRecord) -> None:
        if record.state is sa.RecordState.SUBMITTING:
            raise sa.InputError("store", "cannot write: disk full")
        await super().save(record)


async def test_a_create_whose_record_cannot_be_written_is_not_sent(fake: FakeApixo) -> None:
    """The record is written submitting between the permit and the send: when that
    write fails, nothing is sent, the slot goes back and the store's error is raised;
    the record still reads as before."""
    store = FullDisk()
    async with client_on(fake, store) as client:
        with pytest.raises(sa.InputError, match="disk full"):
            await client.submit(PROMPT, idempotency_key="unwritten")
        assert client.governor.slots_in_use == 0
        assert await store.unfinished() == []
    assert fake.stats.creates == 0
    assert fake.stats.requests == 0


async def test_the_store_counts_its_tasks_by_batch_and_state(
    fake: FakeApixo, tmp_path: Path
) -> None:
    """Tasks submitted under a batch's name are counted under it, the rest under "";
    each task once, in the state it ended in (a refused create counts as refused)."""
    store = sa.SQLiteStore(tmp_path / "tasks.db")
    async with client_on(fake, store) as client:
        night = [sa.TextToVideo(prompt=f"night {n}") for n in range(2)]
        night.append(sa.TextToVideo(prompt="night [fail:BOOM]"))
        ids = [await client.submit(request, batch="night") for request in night]
        ids += [await client.submit(sa.TextToVideo(prompt=f"service {n}")) for n in range(2)]
        with pytest.raises(sa.ContentPolicyError):
            await client.submit(sa.TextToVideo(prompt="[violate]"), batch="night")
        running = await store.counts()
        assert running == {"night": {"running": 3, "refused": 1}, "": {"running": 2}}
        await asyncio.gather(*(client.wait(task_id) for task_id in ids), return_exceptions=True)
        await asyncio.sleep(0)  # the last end's write
        ended = await store.counts()
    assert ended == {"night": {"succeeded": 2, "failed": 1, "refused": 1}, "": {"succeeded": 2}}


async def test_a_bad_batch_name_is_refused_before_any_request(client: sa.SoraClient) -> None:
    with pytest.raises(sa.InputError) as caught:
        await client.submit(PROMPT, batch="x" * 201)
    assert caught.value.field == "batch"


async def test_a_store_of_an_earlier_release_opens_and_keeps_its_records(
    fake: FakeApixo, tmp_path: Path
) -> None:
    """A store written before tasks had a batch (no such column) is brought up to date
    when opened: its running task is adopted and counted under no batch."""
    path = tmp_path / "tasks.db"
    async with client_on(fake, sa.SQLiteStore(path)) as first:
        task_id = await first.submit(PROMPT, idempotency_key="old")
    with sqlite3.connect(path) as db:  # as the earlier release wrote it
        db.execute("ALTER TABLE tasks DROP COLUMN batch")
        assert "batch" not in {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    store = sa.SQLiteStore(path)
    async with client_on(fake, store) as second:
        assert await store.counts() == {"": {"running": 1}}
        assert (await second.wait(task_id)).task_id == task_id
        assert await second.submit(PROMPT, idempotency_key="old") == task_id
    assert fake.stats.creates == 1
