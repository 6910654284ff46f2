"""Figures of the edges a user meets: stopping a batch, and a download that never ends.

- Real time: ``sora-async batch`` as a subprocess against the fake service (timings
  divided by 100), sent SIGTERM once 4 of 16 tasks exist: seconds from the signal to
  the exit (manifest written), then the rerun: duplicate creates, as the fake counts.
- Real time: a result URL that streams without end, downloaded with a 64 MiB cap:
  seconds until it is stopped, and the bytes left on disk.

    python benchmarks/edges.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

import sora_async as sa
from sora_async.testing import FakeApixo, lognormal

RESULTS = Path(__file__).parent / "results"
SCALE = 100.0
CAP = 64 * 2**20


async def stop_and_resume(folder: Path) -> dict[str, Any]:
    """Stop a batch with SIGTERM mid-run, then run it again to its end."""
    source = folder / "p.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"v{i}", "prompt": f"edge {i}"}) + "\n" for i in range(16))
    )
    async with FakeApixo(
        generation_time=lognormal(180 / SCALE, 0.4), period=60 / SCALE, balance=1e6
    ) as fake:
        env = {**os.environ, "APIXO_API_KEY": fake.api_key, "APIXO_BASE_URL": fake.url}
        command = [sys.executable, "-m", "sora_async", "batch", str(source)]
        command += ["-o", str(folder / "out"), "--time-scale", str(SCALE)]
        quiet = asyncio.subprocess.DEVNULL
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=quiet, stderr=quiet
        )
        while fake.stats.creates < 4:  # noqa: ASYNC110 (the fake's counter is the signal)
            await asyncio.sleep(0.01)
        sent = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        code = await process.wait()
        seconds = time.perf_counter() - sent
        rerun = await asyncio.create_subprocess_exec(*command, env=env, stdout=quiet, stderr=quiet)
        final = await rerun.wait()
        per_prompt = fake.stats.creates_per_prompt
    return {
        "exit_code": code,
        "seconds_to_exit": seconds,
        "rerun_exit_code": final,
        "duplicate_creates": sum(n - 1 for n in per_prompt.values()),
        "creates": sum(per_prompt.values()),
    }


async def endless_download(folder: Path) -> dict[str, Any]:
    """Download from a URL that streams without end, with a 64 MiB cap."""

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        await response.prepare(request)
        chunk = b"\0" * 2**16
        with contextlib.suppress(ConnectionError):  # until the client hangs up
            while True:
                await response.write(chunk)
        return response

    app = web.Application()
    app.router.add_get("/endless.mp4", endless)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/endless.mp4"
    try:
        # Downloads never touch the API: no service is needed behind base_url.
        async with sa.SoraClient(api_key="k", base_url=url, max_download_bytes=CAP) as client:
            started = time.perf_counter()
            with contextlib.suppress(sa.TransportError):  # the cap's refusal
                await client.download(sa.Video(task_id="endless", urls=(url,)), folder)
            seconds = time.perf_counter() - started
    finally:
        await runner.cleanup()
        sock.close()
    return {"cap_bytes": CAP, "seconds_to_stop": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    stops = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            stops.append(asyncio.run(stop_and_resume(Path(scratch))))
    with tempfile.TemporaryDirectory() as scratch:
        download = asyncio.run(endless_download(Path(scratch)))
        download["bytes_left_on_disk"] = sum(p.stat().st_size for p in Path(scratch).iterdir())
    exits = sorted({run["exit_code"] for run in stops})
    median = statistics.median(run["seconds_to_exit"] for run in stops)
    worst = max(run["seconds_to_exit"] for run in stops)
    duplicates = sum(run["duplicate_creates"] for run in stops)
    reruns = sorted({run["rerun_exit_code"] for run in stops})
    print("| measure | value |\n|---|---|")
    print(
        f"| SIGTERM to exit, batch of 16 stopped after 4 creates (median of {len(stops)}, worst)"
        f" | {median:.2f} s, {worst:.2f} s; exit code {exits} |"
    )
    print(f"| duplicate creates after the reruns (exit codes {reruns}) | {duplicates} |")
    print(
        f"| endless result stream, cap {CAP // 2**20} MiB: time to stop, bytes left on disk"
        f" | {download['seconds_to_stop']:.2f} s, {download['bytes_left_on_disk']} |"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "edges.json").write_text(
        json.dumps({"stop": stops, "download": download}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
