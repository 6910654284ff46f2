"""A Redis outage longer than ``redis_timeout`` raises RedisUnavailableError itself.

Every public call that waits on a RedisGovernor (submit, wait, generate,
generate_many, run_batch, the command line's batch) raises the error the governor
gave, never an exception group from a task group inside, and the client's exit does
not turn it into one. A batch stops as for a stop request: its journal and manifest
stay whole, and running it again once Redis is back finishes every item with one
create per prompt. Real time, real redis-server processes (each test stops its own),
the fake service on loopback; the command line runs in real OS processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

import sora_async as sa
from sora_async.testing import FakeApixo, RedisServer, fixed
from tests.workers import scaled_fake, start_worker, until, write_prompts

pytestmark = [pytest.mark.looptime(False), pytest.mark.timeout(90)]

REDIS_TIMEOUT = 1.0


@pytest.fixture
async def service() -> AsyncIterator[FakeApixo]:
    """The fake service at the real limits; generations take two seconds."""
    async with FakeApixo(generation_time=fixed(2.0), pending_time=0.05) as fake:
        yield fake


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which the test stops and starts: it keeps its
    data, as after a network partition or the restart of a persistent Redis."""
    with RedisServer(persist=True) as server:
        yield server


def client_for(fake: FakeApixo, server: RedisServer) -> sa.SoraClient:
    """A client of ``fake`` through a RedisGovernor that gives up after REDIS_TIMEOUT.

    The key is the fake's own, which nothing else uses: an empty Redis is trusted."""
    governor = sa.RedisGovernor(
        server.url,
        api_key=fake.api_key,
        trust_empty_redis=True,
        lease=1.0,
        redis_timeout=REDIS_TIMEOUT,
    )
    return sa.SoraClient(
        api_key=fake.api_key,
        base_url=fake.url,
        governor=governor,
        poll_policy=sa.PollPolicy(prior_mean=2.0, min_interval=0.2),
    )


@contextlib.asynccontextmanager
async def redis_stops_when(
    server: RedisServer, condition: Callable[[], bool]
) -> AsyncIterator[None]:
    """Stop ``server`` once ``condition`` holds, while the body runs."""

    async def stopper() -> None:
        await until(condition)
        await asyncio.to_thread(server.stop)

    stopping = asyncio.ensure_future(stopper())
    try:
        yield
    except BaseException:
        stopping.cancel()  # the body failed before the condition held, maybe
        raise
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await stopping


def assert_is_the_error(error: BaseException, server: RedisServer) -> None:
    """The error is RedisUnavailableError itself, and names Redis and where it runs."""
    assert type(error) is sa.RedisUnavailableError, repr(error)
    assert "Redis" in str(error)
    assert f"127.0.0.1:{server.port}" in str(error)


def journal_states(journal: Path) -> dict[str, tuple[str, str | None]]:
    """Return each item's (state, task id), after checking the journal's integrity."""
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = db.execute("SELECT id, state, task_id FROM items").fetchall()
    return {item: (state, task_id) for item, state, task_id in rows}


async def test_run_batch_raises_the_error_and_its_rerun_finishes(
    service: FakeApixo, redis: RedisServer, tmp_path: Path
) -> None:
    """Redis stops mid-batch for longer than redis_timeout: run_batch raises
    RedisUnavailableError (not an exception group), and the client closes cleanly. The
    journal is whole and holds nothing ambiguous: every item is queued (no create sent)
    or has its task id; the manifest names every item. Run again once Redis is back,
    the batch adopts the running tasks, creates the rest, and every prompt was created
    exactly once."""
    prompts = write_prompts(tmp_path, 12)
    out = tmp_path / "out"
    with pytest.raises(sa.RedisUnavailableError) as caught:
        async with (
            client_for(service, redis) as client,
            redis_stops_when(redis, lambda: service.stats.creates >= 3),
        ):
            await sa.run_batch(client, prompts, out)
    assert_is_the_error(caught.value, redis)
    states = journal_states(out / ".sora-async-journal.sqlite")
    assert len(states) == 12
    assert {state for state, _ in states.values()} <= {"queued", "running", "downloaded"}
    assert all(task_id for state, task_id in states.values() if state != "queued")
    assert sum(state != "queued" for state, _ in states.values()) == service.stats.creates
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in manifest) == sorted(states)

    await asyncio.to_thread(redis.start)
    async with client_for(service, redis) as client:
        report = await sa.run_batch(client, prompts, out)
    assert report.ok, report.counts
    assert len(service.stats.creates_per_prompt) == 12
    assert set(service.stats.creates_per_prompt.values()) == {1}
    assert len(list(out.glob("*.mp4"))) == 12


