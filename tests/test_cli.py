"""The sora-async command line, run as a user runs it: a subprocess, in real time."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from benchmarks.kill9 import start_cli
from sora_async.testing import FakeApixo, RedisServer, fixed, lognormal

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
    """A batch with a failed item exits 1 and says so in the manifest; its progress
    shows the slots, the window and the generation time learned."""
    source = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": "good", "prompt": "fine"}, {"id": "bad", "prompt": "no [fail:NSFW]"}],
    )
    code, stdout, stderr = await run_cli(
        "batch", str(source), "-o", str(tmp_path / "out"), "--simulate", "--time-scale", "200"
    )
    assert code == 1
    assert "failed" in stdout
    assert "slots 0/10 | " in stderr
    assert "requests in the last minute | generation ~0.9 s | ETA" in stderr  # 180 s / 200
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
        (
            ["batch", "{good}", "-o", "{out}", "--journal", "/proc/no/journal.db", "--simulate"],
            "journal: cannot write to /proc/no: ",
        ),
        (
            ["batch", "{good}", "-o", "{out}", "--journal", "/proc/no/j.db", "--api-key", "k"],
            "journal: cannot open /proc/no/j.db: ",
        ),
        (
            ["batch", "{good}", "-o", "{out}", "--journal", "{blocked}", "--api-key", "k"],
            "journal: cannot open ",
        ),
        (["generate", "x", "-o", "{blocked}/out", "--simulate"], "output: cannot write to"),
        (["status", "task_1", "--simulate"], "--simulate starts an empty fake service"),
        (["balance", "--simulate"], "--simulate starts an empty fake service"),
        (["download", "task_1", "--simulate"], "--simulate starts an empty fake service"),
        (["top", "--redis-url", "http://x", "--api-key", "k"], "url: must be a redis://"),
    ],
)
async def test_clear_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    """Bad input, a missing key, an unwritable folder or journal, and --simulate where a
    fresh fake cannot answer give one clear line and exit 2."""
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


@pytest.mark.parametrize(
    ("args", "error", "exit_code"),
    [
        (["generate", "x", "--duration", "7", "--simulate"], "InputError", 2),
        (["generate", "x", "--size", "3", "--simulate"], "UsageError", 2),
        (["generate", "x"], "InputError", 2),
        (["batch", "{missing}", "-o", "{out}", "--simulate"], "InputError", 2),
        (["balance", "--simulate"], "InputError", 2),
    ],
)
async def test_json_errors_are_one_json_object(
    tmp_path: Path, args: list[str], error: str, exit_code: int
) -> None:
    """With --json every error is one JSON object on stdout with the documented shape:
    ok, exit_code, error, message (and context such as the field)."""
    names = {"missing": tmp_path / "missing.jsonl", "out": tmp_path / "out"}
    code, stdout, stderr = await run_cli(*(arg.format(**names) for arg in args), "--json")
    assert code == exit_code
    outcome = json.loads(stdout)
    assert outcome["ok"] is False
    assert outcome["exit_code"] == exit_code
    assert outcome["error"] == error
    assert outcome["message"]
    assert "Traceback" not in stderr


async def test_simulate_help_names_the_command() -> None:
    """`sora-async simulate --help` shows the command's own name in its usage."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from sora_async.cli import main; main()",
        "simulate",
        "--help",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert out.decode().startswith("usage: sora-async simulate")
    assert "python -m" not in out.decode()


