"""A service that answers nonsense or never finishes: wrong answers never become results,
and no task holds a slot forever. Against the fake service's damaged answers."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest

import sora_async as sa
from sora_async._models import decode_status
from sora_async.testing import FakeApixo, RedisServer, fixed

pytestmark = pytest.mark.looptime

PROMPT = sa.TextToVideo(prompt="a red kite over the sea", duration=10, size="1280*720")
HOLD = 600.0  # the client's default uncertain_hold


async def slot_free_after(client: sa.SoraClient) -> float:
    """Return the loop seconds until the client's last slot frees (checked each second)."""
    for second in range(100_000):
        if not client.governor.slots_in_use:
            return float(second)
        await asyncio.sleep(1.0)
    raise AssertionError("the slot never freed")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("other_task", "another task"),
        ("bad_result_json", "unreadable resultJson"),
        ("no_result_url", "without a result URL"),
        ("bad_result_url", "not http"),
        ("bad_status_data", "not a task status|without a state"),
    ],
)
async def test_nonsense_answers_end_the_task_with_a_protocol_error(
    client: sa.SoraClient, fake: FakeApixo, damage: str, problem: str
) -> None:
    """Five nonsensical status answers in a row end the wait with ProtocolError (task id,
    what was wrong), never a Video; the slot is held for uncertain_hold, then freed."""
    task_id = await client.submit(PROMPT)
    fake.inject(damage, on="status", times=5)  # type: ignore[arg-type]
    with pytest.raises(sa.ProtocolError, match=problem) as caught:
        await client.wait(task_id)
    assert caught.value.task_id == task_id
    assert task_id in str(caught.value)
    assert fake.stats.faults[damage] == 5
    assert client.governor.slots_in_use == 1  # the task may still run on the service
    held = await slot_free_after(client)
    assert HOLD - 5 <= held <= HOLD
    with pytest.raises(sa.ProtocolError):  # later waits get the same answer
        await client.wait(task_id)


@pytest.mark.parametrize(
    "damage", ["other_task", "bad_result_json", "no_result_url", "bad_result_url"]
)
async def test_a_few_wrong_answers_are_outlived(
    client: sa.SoraClient, fake: FakeApixo, damage: str
) -> None:
    """Four nonsensical answers, then sound ones: the task's own video is returned, with
    this task's id and URL (another task's success is never taken for it)."""
    task_id = await client.submit(PROMPT)
    fake.inject(damage, on="status", times=4)  # type: ignore[arg-type]
    video = await client.wait(task_id)
    assert video.task_id == task_id
    assert video.urls == (f"{fake.origin}/files/{task_id}.mp4",)
    assert fake.stats.faults[damage] == 4


async def test_status_call_refuses_a_damaged_answer(client: sa.SoraClient, fake: FakeApixo) -> None:
    """A user's own status() call raises ProtocolError for another task's answer and for
    a success whose URL is javascript:, naming the task asked about."""
    task_id = await client.submit(PROMPT)
    fake.inject("other_task", on="status")
    with pytest.raises(sa.ProtocolError, match="another task") as caught:
        await client.status(task_id)
    assert caught.value.task_id == task_id
    fake.inject("bad_result_url", on="status", times=3)
    for _ in range(3):  # file:, javascript:, relative
        with pytest.raises(sa.ProtocolError, match="not http"):
            await client.status(task_id)
    assert (await client.status(task_id)).task_id == task_id


async def test_always_unreadable_bodies_end_the_task(
    client: sa.SoraClient, fake: FakeApixo
) -> None:
    """Status bodies that never decode (broken JSON on every try) end the task with a
    ProtocolError after the transport's retries and the scheduler's patience."""
    task_id = await client.submit(PROMPT)
    fake.inject("broken_json", on="status", times=10_000)
    with pytest.raises(sa.ProtocolError, match="unreadable body"):
        await client.wait(task_id)
    fake.clear_faults()


async def test_a_task_that_never_ends_is_given_up(fake: FakeApixo) -> None:
    """A task still unfinished after max_task_age ends with TaskAbandonedError (also a
    TaskTimeoutError) for its waiters; its slot frees after uncertain_hold."""
    fake.generation_time = fixed(100_000.0)
    policy = sa.PollPolicy(max_task_age=3600.0)
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url, poll_policy=policy) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(sa.TaskAbandonedError, match="max_task_age") as caught:
            await client.generate(PROMPT, timeout=10_000)
        assert 3600 <= loop.time() - started <= 3610
        assert isinstance(caught.value, sa.TaskTimeoutError)
        assert caught.value.task_id in fake.tasks
        assert client.governor.slots_in_use == 1
        held = await slot_free_after(client)
        assert HOLD - 5 <= held <= HOLD


