"""The example app's SQLite store after a kill, as an operator may leave it: real
uvicorn, the fake service in its own process (tests/processes.py), judged by the
fake's counters and what the app printed. A store whose -wal file was deleted, or
that was emptied, after a SIGKILL is refused at start with one line and exit code
3, so no key is created twice; a store truncated to half likewise, not a traceback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import ROOT, STARTED, AppProcess, app_process, clean_env, collect, fake_and_app
from tests.test_fastapi_production import ENV, FAKE_LIMITS

KEYS = [f"order-{n}" for n in range(3)]
OPTIONS = ("--generation", "fixed:60", "--pending-time", "0.1", "--balance", "1e6")


@dataclass
class Restart:
    """A restart of the app: whether it started, its exit code and what it printed."""

    started: bool
    returncode: int | None
    lines: list[str]

    @property
    def errors(self) -> list[str]:
        """Return the app's error lines (uvicorn prints them as ``ERROR: ...``)."""
        return [line for line in self.lines if line.startswith("ERROR:")]


async def restart(env: dict[str, str], port: int) -> Restart:
    """Start the app again on ``port``. Should it start, send the old keys again (as
    their callers would) and stop it."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "uvicorn", "examples.fastapi_app:app"),
        *("--host", "127.0.0.1", "--port", str(port)),
        cwd=ROOT,
        env=clean_env(**env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    app = AppProcess(process, f"http://127.0.0.1:{port}")
    assert process.stdout is not None
    reading = asyncio.ensure_future(collect(process.stdout, app.lines))
    for _ in range(1500):
        if process.returncode is not None or any(STARTED in line for line in app.lines):
            break
        await asyncio.sleep(0.02)
    started = any(STARTED in line for line in app.lines)
    if started:
        await post_keys(app)
        await app.stop(signal.SIGTERM)
    await asyncio.wait_for(process.wait(), 30)
    await reading
    return Restart(started, process.returncode, app.lines)


async def post_keys(app: AppProcess) -> list[str]:
    """POST one prompt under each of KEYS; return the task ids."""
    async with app.http() as http:
        answers = await asyncio.gather(
            *(
                http.post("/videos", json={"prompt": key}, headers={"Idempotency-Key": key})
                for key in KEYS
            )
        )
    assert [answer.status_code for answer in answers] == [200] * len(KEYS), app.log
    return [answer.json()["task_id"] for answer in answers]


def files(store: Path) -> dict[str, Path]:
    return {suffix: store.with_name(store.name + suffix) for suffix in ("", "-wal", "-shm")}


@pytest.mark.parametrize("loss", ["wal deleted", "store emptied"])
async def test_a_store_that_lost_its_records_after_a_kill_stops_the_restart(
    tmp_path: Path, loss: str
) -> None:
    """3 keyed tasks made, SIGKILL, then the store's -wal deleted (or the store
    replaced by an empty file): the restart refuses in one line that names the path,
    what happened and SORA_ASYNC_STORE_ACCEPT_LOSS=1, exits 3, and the fake sees 0
    repeated creates. With SORA_ASYNC_STORE_ACCEPT_LOSS=1 it starts, knowingly."""
    store = tmp_path / "tasks.db"
    env = ENV | {"SORA_ASYNC_STORE": str(store)}
    async with fake_and_app(FAKE_LIMITS + OPTIONS, env=env) as (fake, app, app_env):
        await post_keys(app)
        await app.stop(signal.SIGKILL)
        assert files(store)["-wal"].stat().st_size > 0  # the 3 keys are there
        if loss == "wal deleted":
            files(store)["-wal"].unlink()
        else:
            for path in files(store).values():
                path.unlink(missing_ok=True)
            store.write_bytes(b"")
        refused = await restart(app_env, app.address[1])
        creates_after_refusal = (await fake.stats())["creates"]
        accepting = app_env | {"SORA_ASYNC_STORE_ACCEPT_LOSS": "1"}
        async with app_process(accepting, port=app.address[1]) as accepted:
            warned = [line for line in accepted.lines if "accept_loss=True" in line]
    print("\n".join(refused.lines))
    assert not refused.started
    assert refused.returncode == 3
    assert creates_after_refusal == len(KEYS)  # 0 created again
    assert not any("Traceback" in line for line in refused.lines), "\n".join(refused.lines)
    (line, failed) = refused.errors
    assert line.startswith(f"ERROR:    error: store: {store} "), line
    assert "SORA_ASYNC_STORE_ACCEPT_LOSS=1" in line
    assert ("-wal file is missing" if loss == "wal deleted" else "tasks.db-id") in line
    assert failed == "ERROR:    Application startup failed. Exiting."
    assert len(warned) == 1, accepted.log


async def test_a_store_truncated_to_half_stops_the_start_in_one_line(tmp_path: Path) -> None:
    """The store's main file cut to half after a clean stop: one line naming the path
    and the damage, exit 3, no traceback."""
    store = tmp_path / "tasks.db"
    env = ENV | {"SORA_ASYNC_STORE": str(store)}
    async with fake_and_app(FAKE_LIMITS + OPTIONS, env=env) as (fake, app, app_env):
        await post_keys(app)
        await app.stop(signal.SIGTERM)
        os.truncate(store, store.stat().st_size // 2)
        refused = await restart(app_env, app.address[1])
        stats = await fake.stats()
    print("\n".join(refused.lines))
    assert (refused.started, refused.returncode) == (False, 3)
    assert stats["creates"] == len(KEYS)
    assert not any("Traceback" in line for line in refused.lines)
    (line, _) = refused.errors
    assert line.startswith(f"ERROR:    error: store: cannot open {store}: it is damaged"), line
