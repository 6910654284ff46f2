"""A durable batch at 1k to 1M items: CPU per item, peak memory, first request, resume.

Each size runs in a fresh process (its peak RSS is its own), against the fake service
in a process of its own with the limits lifted and instant generations, so that the
figures are the client's: the file read into the journal, creates, polls, downloads,
journal writes and the manifest. Then the finished batch is run again (a no-op
resume) in another fresh process.

    python benchmarks/batch.py [--sizes 1000,10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def write_prompts(path: Path, count: int) -> None:
    with path.open("w") as file:
        for i in range(count):
            file.write(json.dumps({"id": f"item-{i}", "prompt": f"prompt {i}"}) + "\n")


async def run_once(source: Path, out: Path, url: str) -> dict[str, Any]:
    """Run the batch (in this fresh process); return what it cost."""
    import sora_async as sa

    limits = sa.Limits(requests=10**9, period=1.0, concurrent_tasks=100)
    first: list[float] = []
    start = time.perf_counter()

    def progress(seen: sa.BatchProgress) -> None:
        if not first and any(seen.counts.get(s) for s in ("submitting", "running")):
            first.append(time.perf_counter() - start)

    async with sa.SoraClient(
        api_key="test-key",
        base_url=url,
        limits=limits,
        governor=sa.LocalGovernor(limits, jitter_margin=0.0),
        poll_policy=sa.PollPolicy(prior_mean=0.01, min_interval=0.0, min_hazard=0.0),
    ) as client:
        cpu = time.process_time()
        start = time.perf_counter()
        report = await sa.run_batch(client, source, out, on_progress=progress)
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - start
    assert report.ok, report.counts
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "first_request_s": first[0] if first else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "downloaded": report.counts.get("downloaded", 0),
    }


def child(source: Path, out: Path, url: str) -> dict[str, Any]:
    found = subprocess.run(
        [sys.executable, __file__, "--child", str(source), str(out), url],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(found.stdout.strip().splitlines()[-1])
    return result


def measure(size: int, scratch: Path) -> dict[str, Any]:
    source = scratch / f"prompts-{size}.jsonl"
    out = scratch / f"out-{size}"
    write_prompts(source, size)
    fake = subprocess.Popen(
        [
            *(sys.executable, "-m", "sora_async.testing", "--port", "0"),
            *("--requests", str(10**9), "--period", "1", "--concurrent-tasks", str(10**9)),
            *("--generation", "fixed:0", "--pending-time", "0", "--balance", "1e15"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        url = fake.stdout.readline().strip().partition("=")[2]
        run = child(source, out, url)
        manifest = out / "manifest.jsonl"
        written = manifest.stat().st_mtime_ns
        resume = child(source, out, url)
        rewritten = manifest.stat().st_mtime_ns != written
    finally:
        fake.terminate()
        fake.wait()
    return {
        "items": size,
        "cpu_ms_per_item": run["cpu_s"] / size * 1e3,
        "wall_s": run["wall_s"],
        "first_request_s": run["first_request_s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "resume_s": resume["wall_s"],
        "resume_peak_rss_mb": resume["peak_rss_mb"],
        "manifest_rewritten": rewritten,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "OUT", "URL"))
    args = parser.parse_args()
    if args.child:
        source, out, url = args.child
        print(json.dumps(asyncio.run(run_once(Path(source), Path(out), url))))
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as scratch:
        for size in (int(text) for text in args.sizes.split(",")):
            rows.append(measure(size, Path(scratch)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print("| items | CPU per item | wall | first request | peak RSS | no-op resume | its RSS |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        rewritten = " (manifest rewritten)" if row["manifest_rewritten"] else ""
        print(
            f"| {row['items']:,} | {row['cpu_ms_per_item']:.2f} ms | {row['wall_s']:.1f} s "
            f"| {row['first_request_s']:.2f} s | {row['peak_rss_mb']:.0f} MB "
            f"| {row['resume_s']:.2f} s{rewritten} "
            f"| {row['resume_peak_rss_mb']:.0f} MB |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
