"""A journal written by an earlier release resumes: its rows are read as they were.

The journal below is built with the first release's schema, written out here as SQL
(not by today's code), with an item in each state a killed run leaves behind.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

import sora_async as sa
from sora_async.testing import FakeApixo, fixed

pytestmark = pytest.mark.looptime

# The items table as the release of issue 22 wrote it.
FIRST_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    line INTEGER NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT,
    result_urls TEXT,
    files TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    seconds REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""


def request_json(name: str) -> str:
    """The request column as that release wrote a text-to-video line."""
    return json.dumps({"mode": "text-to-video", "prompt": f"prompt {name}"}, separators=(",", ":"))


def write_old_journal(path: Path, rows: list[tuple[str, str, str | None, list[str]]]) -> None:
    """Write ``rows`` (id, state, task id, files) with the first release's schema."""
    now = time.time()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(FIRST_SCHEMA)
        db.executemany(
            "INSERT INTO items (id, line, request, state, task_id, result_urls, files, error, "
            "attempts, seconds, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, '[]', ?, NULL, ?, NULL, ?, ?)",
            [
                (
                    item,
                    line,
                    request_json(item),
                    state,
                    task_id,
                    json.dumps(files),
                    1 if task_id else 0,
                    now,
                    now,
                )
                for line, (item, state, task_id, files) in enumerate(rows, start=1)
            ],
        )
    sqlite3.connect(path).close()


async def test_a_journal_of_the_first_release_resumes_without_paying_twice(
    tmp_path: Path,
) -> None:
    """A downloaded item is skipped, a running task is adopted and saved (not created
    again), an uncertain item is left alone, and a queued one is created once."""
    source = tmp_path / "prompts.jsonl"
    names = ["done", "running", "uncertain", "queued"]
    source.write_text(
        "".join(json.dumps({"id": name, "prompt": f"prompt {name}"}) + "\n" for name in names)
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "done.mp4").write_bytes(b"an earlier run's video")
    async with FakeApixo(generation_time=fixed(30), balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            running = await client.submit(sa.TextToVideo(prompt="prompt running"))
        write_old_journal(
            out / ".sora-async-journal.sqlite",
            [
                ("done", "downloaded", "task_earlier", [str(out / "done.mp4")]),
                ("running", "running", running, []),
                ("uncertain", "uncertain", None, []),
                ("queued", "queued", None, []),
            ],
        )
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, out)
        creates = fake.stats.creates
        prompts = dict(fake.stats.creates_per_prompt)
    states = {row.id: row.state for row in report.rows}
    assert states == {
        "done": sa.ItemState.DOWNLOADED,
        "running": sa.ItemState.DOWNLOADED,
        "uncertain": sa.ItemState.UNCERTAIN,
        "queued": sa.ItemState.DOWNLOADED,
    }
    assert creates == 2  # the running task (made before) and the queued item
    assert prompts == {"prompt running": 1, "prompt queued": 1}
    assert (out / "done.mp4").read_bytes() == b"an earlier run's video"
    assert (out / "running.mp4").exists()
    assert (out / "queued.mp4").exists()
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [row["id"] for row in manifest] == names
    assert manifest[1]["task_id"] == running
