"""Generate the bundled prompts against the built-in fake service, in compressed time.

Every timing (the key's 60-second window, ~180-second generations) is scaled down
20 times, so the batch finishes in well under a minute. MP4 files and a manifest
land in ``out/``.

    python examples/demo.py [prompts.jsonl] [out-dir]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import msgspec

import sora_async as sa
from sora_async.testing import FakeApixo, lognormal

SCALE = 20.0  # every service timing is divided by this


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


async def main(prompts: Path, out: Path) -> int:
    rows = read_jsonl(prompts)
    requests = {str(row.pop("id")): msgspec.convert(row, sa.VideoRequest) for row in rows}
    ids = {id(request): name for name, request in requests.items()}
    limits = sa.Limits(requests=60, period=60 / SCALE, concurrent_tasks=10)
    async with FakeApixo(
        period=limits.period,
        generation_time=lognormal(180 / SCALE, 0.35),
        pending_time=2 / SCALE,
    ) as fake:
        async with sa.SoraClient(
            api_key=fake.api_key,
            base_url=fake.url,
            limits=limits,
            governor=sa.LocalGovernor(limits, jitter_margin=0.05),
            poll_policy=sa.PollPolicy(prior_mean=180 / SCALE, min_interval=2 / SCALE),
        ) as client:
            started = time.monotonic()
            manifest: list[dict[str, object]] = []
            done = 0
            async for outcome in client.generate_many(requests.values()):
                done += 1
                name = ids[id(outcome.request)]
                row: dict[str, object] = {
                    "id": name,
                    "prompt": outcome.request.prompt,
                    "task_id": outcome.task_id,
                }
                if outcome.video is not None:
                    path = await client.download(outcome.video, out, name=name)
                    row.update(state="downloaded", files=[str(path)])
                else:
                    row.update(state="failed", error=str(outcome.error))
                manifest.append(row)
                print(f"[{done}/{len(requests)}] {name}: {row['state']}", flush=True)
            write_jsonl(out / "manifest.jsonl", manifest)
            elapsed = time.monotonic() - started
        stats = fake.stats
    failed = sum(row["state"] != "downloaded" for row in manifest)
    print(
        f"{len(manifest) - failed} videos in {out}/ in {elapsed:.1f} s "
        f"({elapsed * SCALE / 60:.0f} min at real speed); manifest: {out}/manifest.jsonl; "
        f"server saw {stats.requests} requests, max {stats.max_requests_in_window} a minute, "
        f"{stats.max_concurrent_tasks} tasks at once, {stats.rate_limited} 429s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    here = Path(__file__).parent
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "prompts.jsonl"
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("out")
    sys.exit(asyncio.run(main(source, target)))
