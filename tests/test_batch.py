"""Durable batches and downloads against the fake service, in virtual time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import tempfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sora_async as sa
from sora_async._download import targets
from sora_async.testing import FakeApixo, fixed, lognormal

pytestmark = pytest.mark.looptime


def write_prompts(path: Path, count: int, *, prefix: str = "prompt") -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"{prefix}-{i}", "prompt": f"{prefix} {i}"}) + "\n"
            for i in range(count)
        )
    )
    return path


async def fake_file(fake: FakeApixo, task_id: str) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{fake.origin}/files/{task_id}.mp4") as response,
    ):
        return await response.read()


def manifest(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


async def test_1000_prompts_end_as_1000_whole_files(tmp_path: Path) -> None:
    """A 1,000-prompt batch: every video downloaded once, whole, one create per prompt,
    inside the limits, with a manifest row per prompt."""
    source = write_prompts(tmp_path / "prompts.jsonl", 1000)
    out = tmp_path / "out"
    async with FakeApixo(generation_time=lognormal(180, 0.4), balance=1e9) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, out)
        assert report.ok
        rows = manifest(out)
        assert len(rows) == 1000
        assert {row["state"] for row in rows} == {"downloaded"}
        sample = random.Random(0).sample(rows, 5)
        for row in sample:
            (file,) = row["files"]  # type: ignore[misc]
            assert Path(file).read_bytes() == await fake_file(fake, str(row["task_id"]))
        stats = fake.stats
    assert stats.creates == 1000
    assert set(stats.creates_per_prompt.values()) == {1}
    assert stats.rate_limited == 0
    assert stats.max_requests_in_window <= 60
    assert stats.downloads == 1000 + 5


async def test_plain_text_lines_take_defaults(tmp_path: Path) -> None:
    """A plain-text file is one prompt a line; blank lines and comments are skipped, and
    the defaults fill the fields."""
    source = tmp_path / "prompts.txt"
    source.write_text("# my prompts\na fox in snow\n\na heron at dawn\n")
    async with FakeApixo(generation_time=fixed(60), balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(
                client,
                source,
                tmp_path / "out",
                defaults=sa.BatchDefaults(duration=15, size="720*1280"),
            )
        inputs = [task.input for task in fake.tasks.values()]
    assert report.ok
    assert sorted(i["prompt"] for i in inputs) == ["a fox in snow", "a heron at dawn"]
    assert {(i["duration"], i["size"]) for i in inputs} == {(15, "720*1280")}


async def test_bad_line_is_named_before_any_request(tmp_path: Path, fake: FakeApixo) -> None:
    """A bad line raises BatchLineError naming file, line and field; nothing is sent."""
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "fine"}\n\n{"prompt": "bad", "duration": 7}\n')
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        with pytest.raises(sa.BatchLineError) as caught:
            await sa.run_batch(client, source, tmp_path / "out")
    assert str(caught.value).startswith(f"{source}:3: duration: must be one of")
    assert fake.stats.requests == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a"}\nnot json\n', ":2: line: is not JSON"),
        ('{"prompt": "a", "colour": "red"}\n', ":1: colour: is not an input field of sora-2-pro"),
        ('{"prompt": "same"}\n{"prompt": "same"}\n', ":2: id: "),
        ('["a list"]\n', ":1: line: must be a JSON object"),
        ('{"prompt": "x", "image_urls": ["ftp://a"]}\n', ":1: image_urls[0]: "),
    ],
)
def test_load_requests_names_the_line(tmp_path: Path, content: str, message: str) -> None:
    """Each malformed line is reported with its file and line number."""
    source = tmp_path / "prompts.jsonl"
    source.write_text(content)
    with pytest.raises(sa.BatchLineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sa.load_requests(source)


async def test_rerun_skips_finished_and_adopts_running(tmp_path: Path) -> None:
    """A batch stopped mid-way is finished by running it again: finished items are
    skipped, running tasks re-adopted, no prompt created twice, no video lost."""
    source = write_prompts(tmp_path / "p.jsonl", 30)
    out = tmp_path / "out"
    async with FakeApixo(generation_time=lognormal(120, 0.3), balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            run = asyncio.ensure_future(sa.run_batch(client, source, out))
            await asyncio.sleep(400)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
        states = {row["state"] for row in manifest(out)}
        assert "downloaded" in states
        assert states & {"running", "queued"}
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, out)
        for row in report.rows:
            # A batch's row is the one task record that the client's stores keep too.
            assert isinstance(row, sa.TaskRecord)
            assert row.key == row.id
            assert Path(row.files[0]).read_bytes() == await fake_file(fake, str(row.task_id))
        stats = fake.stats
    assert report.ok
    assert set(stats.creates_per_prompt.values()) == {1}
    assert stats.creates == 30
    assert len(list(out.glob("*.mp4"))) == 30


@pytest.mark.parametrize("seed", range(12))
async def test_stop_at_any_moment_never_pays_twice(tmp_path: Path, seed: int) -> None:
    """Stopped at random moments and run again until done: every prompt is created at
    most once and every item ends downloaded, or reported uncertain when a create was cut
    off in flight (and then its prompt was never created twice)."""
    rng = random.Random(seed)
    source = write_prompts(tmp_path / "p.jsonl", 25)
    out = tmp_path / "out"
    async with FakeApixo(generation_time=lognormal(90, 0.4), seed=seed, balance=1e6) as fake:
        for _ in range(rng.randint(1, 4)):
            async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
                run = asyncio.ensure_future(sa.run_batch(client, source, out))
                await asyncio.sleep(rng.uniform(0, 200))
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, out)
        stats = fake.stats
    rows = manifest(out)
    assert max(stats.creates_per_prompt.values()) == 1
    for row in rows:
        assert row["state"] in ("downloaded", "uncertain"), row
        if row["state"] == "downloaded":
            (file,) = row["files"]  # type: ignore[misc]
            assert Path(file).stat().st_size > 0
    assert report.ok == all(row["state"] == "downloaded" for row in rows)


async def test_uncertain_items_are_reported_and_resubmitted_on_request(tmp_path: Path) -> None:
    """A create whose answer was lost marks its item uncertain (not created again); with
    resubmit_uncertain it is created again."""
    source = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "out"
    async with FakeApixo(generation_time=fixed(60), balance=1e6) as fake:
        fake.inject("reset_after_create", on="create")
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, out)
        assert not report.ok
        assert [row.state for row in report.rows].count(sa.ItemState.UNCERTAIN) == 1
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            again = await sa.run_batch(client, source, out)
        assert fake.stats.creates == 3  # not created again by default
        assert not again.ok
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            last = await sa.run_batch(client, source, out, resubmit_uncertain=True)
        assert last.ok
        assert fake.stats.creates == 4


async def test_failed_and_refused_items_are_recorded(tmp_path: Path, fake: FakeApixo) -> None:
    """A failed task and a refused create end as failed rows with their errors; the rest finish."""
    source = tmp_path / "p.jsonl"
    source.write_text(
        '{"id": "ok", "prompt": "fine"}\n{"id": "bad", "prompt": "x [violate]"}\n'
        '{"id": "fails", "prompt": "y [fail:NSFW]"}\n'
    )
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        report = await sa.run_batch(client, source, tmp_path / "out")
    rows = {row["id"]: row for row in manifest(tmp_path / "out")}
    assert rows["ok"]["state"] == "downloaded"
    assert rows["bad"]["state"] == "failed"
    assert "Content violates" in str(rows["bad"]["error"])
    assert rows["fails"]["state"] == "failed"
    assert str(rows["fails"]["error"]).startswith("NSFW")
    assert not report.ok


async def test_truncated_download_is_resumed_with_range(
    tmp_path: Path, fake: FakeApixo, client: sa.SoraClient
) -> None:
    """A transfer cut off mid-file resumes with Range and ends whole; a 5xx is retried."""
    video = await client.generate(sa.TextToVideo(prompt="a whole file"))
    fake.inject("broken_json", on="file")  # half the bytes, then a reset
    fake.inject("server_error", on="file", status=503)
    path = await client.download(video, tmp_path)
    assert path == tmp_path / f"{video.task_id}.mp4"
    assert path.read_bytes() == await fake_file(fake, video.task_id)
    assert not list(tmp_path.glob(".*.part"))
    assert fake.stats.downloads == 3 + 1


async def test_network_paths_never_escape_the_folder(
    tmp_path: Path, fake: FakeApixo, client: sa.SoraClient
) -> None:
    """Task ids and item ids with path parts give files inside the output folder."""
    real = await client.generate(sa.TextToVideo(prompt="escape"))
    hostile = sa.Video(task_id="../../etc/passwd", urls=real.urls)
    out = tmp_path / "out"
    path = await client.download(hostile, out)
    assert path.parent == out
    assert path.name.startswith("etc_passwd-")
    source = tmp_path / "p.jsonl"
    source.write_text(
        '{"id": "../../../outside", "prompt": "hostile id"}\n{"id": "..", "prompt": "dots"}\n'
    )
    report = await sa.run_batch(client, source, out)
    assert report.ok
    for row in report.rows:
        assert Path(row.files[0]).resolve().parent == out.resolve()
    assert not (tmp_path / "outside.mp4").exists()
    with pytest.raises(sa.InputError, match="urls"):
        await client.download(sa.Video(task_id="t", urls=("file:///etc/passwd",)), out)


async def test_unwritable_output_is_an_input_error(
    tmp_path: Path, fake: FakeApixo, client: sa.SoraClient
) -> None:
    """An output folder that cannot be written is refused before any request."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    source = write_prompts(tmp_path / "p.jsonl", 2)
    with pytest.raises(sa.InputError, match="output: cannot write"):
        await sa.run_batch(client, source, blocker / "out")
    assert fake.stats.requests == 0


