"""Batches and the CLI across several models of the catalogue, against the fake."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import sora_async as sa
from sora_async._batch_file import request_from
from sora_async._field_names import input_names
from sora_async.cli import cli
from sora_async.testing import FakeApixo, lognormal

IMG = "https://example.com/a.jpg"


def mixed_lines(count: int) -> str:
    """Return JSONL lines cycling through Sora 2 Pro, Veo 3.1 and Seedream (raw input, 2 images)."""
    rows = []
    for i in range(count):
        if i % 3 == 0:
            rows.append({"id": f"s{i}", "prompt": f"sora {i}", "duration": 10})
        elif i % 3 == 1:
            rows.append({"id": f"v{i}", "model": "veo-3-1", "prompt": f"veo {i}", "mode": "fast"})
        else:
            rows.append(
                {"id": f"n{i}", "model": "seedream-4-5", "prompt": f"seed {i}", "max_images": 2}
            )
    return "".join(json.dumps(row) + "\n" for row in rows)


def manifest(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"model": "veo-3-1", "prompt": "x", "aspect_ratio": "4:3"}', ":1: "),
        ('{"model": "wan-2-5", "prompt": "x", "duration": 7}', ":1: duration: "),
        ('{"model": "bad/id", "prompt": "x"}', ":1: model: "),
        ('{"model": "kling-2-5-turbo-pro", "prompt": "x", "size": "1280*720"}', ":1: "),
    ],
)
def test_a_line_with_a_bad_model_field_names_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    """A JSONL line's model fields are checked before anything is sent."""
    source = tmp_path / "p.jsonl"
    source.write_text(line + "\n")
    with pytest.raises(sa.BatchLineError, match=message):
        sa.load_requests(source)


def test_a_line_names_its_model(tmp_path: Path) -> None:
    """``model`` picks the typed input; an untyped model gets a RawInput."""
    rows = [
        {"model": "veo-3-1", "prompt": "x", "generationType": "TEXT_2_VIDEO"},
        {"model": "seedream-4-5", "prompt": "x", "max_images": 3},
        {"prompt": "x"},
    ]
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    made = [item.request for item in sa.load_requests(source)]
    assert isinstance(made[0], sa.Veo31)
    assert made[1] == sa.RawInput(model="seedream-4-5", input={"prompt": "x", "max_images": 3})
    assert isinstance(made[2], sa.TextToVideo)


@pytest.mark.looptime
async def test_a_mixed_batch_resumes_after_a_kill(tmp_path: Path) -> None:
    """A JSONL batch over three models, stopped mid-way and run again: every item
    once, each file named for what it is, several images per image task."""
    source = tmp_path / "mixed.jsonl"
    source.write_text(mixed_lines(90))
    out = tmp_path / "out"
    async with FakeApixo(generation_time=lognormal(120, 0.3), balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            run = asyncio.ensure_future(sa.run_batch(client, source, out))
            await asyncio.sleep(200)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
        assert {row["state"] for row in manifest(out)} & {"running", "queued"}
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, out)
        assert report.ok
        stats = fake.stats
        models = {task.model for task in fake.tasks.values()}
    assert set(stats.creates_per_prompt.values()) == {1}
    assert stats.creates == 90
    assert models == {"sora-2-pro", "veo-3-1", "seedream-4-5"}
    rows = {str(row["id"]): row for row in manifest(out)}
    assert rows["v1"]["model"] == "veo-3-1"
    assert rows["s0"]["model"] == "sora-2-pro"
    files = rows["n2"]["files"]
    assert isinstance(files, list)
    assert [Path(f).suffix for f in files] == [".png", ".png"]
    assert len(list(out.glob("*.mp4"))) == 60
    assert len(list(out.glob("*.png"))) == 60


