"""Batch files as users save them: byte order marks, CSV, line-numbered errors."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import sora_async as sa
from sora_async._batch_file import read_items
from sora_async.cli import cli
from sora_async.testing import FakeApixo, fixed

BOM = b"\xef\xbb\xbf"
IMG = "https://example.com/a.jpg"
IMG2 = "https://example.com/b.png"


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


CSV_TEXT = (
    "id,prompt,model,duration,generation_type,mode,image_urls,seed\n"
    'fox,"a fox, running",,10,,,,\n'
    f"ref,a reference,veo-3-1,,REFERENCE_2_VIDEO,fast,{IMG} {IMG2},7\n"
    "\n"
    'boat,"a paper boat\non a river",sora-2,8,,,,\n'
)


@pytest.mark.looptime
async def test_a_csv_batch_reaches_the_service_with_typed_values(tmp_path: Path) -> None:
    """A CSV batch (a header row, a quoted comma, a cell across lines, an empty cell,
    two URLs in one cell) sends each row to its model with the fields' types: 10 and 7
    as numbers, the URLs as a list; the model's Python and wire names both work."""
    source = tmp_path / "p.csv"
    source.write_text(CSV_TEXT.replace("generation_type", "generationType"))
    async with FakeApixo(generation_time=fixed(60), balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, tmp_path / "out")
        sent = {task.input["prompt"]: (task.model, task.input) for task in fake.tasks.values()}
        stats = fake.stats
    assert report.ok
    assert stats.creates == 3
    assert sent["a fox, running"] == (
        "sora-2-pro",
        {"prompt": "a fox, running", "mode": "text-to-video", "duration": 10},
    )
    model, veo = sent["a reference"]
    assert model == "veo-3-1"
    assert (veo["generationType"], veo["seed"], veo["image_urls"]) == (
        "REFERENCE_2_VIDEO",
        7,
        [IMG, IMG2],
    )
    assert sent["a paper boat\non a river"][1]["duration"] == 8
    assert {str(row["id"]) for row in manifest(tmp_path / "out")} == {"fox", "ref", "boat"}


def test_cli_batch_of_a_csv_file_ends_with_files_and_a_manifest(tmp_path: Path) -> None:
    """``sora-async batch prompts.csv`` (saved by a spreadsheet: a BOM, CRLF line ends)
    makes every row's file and a manifest row each, exit 0."""
    source = tmp_path / "prompts.CSV"
    source.write_bytes(BOM + CSV_TEXT.replace("\n", "\r\n").encode())
    out = tmp_path / "out"
    args = ["batch", str(source), "-o", str(out), "--simulate", "--time-scale", "500", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"] == {"downloaded": 3}
    rows = {str(row["id"]): row for row in manifest(out)}
    assert rows.keys() == {"fox", "ref", "boat"}
    assert rows["ref"]["model"] == "veo-3-1"
    assert (out / "fox.mp4").read_bytes()[4:8] == b"ftyp"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("b,bad,,7,,,,\n", "p.csv:4: duration: must be one of 4, 8, 10, 12, 15 seconds; got 7"),
        ("b,bad,veo-3-1,,,,,seven\n", "p.csv:4: seed: must be int; got 'seven'"),
        ("b,bad,veo-3-1,,,,,,,\n", "p.csv:4: line: has 10 cells; the header names 8 fields"),
        ("b,bad,veo-3-1,,SIDEWAYS,,,\n", "p.csv:4: generation_type: Invalid enum value"),
        ("b,,,,,,,\n", "p.csv:4: prompt: is required"),
        ('b,"unclosed\n', "p.csv:4: line: is not CSV: unexpected end of data"),
    ],
)
@pytest.mark.looptime
async def test_a_csv_with_a_bad_cell_names_line_and_field_and_sends_nothing(
    tmp_path: Path, fake: FakeApixo, rows: str, message: str
) -> None:
    """A bad cell fails the batch with the file, line and field, before any request."""
    source = tmp_path / "p.csv"
    header = "id,prompt,model,duration,generation_type,mode,image_urls,seed\n"
    source.write_text(header + "a,fine,,10,,,,\n\n" + rows)
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        with pytest.raises(sa.BatchLineError) as caught:
            await sa.run_batch(client, source, tmp_path / "out")
    assert str(caught.value).startswith(f"{tmp_path}/{message}")
    assert fake.stats.requests == 0


def test_cli_names_the_bad_cell_of_a_csv_in_one_line(tmp_path: Path) -> None:
    """``batch`` of a CSV with a bad cell: exit 2, one line naming file, line and field."""
    source = tmp_path / "p.csv"
    source.write_text("prompt,duration\nfine,10\nbad,ten\n")
    result = CliRunner().invoke(cli, ["batch", str(source), "-o", str(tmp_path), "--simulate"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {source}:3: duration: must be int; got 'ten'"


_PROMPTS = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40
)


@given(
    st.lists(
        st.tuples(
            _PROMPTS.map(str.strip).filter(bool),
            st.sampled_from(["sora-2-pro", "veo-3-1", ""]),
            st.sampled_from(["", "10", "15"]),
            st.sampled_from(["", "3", "-1"]),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
        unique_by=lambda row: row[0],
    )
)
@settings(max_examples=60, deadline=None)
def test_a_csv_gives_the_requests_of_the_same_rows_in_jsonl(
    rows: list[tuple[str, str, str, str, bool]],
) -> None:
    """Rows written as CSV (any text: commas, quotes, line breaks) and as JSONL give the
    same items, ids and requests alike (a cell's text read as the field's type)."""
    lines: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "p.csv"
        with table.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["id", "prompt", "model", "duration", "seed"])
            for n, (prompt, model, duration, seed, named) in enumerate(rows):
                veo = model == "veo-3-1"
                cells = [f"i{n}" if named else "", prompt, model, "" if veo else duration]
                writer.writerow([*cells, seed if veo else ""])
                line: dict[str, object] = {"prompt": prompt}
                line |= {"id": f"i{n}"} if named else {}
                line |= {"model": model} if model else {}
                line |= {"seed": int(seed)} if veo and seed else {}
                line |= {"duration": int(duration)} if duration and not veo else {}
                lines.append(line)
        source = Path(folder) / "p.jsonl"
        source.write_text("".join(json.dumps(line) + "\n" for line in lines))
        from_csv = [(item.id, item.request_json) for item in sa.load_requests(table)]
        from_jsonl = [(item.id, item.request_json) for item in sa.load_requests(source)]
    assert from_csv == from_jsonl


def test_a_csv_is_read_a_chunk_at_a_time(tmp_path: Path) -> None:
    """A CSV streams like JSONL: the chunks before a bad row are yielded before its
    error, so a batch's journal takes them while the rest is still unread."""
    source = tmp_path / "p.csv"
    source.write_text("prompt\n" + "".join(f"p {n}\n" for n in range(5)) + '"unclosed\n')
    chunks = read_items(source, chunk=2)
    assert [item.line for item in next(chunks)] == [2, 3]
    assert [item.line for item in next(chunks)] == [4, 5]
    with pytest.raises(sa.BatchLineError, match=r"p\.csv:7: line: is not CSV"):
        next(chunks)
