"""Batch files as users save them: byte order marks, CSV, line-numbered errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import sora_async as sa
from sora_async.cli import cli
from sora_async.testing import FakeApixo, fixed

BOM = b"\xef\xbb\xbf"


def manifest(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("prompts.jsonl", b'{"id": "fox", "prompt": "a fox"}\n{"id": "owl", "prompt": "an owl"}\n'),
        ("prompts.txt", b"a fox\n# a comment\nan owl\n"),
    ],
)
@pytest.mark.looptime
async def test_a_file_saved_with_a_bom_runs_and_the_bom_reaches_no_prompt(
    tmp_path: Path, name: str, content: bytes
) -> None:
    """A JSONL or plain-text file that starts with a UTF-8 byte order mark (as Windows
    editors save it) runs whole; the service sees the first prompt without the mark."""
    source = tmp_path / name
    source.write_bytes(BOM + content)
    async with FakeApixo(generation_time=fixed(60), balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, tmp_path / "out")
        prompts = sorted(task.input["prompt"] for task in fake.tasks.values())
    assert report.ok
    assert prompts == ["a fox", "an owl"]


def test_cli_batch_and_prices_take_files_with_a_bom(tmp_path: Path) -> None:
    """``sora-async batch`` of a JSONL file with a BOM ends with files and a manifest,
    and a ``--prices`` file with a BOM is read too."""
    source = tmp_path / "p.jsonl"
    source.write_bytes(BOM + b'{"id": "v0", "prompt": "a fox"}\n{"id": "v1", "prompt": "owl"}\n')
    out = tmp_path / "out"
    args = ["batch", str(source), "-o", str(out), "--simulate", "--time-scale", "500"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"] == {"downloaded": 2}
    assert sorted(str(row["id"]) for row in manifest(out)) == ["v0", "v1"]
    prices = tmp_path / "prices.json"
    prices.write_bytes(BOM + b'{"sora-2-pro": 0.5}')
    result = CliRunner().invoke(cli, [*args, "--dry-run", "--prices", str(prices), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["dry_run"]["low_usd"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["p.jsonl", "p.txt"])
def test_a_bom_past_the_start_of_the_file_is_named_with_its_line(tmp_path: Path, name: str) -> None:
    """Only the file's first bytes may be a BOM: one inside (two files pasted together)
    is a bad line, named with its number, never a hidden character in a prompt."""
    source = tmp_path / name
    source.write_bytes(BOM + b'{"prompt": "a"}\n' + BOM + b'{"prompt": "b"}\n')
    with pytest.raises(sa.BatchLineError, match=rf"{name}:2: line: starts with a byte order mark"):
        sa.load_requests(source)