def test_cli_lists_the_models() -> None:
    """``sora-async models`` shows every model of the table with its kind and limits."""
    result = CliRunner().invoke(cli, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for model in sa.MODELS:
        assert model in result.output
    assert "10000, 1000" in result.output


def test_cli_generates_on_another_model(tmp_path: Path) -> None:
    """``generate --model nano-banana --set output_format=jpeg`` saves a .jpg."""
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "a cafe",
            "--model",
            "nano-banana",
            "--set",
            "output_format=jpeg",
            "--simulate",
            "--json",
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["file"].endswith(".jpg")


def test_cli_refuses_a_bad_field_in_one_line(tmp_path: Path) -> None:
    """A field the model refuses: exit 2, one line, no traceback."""
    result = CliRunner().invoke(
        cli, ["generate", "x", "--model", "veo-3-1", "--set", "mode=slow", "--simulate"]
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_every_field_name_models_shows_is_taken() -> None:
    """Each field ``sora-async models`` lists for a typed model is a name its input
    takes, and so is each field's name on the wire."""
    for model, info in sa.MODELS.items():
        names = input_names(model)
        if names is None:
            assert not info.inputs
            continue
        shown = {name.strip() for name in re.split(r"[,|]", info.fields)}
        assert shown <= names.keys(), model
        assert set(names.values()) <= names.keys(), model


_VEO_NAMES = (("generation_type", "generationType"), ("enable_translation", "enableTranslation"))


@given(st.tuples(st.booleans(), st.booleans()), st.booleans())
def test_a_field_may_go_by_either_name(wire: tuple[bool, bool], extend: bool) -> None:
    """Any mix of Python and wire names gives the same request (the same wire body);
    one field under both names is refused, naming both."""
    if extend:
        pairs: tuple[tuple[str, str], ...] = (("task_id", "taskId"),)
        values: dict[str, object] = {"task_id": "task_1"}
        model = "veo-3-1-extend"
    else:
        pairs = _VEO_NAMES
        values = {"generation_type": "REFERENCE_2_VIDEO", "enable_translation": True}
        model = "veo-3-1"
    common = {"model": model, "prompt": "p", "mode": "fast", "image_urls": [IMG]}
    if extend:
        del common["image_urls"]
    mixed = {
        (w if on_wire else p): values[p]
        for (p, w), on_wire in zip(pairs, wire[: len(pairs)], strict=True)
    }
    expected = request_from({**common, **values}, sa.BatchDefaults())
    assert request_from({**common, **mixed}, sa.BatchDefaults()) == expected
    python, on_wire = pairs[0]
    with pytest.raises(sa.InputError, match=f"{on_wire}: is given twice, as {python} and"):
        request_from(
            {**common, python: values[python], on_wire: values[python]}, sa.BatchDefaults()
        )


@pytest.mark.looptime
async def test_a_batch_line_may_name_a_field_as_models_shows_it(tmp_path: Path) -> None:
    """JSONL lines naming veo-3-1's field ``generation_type`` or ``generationType`` both
    reach the service as ``generationType``."""
    rows = [
        {"id": name, "model": "veo-3-1", "prompt": name, "mode": "fast", "image_urls": [IMG]}
        | {name: "REFERENCE_2_VIDEO"}
        for name in ("generation_type", "generationType")
    ]
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    async with FakeApixo(generation_time=lognormal(60, 0.3), balance=1e6) as fake:
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
            report = await sa.run_batch(client, source, tmp_path / "out")
        inputs = [task.input for task in fake.tasks.values()]
    assert report.ok
    assert [i.get("generationType") for i in inputs] == ["REFERENCE_2_VIDEO"] * 2
    assert not any("generation_type" in i for i in inputs)


@pytest.mark.parametrize("name", ["generation_type", "generationType"])
def test_cli_set_takes_the_name_models_shows_and_the_wire_name(tmp_path: Path, name: str) -> None:
    """``generate --model veo-3-1 --set generation_type=REFERENCE_2_VIDEO`` (or
    ``generationType=``) makes the video."""
    args = ["generate", "a", "--model", "veo-3-1", "--set", f"{name}=REFERENCE_2_VIDEO"]
    args += ["--set", "mode=fast", "--image-url", IMG, "--simulate", "--json", "-o", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["file"].endswith(".mp4")


def test_cli_set_of_an_unknown_field_lists_the_fields(tmp_path: Path) -> None:
    """An unknown ``--set`` name: exit 2, one line naming it and every field the model
    takes, by both names."""
    args = ["generate", "a", "--model", "veo-3-1", "--set", "generationTyp=TEXT_2_VIDEO"]
    result = CliRunner().invoke(cli, [*args, "--simulate", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "generationTyp: is not an input field of veo-3-1; it takes prompt, mode," in (
        result.output
    )
    assert "generation_type (generationType)" in result.output


def test_cli_models_says_which_limits_are_published_and_how_to_set_the_others() -> None:
    """``sora-async models``: a model whose page states limits shows them as published
    (ltx-2-19b: 10000, 1000); one whose page states none says so, shows Sora 2 Pro's
    figures as a cautious default, and the output says how to set yours."""
    # A process of its own: the console's width is read once, when it is made.
    result = subprocess.run(
        [sys.executable, "-m", "sora_async", "models"],
        capture_output=True,
        text=True,
        env=os.environ | {"COLUMNS": "250"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout
    rows = {line.split("│")[1].strip(): line for line in output.splitlines() if "│" in line}
    assert "10000, 1000 (published)" in rows["ltx-2-19b"]
    assert "60, 10 (published)" in rows["sora-2-pro"]
    assert "60, 10 (none published: Sora 2 Pro's used)" in rows["veo-3-1"]
    assert "Sora default" not in output
    text = " ".join(output.split())
    assert "the provider states no limits for that model" in text
    assert "as a cautious default" in text
    assert 'SoraClient(model_limits={"veo-3-1": sa.Limits(' in text
    assert "--limits veo-3-1=120/60/20" in text