_ids = st.one_of(
    st.text(min_size=1, max_size=40),
    st.text(alphabet="aé日/._-~\x00 ", min_size=1, max_size=8),
    st.sampled_from(["..", ".", "/", "~", "\x00", "ééé", "日本語", "CON", "a/../../b"]),
    # long ids sharing a prefix: a stem cut short must keep them apart
    st.builds(lambda tail: "x" * 219 + tail, st.text(min_size=1, max_size=3)),
).filter(lambda item_id: bool(item_id.strip()))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=st.lists(_ids, min_size=1, max_size=10, unique_by=str.casefold))
@example(ids=["ééé", "日本語", "~", "0\x85", "a\u2028b"])
@example(ids=["x" * 219 + "a", "x" * 219 + "b"])
async def test_every_batch_id_gets_its_own_file(ids: list[str]) -> None:
    """Any ids the batch accepts (any unicode, any length, shared prefixes, ``..``, ``/``,
    NUL) give every video its own whole file inside the output folder, and the manifest
    maps each id to its file."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "p.jsonl"
        source.write_text(
            "".join(
                json.dumps({"id": i, "prompt": f"p {n}"}, ensure_ascii=False) + "\n"
                for n, i in enumerate(ids)
            ),
            encoding="utf-8",
        )
        out = Path(folder) / "out"
        async with FakeApixo(generation_time=fixed(60), balance=1e6) as fake:
            async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
                report = await sa.run_batch(client, source, out)
            assert report.ok
            rows = {row["id"]: row for row in manifest(out)}
            assert sorted(rows) == sorted(ids)
            files = [Path(row["files"][0]) for row in rows.values()]  # type: ignore[index]
            assert len({f.name.casefold() for f in files}) == len(ids)
            for row, file in zip(rows.values(), files, strict=True):
                assert file.resolve().parent == out.resolve()
                assert file.read_bytes() == await fake_file(fake, str(row["task_id"]))
        assert len(list(out.glob("*.mp4"))) == len(ids)


@given(ids=st.lists(_ids, min_size=1, max_size=20, unique_by=str.casefold))
@example(ids=["x", "x-2", "x+2", "x.2"])
def test_extra_result_files_never_take_another_ids_name(ids: list[str]) -> None:
    """A video with several result URLs saves them as <stem>.mp4, <stem>+2.mp4, ...: no
    two ids' files (extra ones included) ever share a name, and all stay in the folder."""
    folder = Path(tempfile.gettempdir()) / "sora-async-names"
    urls = ("https://cdn.example/a.mp4", "https://cdn.example/b.mp4", "https://cdn.example/c")
    names = [
        path
        for item_id in ids
        for path in targets(sa.Video(task_id="t", urls=urls), folder, item_id)
    ]
    assert len({path.name.casefold() for path in names}) == 3 * len(ids)
    assert all(path.parent == folder for path in names)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["Intro", "intro"], ":2: id: 'intro' would share a file name with 'Intro'"),
        (["ok", "\ud800"], ":2: id: must be valid Unicode text"),
    ],
)
def test_ids_that_cannot_have_their_own_file_are_refused(
    tmp_path: Path, ids: list[str], message: str
) -> None:
    """Ids that would share a file on a case-insensitive disk, or cannot be written down,
    are refused with their line before any request."""
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": i}) + "\n" for i in ids))
    with pytest.raises(sa.BatchLineError, match=message):
        sa.load_requests(source)