async def test_generate_checks_the_folder_first_and_never_loses_a_made_video(
    tmp_path: Path,
) -> None:
    """generate -o into a folder that cannot be written fails before any create; when the
    video is made but cannot be saved, the task id and result URL are printed (exit 1),
    and `sora-async download TASK_ID` then saves it."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    async with FakeApixo(generation_time=lognormal(180 / SCALE, 0.3), period=60 / SCALE) as fake:
        env = {"APIXO_API_KEY": fake.api_key, "APIXO_BASE_URL": fake.url}
        scale = ["--time-scale", str(SCALE)]
        code, _, stderr = await run_cli("generate", "kite", "-o", str(blocker / "x"), env=env)
        assert code == 2
        assert "output: cannot write to" in stderr
        assert fake.stats.requests == 0
        fake.inject("server_error", on="file", status=404)  # the CDN refuses the file
        code, stdout, stderr = await run_cli(
            "generate", "kite", "-o", str(tmp_path / "v"), *scale, "--json", env=env
        )
        assert code == 1, stderr
        outcome = json.loads(stdout)
        assert outcome["error"] == "NotSaved"
        task_id = outcome["task_id"]
        assert outcome["urls"] == [f"{fake.origin}/files/{task_id}.mp4"]
        assert "sora-async download" in outcome["message"]
        fake.inject("server_error", on="file", status=404)
        code, _, stderr = await run_cli(
            "generate", "kite", "-o", str(tmp_path / "v"), *scale, env=env
        )
        assert code == 1
        assert len(stderr.strip().splitlines()) == 1
        other = stderr.split("task ")[1].split(",")[0]
        assert f"{fake.origin}/files/{other}.mp4" in stderr
        assert fake.stats.creates == 2
        for made in (task_id, other):
            code, stdout, _ = await run_cli("download", made, "-o", str(tmp_path / "v"), env=env)
            assert code == 0
            assert (tmp_path / "v" / f"{made}.mp4").read_bytes()[4:8] == b"ftyp"
        assert fake.stats.creates == 2
        code, stdout, _ = await run_cli("download", "task_nope", "--json", env=env)
        assert code == 1
        assert json.loads(stdout)["error"] == "NotFoundError"


@pytest.mark.parametrize(
    ("signals", "exit_code"),
    [([signal.SIGTERM], 143), ([signal.SIGINT], 130), ([signal.SIGTERM, signal.SIGTERM], 143)],
)
async def test_signal_stops_a_batch_with_a_manifest_and_the_rerun_finishes(
    tmp_path: Path, signals: list[signal.Signals], exit_code: int
) -> None:
    """SIGTERM or Ctrl-C mid-batch: no new creates, journal and manifest written, a line
    on how to resume, exit 143 / 130; a second signal exits at once. The rerun adopts the
    tasks in flight and finishes with no prompt created twice, as the fake counts."""
    source = write_jsonl(
        tmp_path / "p.jsonl", [{"id": f"v{i}", "prompt": f"sig {i}"} for i in range(16)]
    )
    out = tmp_path / "out"
    async with FakeApixo(
        generation_time=lognormal(180 / SCALE, 0.4), period=60 / SCALE, balance=1e6
    ) as fake:
        env = {"APIXO_API_KEY": fake.api_key, "APIXO_BASE_URL": fake.url}
        command = ["batch", str(source), "-o", str(out), "--time-scale", str(SCALE)]
        process = await sora_async(*command, env=env)
        for _ in range(600):  # the fake counts creates; no event tells us of them
            if fake.stats.creates >= 4:
                break
            await asyncio.sleep(0.05)
        for number in signals:
            process.send_signal(number)
        _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == exit_code, err
        if len(signals) == 1:
            assert "run the same command again to resume" in err.decode()
            rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
            assert len(rows) == 16
            assert not {row["state"] for row in rows} & {"submitting", "uncertain"}
        assert "Traceback" not in err.decode()
        made = fake.stats.creates
        assert made < 16
        code, _, stderr = await run_cli(*command, env=env)
        assert code in (0, 1), stderr
        rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert max(fake.stats.creates_per_prompt.values()) == 1
        for row in rows:
            assert row["state"] in ("downloaded", "uncertain"), row
        assert (code == 0) == all(row["state"] == "downloaded" for row in rows)


async def test_killed_simulated_batch_resumes(tmp_path: Path) -> None:
    """A --simulate batch killed with SIGKILL and run again resumes like a real one: the
    simulated service keeps its tasks beside the journal, so the rerun adopts them (none
    is marked failed for being unknown) and no prompt is created twice."""
    source = write_jsonl(
        tmp_path / "p.jsonl", [{"id": f"v{i}", "prompt": f"sim {i}"} for i in range(14)]
    )
    out = tmp_path / "out"
    state = out / ".sora-async-journal.simulated.jsonl"
    command = ["batch", str(source), "-o", str(out), "--simulate", "--time-scale", str(SCALE)]

    def made() -> list[dict[str, object]]:
        lines = state.read_text().split("\n") if state.exists() else []
        return [json.loads(line) for line in lines if '"task_id"' in line]

    process = await sora_async(*command)
    for _ in range(600):  # wait until some tasks exist, then kill mid-run
        if len(made()) >= 5:
            break
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    assert 5 <= len(made()) < 14
    code, stdout, stderr = await run_cli(*command, "--json")
    assert code in (0, 1), stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    prompts = [str(task["prompt"]) for task in made()]
    assert sorted(prompts) == sorted(set(prompts))  # no prompt made twice
    for row in rows:
        assert row["state"] in ("downloaded", "uncertain"), row
    assert (code == 0) == all(row["state"] == "downloaded" for row in rows)
    assert json.loads(stdout)["exit_code"] == code


async def test_standalone_fake_shows_its_counters(tmp_path: Path) -> None:
    """`sora-async simulate` serves GET /fake/stats with the counters FakeApixo.stats keeps
    (requests, 429s, creates per prompt, unfinished peak), so tests of other programs can
    assert on the service's side."""
    fake_options = ["--port", "0", "--generation", "fixed:1", "--period", str(60 / SCALE)]
    process = await sora_async("simulate", *fake_options)
    try:
        assert process.stdout is not None
        lines = [(await process.stdout.readline()).decode().strip() for _ in range(3)]
        env = dict(line.split("=", 1) for line in lines[:2])
        stats_url = lines[2].split("GET ", 1)[1]
        scale = ["--time-scale", str(SCALE)]
        code, _, _ = await run_cli("generate", "counted", "-o", str(tmp_path), *scale, env=env)
        assert code == 0
        async with aiohttp.ClientSession() as session, session.get(stats_url) as response:
            stats = await response.json()
        assert stats["creates"] == 1
        assert stats["creates_per_prompt"] == {"counted": 1}
        assert stats["rate_limited"] == 0
        assert stats["requests"] >= 2
        assert stats["max_concurrent_tasks"] == 1
        assert stats["unfinished_tasks"] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()


