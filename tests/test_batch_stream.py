"""A batch file read a chunk at a time: bad lines found while work runs, free resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sora_async as sa
from sora_async.testing import FakeApixo, fixed

pytestmark = pytest.mark.looptime


def write_lines(path: Path, count: int, *, bad: dict[int, str] | None = None) -> Path:
    """Write ``count`` prompts with ids; ``bad`` replaces some lines (1-based)."""
    lines = [json.dumps({"id": f"item-{i}", "prompt": f"prompt {i}"}) for i in range(1, count + 1)]
    for number, text in (bad or {}).items():
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_a_bad_line_past_the_first_chunk_stops_creates_and_a_fixed_rerun_pays_once(
    tmp_path: Path,
) -> None:
    """Line 1,150 of 1,200 is bad: creates may start while the file is read; the run
    stops creating, raises the line's error, and any task it made is kept. Fixed and
    run again, every prompt is made exactly once and saved."""
    source = write_lines(tmp_path / "p.jsonl", 1200, bad={1150: '{"id": "x", "prompt": ""}'})
    out = tmp_path / "out"
    async with FakeApixo(generation_time=fixed(60), balance=1e9) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            with pytest.raises(sa.BatchLineError) as caught:
                await sa.run_batch(client, source, out)
        made = fake.stats.creates
        assert caught.value.line == 1150
        assert caught.value.field == "prompt"
        assert made < 60  # found within the first window's creates
        write_lines(source, 1200)
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, out)
        assert report.ok
        assert fake.stats.creates == 1200
        assert set(fake.stats.creates_per_prompt.values()) == {1}
    assert len(list(out.glob("*.mp4"))) == 1200


async def test_an_id_repeated_in_a_later_chunk_names_both_lines(tmp_path: Path) -> None:
    """An id at line 1,100 that repeats line 5's is refused naming both lines, in a
    first run (the file streamed) as in load_requests."""
    repeat = json.dumps({"id": "item-5", "prompt": "again"})
    source = write_lines(tmp_path / "p.jsonl", 1100, bad={1100: repeat})
    with pytest.raises(sa.BatchLineError, match="repeats line 5") as whole:
        sa.load_requests(source)
    assert whole.value.line == 1100
    async with (
        FakeApixo(generation_time=fixed(60), balance=1e9) as fake,
        sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client,
    ):
        with pytest.raises(sa.BatchLineError, match="repeats line 5") as streamed:
            await sa.run_batch(client, source, tmp_path / "out")
    assert streamed.value.line == 1100


async def test_a_finished_batch_run_again_sends_nothing_and_keeps_its_manifest(
    tmp_path: Path,
) -> None:
    """A no-op resume: 0 requests, the same counts, the manifest file not rewritten;
    a changed file (one prompt added) is read again and only the new prompt made."""
    source = write_lines(tmp_path / "p.jsonl", 30)
    out = tmp_path / "out"
    async with FakeApixo(generation_time=fixed(30), balance=1e9) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            first = await sa.run_batch(client, source, out)
            manifest = out / "manifest.jsonl"
            written = manifest.stat().st_mtime_ns
            requests = fake.stats.requests
            again = await sa.run_batch(client, source, out)
            assert fake.stats.requests == requests
            assert manifest.stat().st_mtime_ns == written
            assert again.counts == first.counts == {"downloaded": 30}
            write_lines(source, 31)
            grown = await sa.run_batch(client, source, out)
        assert grown.ok
        assert grown.counts == {"downloaded": 31}
        assert fake.stats.creates == 31
    assert len(manifest.read_text().splitlines()) == 31