async def _endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
    await response.prepare(request)
    while True:
        await response.write(b"\0" * 65536)


async def _announces_too_much(request: web.Request) -> web.Response:
    return web.Response(body=b"\0" * 10, headers={"Content-Length": "10"}, content_type="video/mp4")


@pytest.mark.parametrize(
    ("handler", "message"), [(_endless, "streams on past"), (_announces_too_much, "announces")]
)
async def test_download_is_capped_and_leaves_no_partial_file(
    tmp_path: Path, handler: object, message: str
) -> None:
    """A result URL that streams without end (or announces more than the cap) is stopped
    at the cap with a clear error, and no partial file is left."""
    app = web.Application()
    app.router.add_get("/video.mp4", handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/video.mp4"
    cap = 1_000_000 if handler is _endless else 5
    try:
        # Downloads never touch the API: no service is needed behind base_url.
        async with sa.SoraClient(api_key="k", base_url=url, max_download_bytes=cap) as client:
            with pytest.raises(sa.TransportError, match=message):
                await client.download(sa.Video(task_id="t1", urls=(url,)), tmp_path)
    finally:
        await runner.cleanup()
    assert list(tmp_path.iterdir()) == []


async def test_a_refused_download_keeps_task_id_and_url_in_the_manifest(tmp_path: Path) -> None:
    """When a batch cannot save a video, its manifest row keeps the task id and the result
    URL (the video is paid for and can still be fetched), and the run exits not ok."""
    source = write_prompts(tmp_path / "p.jsonl", 1)
    async with (
        FakeApixo(generation_time=fixed(60)) as fake,
        sa.SoraClient(api_key=fake.api_key, base_url=fake.url, max_download_bytes=100) as client,
    ):
        report = await sa.run_batch(client, source, tmp_path / "out")
    assert not report.ok
    (row,) = manifest(tmp_path / "out")
    assert row["state"] == "succeeded"
    assert row["task_id"]
    assert row["urls"] == [f"{fake.origin}/files/{row['task_id']}.mp4"]
    assert "past the cap of 100 bytes" in str(row["error"])
    assert not list((tmp_path / "out").glob("*.mp4"))
    assert not list((tmp_path / "out").glob(".*.part"))


def test_max_download_bytes_is_checked() -> None:
    """A cap below one byte is refused as an InputError naming the field."""
    with pytest.raises(sa.InputError, match="max_download_bytes"):
        sa.SoraClient(api_key="k", max_download_bytes=0)


@pytest.mark.parametrize("seed", range(6))
async def test_stop_ends_the_run_cleanly_and_the_rerun_finishes(tmp_path: Path, seed: int) -> None:
    """Setting ``stop`` at any moment ends the run soon with a manifest: creates already
    sent get their answer and are journaled (so no item is ever left uncertain), running
    tasks are adopted by the rerun, and no prompt is created twice."""
    rng = random.Random(seed)
    source = write_prompts(tmp_path / "p.jsonl", 25)
    out = tmp_path / "out"
    async with FakeApixo(generation_time=lognormal(90, 0.4), seed=seed, balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            stop = asyncio.Event()
            run = asyncio.ensure_future(sa.run_batch(client, source, out, stop=stop))
            await asyncio.sleep(rng.uniform(0, 300))
            stop.set()
            loop = asyncio.get_running_loop()
            asked = loop.time()
            report = await run
            assert loop.time() - asked < 120  # bounded by one create's answer
        assert report.stopped or report.ok
        states = {row["state"] for row in manifest(out)}
        assert not states & {"uncertain", "submitting"}
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            again = await sa.run_batch(client, source, out)
        stats = fake.stats
    assert again.ok
    assert not again.stopped
    assert stats.creates == 25
    assert set(stats.creates_per_prompt.values()) == {1}


async def test_retry_failed_queues_failed_items_again(tmp_path: Path) -> None:
    """A rerun leaves failed items failed; with retry_failed they are created again."""
    source = tmp_path / "p.jsonl"
    source.write_text(
        '{"id": "ok", "prompt": "fine"}\n{"id": "fails", "prompt": "y [fail:NSFW]"}\n'
    )
    out = tmp_path / "out"
    async with FakeApixo(generation_time=fixed(60), balance=1e6) as fake:
        for retry_failed in (False, False, True):
            async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
                report = await sa.run_batch(client, source, out, retry_failed=retry_failed)
            assert not report.ok
        assert fake.stats.creates_per_prompt == {"fine": 1, "y [fail:NSFW]": 2}
    rows = {row["id"]: row for row in manifest(out)}
    assert rows["fails"]["state"] == "failed"
    assert rows["ok"]["state"] == "downloaded"


def journal_states(out: Path) -> dict[str, str]:
    """Return each item's state as a kill at this instant would leave the journal."""
    with contextlib.closing(sqlite3.connect(out / ".sora-async-journal.sqlite")) as db:
        return dict(db.execute("SELECT id, state FROM items").fetchall())


@pytest.mark.parametrize("ending", ["stop", "cancel"])
@pytest.mark.parametrize("wait", ["429", "503", "permit"])
async def test_a_batch_ended_while_its_create_waits_leaves_the_item_queued(
    tmp_path: Path, wait: str, ending: str
) -> None:
    """A create waiting for its permit, or backing off after a 429 or a 503 (no task
    made), leaves its journal row queued, not submitting. Ended there (``stop`` set, or
    cancelled as a kill would), the batch sends nothing more and the slot goes back;
    the rerun creates every prompt once, with nothing uncertain."""
    source = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "out"
    limits = sa.Limits(requests=5, period=60.0)
    async with FakeApixo(generation_time=fixed(60), balance=1e6) as fake:
        if wait == "429":
            fake.inject("rate_limit", on="create", retry_after=60.0)
        elif wait == "503":
            fake.inject("server_error", on="create", status=503, retry_after=60.0)
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url, limits=limits) as client:
            if wait == "permit":
                for _ in range(limits.requests):  # the window is spent: the create waits
                    await client.balance()
            stop = asyncio.Event()
            run = asyncio.ensure_future(sa.run_batch(client, source, out, stop=stop))
            await asyncio.sleep(20.0)
            assert client.governor.slots_in_use == 1  # the first create holds its slot
            assert set(journal_states(out).values()) == {"queued"}
            if ending == "stop":
                stop.set()
                report = await asyncio.wait_for(run, 1.0)  # at once: nothing is on the wire
                assert report.stopped
                await asyncio.sleep(60.0)  # its permit comes: the stopped create is not sent
                assert client.governor.slots_in_use == 0
            else:
                run.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await run
        assert fake.stats.creates == 0
        assert set(journal_states(out).values()) == {"queued"}
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            again = await sa.run_batch(client, source, out)
        assert again.ok
        assert fake.stats.creates_per_prompt == {f"prompt {i}": 1 for i in range(3)}
        assert fake.stats.rate_limited == (wait == "429")


async def test_a_wrong_key_stops_a_batch_with_authentication_error_itself(tmp_path: Path) -> None:
    """A key the service refuses: run_batch raises sa.AuthenticationError (not an
    exception group), after one create; every item stays queued for a rerun."""
    source = write_prompts(tmp_path / "p.jsonl", 5)
    async with FakeApixo() as fake:
        async with sa.SoraClient(api_key="not-the-key", base_url=fake.url) as client:
            with pytest.raises(sa.AuthenticationError):
                await sa.run_batch(client, source, tmp_path / "out")
        assert fake.stats.unauthorized == 1  # one create refused, nothing sent after it
        assert fake.stats.creates == 0
    assert {row["state"] for row in manifest(tmp_path / "out")} == {"queued"}