async def test_patience_and_max_age_are_checked() -> None:
    """A patience below 1 or a max_task_age not above 0 is an InputError naming it."""
    with pytest.raises(sa.InputError, match="patience"):
        sa.PollPolicy(patience=0)
    with pytest.raises(sa.InputError, match="max_task_age"):
        sa.PollPolicy(max_task_age=0)


async def test_batch_marks_a_nonsense_task_failed_with_the_reason(
    fake: FakeApixo, tmp_path: Path
) -> None:
    """In a batch, a task whose answers make no sense ends 'failed' with the reason and
    its task id in the manifest; the other items are delivered."""
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"id": "lost", "prompt": "a lost one"}) + "\n")
    out = tmp_path / "out"
    fake.inject("other_task", on="status", times=5)
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        report = await sa.run_batch(client, source, out)
        source.write_text(
            source.read_text() + json.dumps({"id": "fine", "prompt": "a fine one"}) + "\n"
        )
        again = await sa.run_batch(client, source, out)
    assert report.counts == {"failed": 1}
    rows = {row.id: row for row in again.rows}
    assert rows["lost"].state is sa.ItemState.FAILED
    assert "another task" in (rows["lost"].error or "")
    assert rows["fine"].state is sa.ItemState.DOWNLOADED
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    lost = next(line for line in lines if line["id"] == "lost")
    assert lost["state"] == "failed"
    assert lost["task_id"] in lost["error"]
    assert fake.stats.creates == 2


async def test_an_html_page_instead_of_the_video_is_fetched_again(
    client: sa.SoraClient, fake: FakeApixo, tmp_path: Path
) -> None:
    """A CDN error page (HTTP 200, text/html) in place of the video is tried again; the
    file on disk is the video."""
    video = await client.generate(PROMPT)
    fake.inject("corrupt_file", on="file", times=2)
    path = await client.download(video, tmp_path)
    assert path.read_bytes()[4:8] == b"ftyp"
    assert fake.stats.faults["corrupt_file"] == 2


def test_unknown_states_stay_unfinished() -> None:
    """A state the service adds later reads as processing (not terminal, not nonsense);
    the known states are read whatever their casing."""
    later = decode_status(b'{"taskId":"t1","state":"queued","createTime":1}', "t1")
    assert later.state is sa.TaskState.PROCESSING
    assert not later.terminal
    shouted = decode_status(
        b'{"taskId":"t1","state":"SUCCESS","resultJson":"{\\"resultUrls\\":[\\"https://c/v.mp4\\"]}"}',
        "t1",
    )
    assert shouted.state is sa.TaskState.SUCCESS
    failed = decode_status(b'{"taskId":"t1","state":"failed","failCode":500}', "t1")
    assert failed.fail_code == "500"


async def test_wait_on_an_unknown_task_is_patient_too(
    client: sa.SoraClient, fake: FakeApixo
) -> None:
    """wait() on a task this client did not make outlives a nonsensical first answer, and
    gets the task's own video."""
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as other:
        task_id = await other.submit(PROMPT)
    fake.inject("other_task", on="status", times=2)
    video = await client.wait(task_id)
    assert video.task_id == task_id
    assert fake.stats.faults["other_task"] == 2


@pytest.mark.looptime(False)
async def test_a_given_up_task_holds_its_shared_slot_then_frees_it(
    redis_server: RedisServer,
) -> None:
    """With the Redis governor too, a task ended by nonsense keeps its slot (bound to the
    task) for uncertain_hold, then frees it: the next create gets it. Real time."""
    limits = sa.Limits(requests=600, period=6.0, concurrent_tasks=1)
    quick = sa.PollPolicy(prior_mean=0.3, min_interval=0.05)
    async with FakeApixo(generation_time=fixed(0.3), period=6.0, pending_time=0.0) as fake:
        governor = sa.RedisGovernor(
            redis_server.url,
            api_key=secrets.token_hex(8),
            limits=limits,
            lease=1.0,
            trust_empty_redis=True,  # a fresh key: nothing ran on it before
        )
        async with sa.SoraClient(
            api_key=fake.api_key,
            base_url=fake.url,
            limits=limits,
            governor=governor,
            poll_policy=quick,
            uncertain_hold=2.0,
        ) as client:
            task_id = await client.submit(PROMPT)
            fake.inject("bad_status_data", on="status", times=5)
            with pytest.raises(sa.ProtocolError):
                await client.wait(task_id, timeout=30)
            loop = asyncio.get_running_loop()
            given_up = loop.time()
            video = await client.generate(sa.TextToVideo(prompt="the next one"), timeout=30)
            assert loop.time() - given_up >= 1.9  # the slot was held, not freed at once
            assert video.task_id != task_id
    assert fake.stats.max_concurrent_tasks == 1