@pytest.mark.parametrize("moment", ["while waiting", "while the create is in flight"])
async def test_interrupted_generate_names_its_task(tmp_path: Path, moment: str) -> None:
    """SIGTERM to generate once its create was sent (even before the answer came): exit
    143 with a line naming the task id and how to fetch it; `sora-async download` then
    saves the video without a second create."""
    async with FakeApixo(generation_time=lognormal(200 / SCALE, 0.1), period=60 / SCALE) as fake:
        env = {"APIXO_API_KEY": fake.api_key, "APIXO_BASE_URL": fake.url}
        in_flight = moment == "while the create is in flight"
        if in_flight:
            # The answer comes late, within the attempt timeout (60 s / SCALE = 0.6 s).
            fake.inject("slow", on="create", delay=0.5)
        process = await sora_async("generate", "slow", "--time-scale", str(SCALE), env=env)
        for _ in range(600):
            if fake.stats.requests_by_kind["create"]:
                break
            await asyncio.sleep(0.05)
        if not in_flight:
            await asyncio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 143
        (task_id,) = fake.tasks
        lines = err.decode().strip().splitlines()
        assert len(lines) == (2 if in_flight else 1)
        assert f"sora-async download {task_id}" in lines[-1]
        code, stdout, _ = await run_cli(
            "download", task_id, "-o", str(tmp_path), "--json", "--time-scale", str(SCALE), env=env
        )
        assert code == 0
        assert Path(json.loads(stdout)["file"]).read_bytes()[4:8] == b"ftyp"
        assert fake.stats.creates == 1


async def test_retry_flags_of_the_batch_command(tmp_path: Path) -> None:
    """A batch with a failed item exits 1 and says to use --retry-failed; a plain rerun
    creates nothing; with --retry-failed the failed item is created again (the fake
    counts two creates of that prompt, one of every other)."""
    source = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": "good", "prompt": "fine"}, {"id": "bad", "prompt": "no [fail:NSFW]"}],
    )
    async with FakeApixo(generation_time=lognormal(180 / SCALE, 0.3), period=60 / SCALE) as fake:
        env = {"APIXO_API_KEY": fake.api_key, "APIXO_BASE_URL": fake.url}
        command = ["batch", str(source), "-o", str(tmp_path / "out"), "--time-scale", str(SCALE)]
        code, _, stderr = await run_cli(*command, env=env)
        assert code == 1
        assert "1 failed: add --retry-failed" in stderr
        code, stdout, _ = await run_cli(*command, "--json", env=env)
        assert code == 1
        assert json.loads(stdout)["error"] == "ItemsNotDone"
        assert fake.stats.creates == 2
        code, _, _ = await run_cli(*command, "--retry-failed", env=env)
        assert code == 1
        assert fake.stats.creates_per_prompt == {"fine": 1, "no [fail:NSFW]": 2}


