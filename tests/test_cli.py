"""The sora-async command line, run as a user runs it: a subprocess, in real time."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from benchmarks.kill9 import start_cli
from sora_async.testing import FakeApixo, lognormal

SCALE = 100.0  # every timing divided by this: a 180-s generation takes 1.8 s


async def sora_async(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await start_cli(
        list(args), {"APIXO_API_KEY": "", **(env or {})}, output=asyncio.subprocess.PIPE
    )


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await sora_async(*args, env=env)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


async def test_simulated_batch_writes_files_and_manifest(tmp_path: Path) -> None:
    """batch --simulate ends with MP4 files, a manifest and exit code 0; --json summarises."""
    source = write_jsonl(
        tmp_path / "p.jsonl", [{"id": f"v{i}", "prompt": f"p {i}"} for i in range(4)]
    )
    out = tmp_path / "out"
    code, stdout, _ = await run_cli(
        "batch", str(source), "-o", str(out), "--simulate", "--time-scale", "200", "--json"
    )
    assert code == 0
    summary = json.loads(stdout)
    assert summary["ok"] is True
    assert summary["counts"] == {"downloaded": 4}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["v0", "v1", "v2", "v3"]
    assert all((out / f"v{i}.mp4").read_bytes()[4:8] == b"ftyp" for i in range(4))


async def test_failed_item_gives_exit_code_1(tmp_path: Path) -> None:
    """A batch with a failed item exits 1 and says so in the manifest."""
    source = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": "good", "prompt": "fine"}, {"id": "bad", "prompt": "no [fail:NSFW]"}],
    )
    code, stdout, _ = await run_cli(
        "batch", str(source), "-o", str(tmp_path / "out"), "--simulate", "--time-scale", "200"
    )
    assert code == 1
    assert "failed" in stdout
    rows = {
        json.loads(x)["id"]: json.loads(x)
        for x in (tmp_path / "out/manifest.jsonl").read_text().splitlines()
    }
    assert rows["bad"]["state"] == "failed"
    assert rows["good"]["state"] == "downloaded"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["batch", "{bad}", "-o", "{out}", "--simulate"], "bad.jsonl:2: duration: must be one of"),
        (["batch", "{good}", "-o", "{out}"], "no API key: set APIXO_API_KEY"),
        (["batch", "{good}", "-o", "{blocked}/out", "--simulate"], "output: cannot write to"),
        (["batch", "{missing}", "-o", "{out}", "--simulate"], "file: cannot read"),
        (["generate", "x", "--duration", "7", "--simulate"], "duration: must be one of"),
    ],
)
async def test_clear_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    """Bad input, a missing key and an unwritable folder give one clear line and exit 2."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "x", "duration": 7}\n')
    (tmp_path / "good.jsonl").write_text('{"prompt": "ok"}\n')
    (tmp_path / "blocked").write_text("a file, not a folder")
    names = {
        "bad": tmp_path / "bad.jsonl",
        "good": tmp_path / "good.jsonl",
        "out": tmp_path / "out",
        "blocked": tmp_path / "blocked",
        "missing": tmp_path / "missing.jsonl",
    }
    code, _, stderr = await run_cli(*(arg.format(**names) for arg in args))
    assert code == 2
    assert message in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


async def test_generate_status_and_balance_against_a_service(tmp_path: Path) -> None:
    """generate, status and balance work against a service given by --base-url."""
    async with FakeApixo(generation_time=lognormal(180 / SCALE, 0.3), period=60 / SCALE) as fake:
        env = {"APIXO_API_KEY": fake.api_key, "APIXO_BASE_URL": fake.url}
        scale = ["--time-scale", str(SCALE)]
        code, stdout, _ = await run_cli(
            "generate", "a kite", "-o", str(tmp_path), "--json", *scale, env=env
        )
        assert code == 0
        made = json.loads(stdout)
        assert Path(made["file"]).read_bytes()[4:8] == b"ftyp"
        code, stdout, _ = await run_cli("status", made["task_id"], "--json", env=env)
        assert code == 0
        assert json.loads(stdout)["state"] == "success"
        code, stdout, _ = await run_cli("balance", env=env)
        assert code == 0
        assert stdout.strip() == f"{fake.balance:.2f} USD"
        code, _, stderr = await run_cli("status", "task_nope", env=env)
        assert code == 1
        assert "Task not found" in stderr