async def test_generate_raises_the_error_and_the_client_goes_on(
    service: FakeApixo, redis: RedisServer
) -> None:
    """Redis stops while generate waits for its task: generate raises
    RedisUnavailableError soon after redis_timeout (not at its own deadline), and
    the error leaves ``async with`` as itself. A client whose poller met the outage
    still works once Redis is back: its task stayed tracked and wait() returns it."""
    request = sa.TextToVideo(prompt="a red kite", duration=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(sa.RedisUnavailableError) as caught:
        async with (
            client_for(service, redis) as client,
            redis_stops_when(redis, lambda: service.stats.creates >= 1),
        ):
            await client.generate(request)
    assert_is_the_error(caught.value, redis)
    assert loop.time() - started < 10 * REDIS_TIMEOUT

    await asyncio.to_thread(redis.start)
    async with client_for(service, redis) as client:
        task_id = await client.submit(request)
        await asyncio.to_thread(redis.stop)
        with pytest.raises(sa.RedisUnavailableError) as caught:
            await client.wait(task_id, timeout=30)
        assert_is_the_error(caught.value, redis)
        await asyncio.to_thread(redis.start)
        video = await client.wait(task_id, timeout=30)
    assert video.task_id == task_id
    assert service.stats.creates == 2


async def test_generate_many_raises_the_error_and_the_client_closes_cleanly(
    service: FakeApixo, redis: RedisServer
) -> None:
    """Redis stops mid-fan-out: the generate_many iterator raises
    RedisUnavailableError itself, and the client's exit (with Redis still down) raises
    nothing more."""
    requests = [sa.TextToVideo(prompt=f"fan {i}", duration=10) for i in range(14)]
    async with client_for(service, redis) as client:
        with pytest.raises(sa.RedisUnavailableError) as caught:
            async with redis_stops_when(redis, lambda: service.stats.creates >= 4):
                async for outcome in client.generate_many(requests):
                    assert outcome.ok, outcome.error
    assert_is_the_error(caught.value, redis)


async def test_the_clients_exit_raises_no_group_after_its_poller_met_an_outage(
    service: FakeApixo, redis: RedisServer
) -> None:
    """Tasks are in flight when Redis stops and stays down past redis_timeout; the
    body only waits. The client's background poller meets the outage (and says so in
    the log) but lives on; leaving ``async with`` raises nothing."""
    async with client_for(service, redis) as client:
        for i in range(3):
            await client.submit(sa.TextToVideo(prompt=f"idle {i}", duration=10))
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(4 * REDIS_TIMEOUT)
    assert service.stats.creates == 3


# --- the command line, in real processes ---------------------------------------------


@pytest.fixture
async def scaled_service() -> AsyncIterator[FakeApixo]:
    """The fake service at the real limits, every timing divided by SCALE
    (redis_timeout is then 10 s: the CLI keeps it at 10 s or more)."""
    async with scaled_fake(seed=21) as fake:
        yield fake


async def outcome(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """Wait (at most 60 s) for a process; return its exit code, stdout and stderr."""
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def assert_no_traceback(*texts: str) -> None:
    """Nothing a user sees is a traceback or an exception group."""
    for text in texts:
        assert "Traceback" not in text
        assert "ExceptionGroup" not in text


async def test_cli_batch_shards_exit_1_with_one_line_naming_redis(
    scaled_service: FakeApixo, tmp_path: Path
) -> None:
    """Two `sora-async batch --shard K/2 --redis-url` processes; Redis stops mid-run
    for longer than redis_timeout. Each exits 1 with one line naming Redis at its
    host and port (one JSON object with --json, one "error:" line without), no
    traceback, no exception group. Their journals are whole and hold nothing
    ambiguous; run again once Redis is back, both shards finish, one create per
    prompt."""
    prompts = write_prompts(tmp_path, 12)
    out = tmp_path / "out"
    with RedisServer(persist=True) as server:
        as_json = await start_worker(scaled_service, server.url, prompts, out, "1/2")
        as_text = await start_worker(scaled_service, server.url, prompts, out, "2/2", as_json=False)
        await until(lambda: scaled_service.stats.creates >= 4)
        await asyncio.to_thread(server.stop)
        (json_code, stdout, json_log), (text_code, text_out, stderr) = await asyncio.gather(
            outcome(as_json), outcome(as_text)
        )
        assert (json_code, text_code) == (1, 1), (json_log, stderr)
        assert_no_traceback(stdout, json_log, text_out, stderr)
        where = f"127.0.0.1:{server.port}"
        [line] = stdout.splitlines()
        failed = json.loads(line)
        assert (failed["ok"], failed["exit_code"], failed["error"]) == (
            False,
            1,
            "RedisUnavailableError",
        )
        assert "Redis" in failed["message"]
        assert where in failed["message"]
        assert failed["journal"] == str(out / ".sora-async-journal-1of2.sqlite")
        [error_line] = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert "Redis" in error_line
        assert where in error_line
        assert "run the same command again once Redis answers" in error_line
        for shard in ("1of2", "2of2"):
            states = journal_states(out / f".sora-async-journal-{shard}.sqlite")
            assert {state for state, _ in states.values()} <= {"queued", "running", "downloaded"}

        await asyncio.to_thread(server.start)
        reruns = [
            await start_worker(scaled_service, server.url, prompts, out, k) for k in ("1/2", "2/2")
        ]
        results = [await outcome(rerun) for rerun in reruns]
    assert [code for code, _, _ in results] == [0, 0], results
    stats = scaled_service.stats
    assert len(stats.creates_per_prompt) == 12
    assert set(stats.creates_per_prompt.values()) == {1}
    assert stats.rate_limited == 0
    assert len(list(out.glob("*.mp4"))) == 12


async def test_cli_never_shows_the_redis_password(
    scaled_service: FakeApixo, tmp_path: Path
) -> None:
    """A Redis URL with a password, and no Redis listening: the batch exits 1 with one
    JSON object naming Redis at its host and port, and the password appears nowhere
    in what the process printed."""
    port = RedisServer().port  # never started: nothing listens there
    url = f"redis://:hunter2secret@127.0.0.1:{port}/0"
    process = await start_worker(
        scaled_service, url, write_prompts(tmp_path, 2), tmp_path / "out", "1/1"
    )
    code, stdout, stderr = await outcome(process)
    assert code == 1, stderr
    assert_no_traceback(stdout, stderr)
    assert "hunter2secret" not in stdout + stderr
    [line] = stdout.splitlines()
    failed = json.loads(line)
    assert failed["error"] == "RedisUnavailableError"
    assert "Redis" in failed["message"]
    assert f"127.0.0.1:{port}" in failed["message"]
    assert scaled_service.stats.requests == 0