async def test_failed_generation_is_one_line_naming_its_fail_code() -> None:
    """generate for a task that fails: exit 1, one line with the task id and fail code,
    and no advice to download a video that does not exist."""
    async with FakeApixo(generation_time=lognormal(180 / SCALE, 0.3), period=60 / SCALE) as fake:
        env = {"APIXO_API_KEY": fake.api_key, "APIXO_BASE_URL": fake.url}
        code, _, stderr = await run_cli(
            "generate", "x [fail:NSFW]", "--time-scale", str(SCALE), env=env
        )
    assert code == 1
    (task_id,) = fake.tasks
    assert stderr.strip() == f"error: task {task_id} failed: NSFW: Task failed: NSFW"


async def test_top_shows_the_figures_of_a_shared_key(redis_server: RedisServer) -> None:
    """`sora-async top` reads the key a worker uses through Redis, taking nothing: its
    slots and window use are the service's counts; --once prints the table."""
    import sora_async as sa

    # A key of its own: the session's Redis holds other tests' keys.
    key = secrets.token_hex(8)
    async with FakeApixo(api_key=key, generation_time=fixed(60.0), pending_time=0.05) as fake:
        governor = sa.RedisGovernor(redis_server.url, api_key=fake.api_key, trust_empty_redis=True)
        async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url, governor=governor) as c:
            for i in range(2):
                await c.submit(sa.TextToVideo(prompt=f"top {i}"))
            args = ["top", "--redis-url", redis_server.url, "--api-key", fake.api_key]
            code, out, err = await run_cli(*args, "--json")
            assert (code, err) == (0, "")
            figures = json.loads(out)
            assert (figures["slots_in_use"], figures["slot_limit"]) == (fake.unfinished_tasks(), 10)
            assert figures["requests_in_window"] == fake.stats.requests == 2
            assert (figures["rate_limited"], figures["slot_waiters"]) == (0, 0)
            code, out, _ = await run_cli(*args, "--once")
            assert code == 0
            assert "task slots" in out
            assert "2 / 10" in out


async def test_limits_given_on_the_command_line_hold_for_their_model(tmp_path: Path) -> None:
    """``--limits veo-3-1=60/60/2``: a batch of six Veo prompts never has more than two
    Veo tasks on the service at once (which would take ten) and saves every video; a
    malformed value is one line naming ``limits``, and nothing is sent."""
    rows = [{"id": f"v{i}", "model": "veo-3-1", "prompt": f"p {i}"} for i in range(6)]
    source = write_jsonl(tmp_path / "veo.jsonl", rows)
    out = tmp_path / "out"
    async with FakeApixo(generation_time=lognormal(180 / SCALE, 0.3), period=60 / SCALE) as fake:
        env = {"APIXO_API_KEY": fake.api_key, "APIXO_BASE_URL": fake.url}
        command = ["batch", str(source), "-o", str(out), "--time-scale", str(SCALE), "--json"]
        code, _, stderr = await run_cli(*command, "--limits", "veo-3-1=60/60/2", env=env)
        requests_before = fake.stats.requests
        bad = await run_cli(*command, "--limits", "veo-3-1=60/60", env=env)
        stats = fake.stats
    assert code == 0, stderr
    assert stats.max_concurrent_tasks_by_model["veo-3-1"] == 2
    assert stats.rate_limited == 0
    assert len(list(out.glob("*.mp4"))) == 6
    bad_code, bad_out, _ = bad
    assert bad_code == 2
    error = json.loads(bad_out)
    assert error["field"] == "limits"
    assert "MODEL=REQUESTS/PERIOD/TASKS" in error["message"]
    assert stats.requests == requests_before
