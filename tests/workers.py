"""Batch workers as real processes: ``sora-async batch --redis-url`` against a fake
service in the test's own process, whose counters judge."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sora_async.testing import FakeApixo, lognormal

SCALE = 30.0  # 60 requests per 2 s, generations of about 6 s


def scaled_fake(seed: int, api_key: str = "test-key") -> FakeApixo:
    """The fake service at the real limits, every timing divided by SCALE."""
    return FakeApixo(
        api_key=api_key,
        period=60.0 / SCALE,
        generation_time=lognormal(180.0 / SCALE, 0.3),
        pending_time=0.05,
        balance=1e9,
        seed=seed,
    )


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds: it reads what other processes wrote, so look often."""
    while not condition():  # noqa: ASYNC110 - no event crosses a process boundary
        await asyncio.sleep(0.02)


def write_prompts(folder: Path, count: int) -> Path:
    """Write ``count`` prompts with ids to a JSONL file."""
    path = folder / "prompts.jsonl"
    lines = [
        json.dumps({"id": f"item-{i:03d}", "prompt": f"prompt number {i}", "duration": 10})
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def start_worker(
    fake: FakeApixo,
    redis_url: str,
    prompts: Path,
    out: Path,
    shard: str | None,
    *extra: str,
    scale: float = SCALE,
    env: dict[str, str] | None = None,
    as_json: bool = True,
) -> asyncio.subprocess.Process:
    """Start one ``sora-async batch`` worker process on its shard (None: a host of one
    batch shared through Redis), with ``extra`` options and ``env`` added to this
    process's environment."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sora_async",
        "batch",
        str(prompts),
        "-o",
        str(out),
        *(["--shard", shard] if shard is not None else []),
        "--time-scale",
        str(scale),
        "--redis-url",
        redis_url,
        "--api-key",
        fake.api_key,
        "--base-url",
        fake.url,
        *(["--json"] if as_json else []),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else os.environ | env,
    )


async def top(redis_url: str, api_key: str) -> dict[str, Any]:
    """Return what ``sora-async top --json`` prints of the key on ``redis_url``."""
    command = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sora_async", "top", "--json", "--redis-url", redis_url),
        *("--api-key", api_key, "--time-scale", str(SCALE)),
        stdout=asyncio.subprocess.PIPE,
    )
    printed, _ = await command.communicate()
    assert command.returncode == 0, printed
    found: dict[str, Any] = json.loads(printed)
    return found


async def top_rows(redis_url: str, api_key: str) -> dict[str, dict[str, Any]]:
    """Return ``sora-async top --json``'s rows of the ledger, by name."""
    return {row["name"]: row for row in (await top(redis_url, api_key))["work"]}
