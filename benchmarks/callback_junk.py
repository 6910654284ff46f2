"""The FastAPI example under a flood of callback junk: how much later do its own videos end?

The app (``python -m uvicorn examples.fastapi_app:app``, callbacks on) and the fake
service (``python -m sora_async.testing``) each run in a process of their own, as in
tests/processes.py. ``--generations`` callers each POST a video and wait for it with
``GET /videos/{id}``; the wall time from the first POST to the last video is the
figure. It is measured quiet, then beside junk POSTed at the callback route at
``--rate`` requests a second over keep-alive connections from this process:

- ``forged``: success claims with a wrong token (403);
- ``unknown``: success claims signed with the callback secret for task ids nobody
  made (200);
- ``claims``: success claims signed with the callback secret for the callers' own
  running tasks (a forger who holds the secret: each create's own token is not
  theirs, so the claims are dropped at no cost; before per-create tokens each was a
  claim only the service's status could refute);
- ``garbage``: not JSON, signed with the secret (400).

The fake's counters say what the service saw (creates, status requests, 429s,
callbacks delivered); /proc says what the app's process spent (CPU-s).

    python benchmarks/callback_junk.py [--generations 60] [--rate 1500] [--mix claims,garbage]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.processes import AppProcess, fake_and_app  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SLOTS = 10


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system) process ``pid`` has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def junk_request(kind: str, path: str, token: str, task_id: str) -> bytes:
    """Return one raw HTTP/1.1 keep-alive POST of junk of ``kind``."""
    result = json.dumps({"resultUrls": ["https://attacker.example/x.mp4"]})
    claim = {"taskId": task_id, "state": "success", "resultJson": result}
    body = json.dumps({"code": 200, "msg": "success", "data": claim}).encode()
    if kind == "forged":
        token = "not-the-token"
    elif kind == "garbage":
        body = b"\x00{not json" * 8
    head = (
        f"POST {path}?token={token} HTTP/1.1\r\nHost: app\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Junk:
    """What the junk senders did."""

    sent: int = 0
    answered: dict[str, int] | None = None
    errors: int = 0


async def send_junk(
    app: AppProcess,
    token: str,
    kinds: list[str],
    rate: float,
    running: list[str],
    stop: asyncio.Event,
    junk: Junk,
    connections: int = 16,
) -> None:
    """POST junk at the callback route at ``rate`` a second until ``stop`` is set."""
    path = "/apixo/callback"
    counts: dict[str, int] = {}
    junk.answered = counts
    per_connection = rate / connections
    serial = itertools.count()

    async def one_connection(number: int) -> None:
        reader, writer = await asyncio.open_connection(*app.address)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent_here = 0
        try:
            while not stop.is_set():
                n = next(serial)
                kind = kinds[n % len(kinds)]
                if kind == "claims" and running:
                    task_id = running[n % len(running)]
                else:
                    task_id = f"task_junk{n:09d}"
                writer.write(junk_request(kind, path, token, task_id))
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                code = status_line.split(b" ")[1].decode() if status_line else "closed"
                counts[code] = counts.get(code, 0) + 1
                junk.sent += 1
                sent_here += 1
                ahead = started + sent_here / per_connection - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        except (ConnectionError, asyncio.IncompleteReadError):
            junk.errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(one_connection(n) for n in range(connections)))


async def run(
    generations: int, generation: float, limits: str, rate: float, kinds: list[str]
) -> dict[str, Any]:
    """Make ``generations`` videos beside junk at ``rate`` a second (0: quiet)."""
    requests, period = limits.split("/")
    fake_options = (
        *("--requests", requests, "--period", period, "--concurrent-tasks", str(SLOTS)),
        *("--generation", f"fixed:{generation}", "--pending-time", "0.1", "--balance", "1e9"),
    )
    env = {"APIXO_LIMITS": f"{limits}/{SLOTS}"}
    async with fake_and_app(fake_options, env=env) as (fake, app, app_env):
        token = app_env["APIXO_CALLBACK_SECRET"]
        running: list[str] = []
        stop = asyncio.Event()
        junk = Junk()
        pid = app.process.pid
        cpu_before = cpu_seconds(pid)
        limits_http = httpx.Limits(max_connections=generations + 10)
        async with app.http(limits=limits_http) as http:
            loop = asyncio.get_running_loop()
            flooding = (
                asyncio.ensure_future(send_junk(app, token, kinds, rate, running, stop, junk))
                if rate > 0
                else None
            )
            if flooding is not None:
                await asyncio.sleep(1.0)  # the flood is on before the first POST
            started = loop.time()
            ended: list[float] = []

            async def one(n: int) -> None:
                answer = await http.post("/videos", json={"prompt": f"junk run {n}"}, timeout=None)
                assert answer.status_code == 200, answer.text
                task_id = answer.json()["task_id"]
                running.append(task_id)
                got = await http.get(f"/videos/{task_id}", params={"timeout": 3600}, timeout=None)
                assert got.status_code == 200, got.text
                running.remove(task_id)
                ended.append(loop.time() - started)

            await asyncio.gather(*(one(n) for n in range(generations)))
            wall = loop.time() - started
            stop.set()
            if flooding is not None:
                await flooding
            snapshot = (await http.get("/status")).json()
        cpu = cpu_seconds(pid) - cpu_before
        stats = await fake.stats()
    return {
        "rate": rate,
        "kinds": kinds,
        "wall_s": round(wall, 2),
        "app_cpu_s": round(cpu, 2),
        "junk_sent": junk.sent,
        "junk_per_s": round(junk.sent / max(wall, 1e-9), 1),
        "junk_answers": junk.answered or {},
        "creates": stats["creates"],
        "status_requests": stats["requests_by_kind"]["status"],
        "rate_limited": stats["rate_limited"],
        "callbacks_delivered": stats["callbacks_delivered"],
        "callbacks_failed_attempts": stats["callbacks_failed_attempts"],
        "rate_factor": snapshot.get("rate_factor"),
        "polls": snapshot.get("polls"),
        "callback_loss": snapshot.get("callback_loss"),
    }


async def main() -> None:
    """Run quiet, then with junk; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=60)
    parser.add_argument("--generation", type=float, default=20.0, help="seconds each")
    parser.add_argument("--limits", default="60/60", help="requests/period of the key")
    parser.add_argument("--rate", type=float, default=1500.0, help="junk requests a second")
    parser.add_argument("--mix", default="forged,unknown,claims,garbage")
    parser.add_argument("--skip-quiet", action="store_true")
    args = parser.parse_args()
    kinds = args.mix.split(",")
    rows = []
    if not args.skip_quiet:
        rows.append(await run(args.generations, args.generation, args.limits, 0, kinds))
        print(json.dumps(rows[-1]))
    rows.append(await run(args.generations, args.generation, args.limits, args.rate, kinds))
    print(json.dumps(rows[-1]))
    print(f"\n{'junk/s':>8} {'wall s':>8} {'app CPU-s':>10} {'status req':>11} {'429':>5}")
    for row in rows:
        print(
            f"{row['junk_per_s']:>8} {row['wall_s']:>8} {row['app_cpu_s']:>10} "
            f"{row['status_requests']:>11} {row['rate_limited']:>5}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "callback_junk.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "at": time.time()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
