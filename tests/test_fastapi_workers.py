"""examples/fastapi_app.py under ``uvicorn --workers 4``, the workers sharing one key via Redis.

Real processes as a user would run them: uvicorn in a subprocess, a real redis-server
(the session's ``redis_server``), and the fake service in the test process at
time-compressed limits (30 requests in any 4-s window, 4 unfinished tasks), sending
callbacks to the app. The fake's own counters judge; the workers' logs (each line
tagged with its process id) tell which worker served which request.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path
from typing import Any

import httpx

import sora_async as sa
from sora_async.testing import FakeApixo, RedisServer, fixed
from tests.processes import APP_KEY, app_process, free_port

WORKERS = 4
VIDEOS = 8
WAITERS = 3  # GETs awaiting each video, each on a new connection
REQUESTS, PERIOD, SLOTS = 30, 4.0, 4
GENERATION = 3.0

# Every line says which process wrote it: the test learns which worker served what.
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"pid": {"format": "%(process)d %(name)s %(message)s"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "pid",
            "stream": "ext://sys.stderr",
        }
    },
    "loggers": {
        name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
        for name in ("uvicorn", "uvicorn.access", "sora_async")
    },
}
# The log line of a callback for a task that the receiving worker does not track.
SHARED = re.compile(r"^(\d+) sora_async callback for task (\S+) not tracked here: shared$")
# "<pid> uvicorn.access <client ip>:<port> - ..." : which worker served which client.
ACCESS = re.compile(r"^(\d+) uvicorn\.access ([\d.]+):\d+ - ")


async def test_four_workers_share_one_key_and_wake_each_other(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Four uvicorn workers with callbacks on serve 8 generations through one key, each
    awaited by three GETs: no 429, no window over the limit, never more than the key's
    slots (all of them used), one create per video, every video delivered. With polling
    off, a waiter wakes only by a callback: one in another worker wakes it through Redis."""
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    log_config = tmp_path / "log.json"
    log_config.write_text(json.dumps(LOG_CONFIG))
    async with FakeApixo(
        api_key=secrets.token_hex(8),  # a fresh key: its own budget in the session's Redis
        requests=REQUESTS,
        period=PERIOD,
        concurrent_tasks=SLOTS,
        generation_time=fixed(GENERATION),
        pending_time=0.2,
        balance=1e6,
    ) as fake:
        # The operator's Redis has served this key before: the workers find its budget
        # there and start at once (an empty Redis would make them wait out one window).
        seed = sa.RedisGovernor(
            redis_server.url,
            api_key=fake.api_key,
            limits=sa.Limits(requests=REQUESTS, period=PERIOD, concurrent_tasks=SLOTS),
            trust_empty_redis=True,
        )
        await seed.request("balance")
        await seed.aclose()
        env = {
            "APIXO_API_KEY": fake.api_key,
            "APIXO_BASE_URL": fake.url,
            "APIXO_CALLBACK_URL": f"{origin}/apixo/callback",
            "APIXO_CALLBACK_SECRET": secrets.token_urlsafe(16),
            "APIXO_LIMITS": f"{REQUESTS}/{PERIOD}/{SLOTS}",
            # No polling safety net within the test: every end must come by callback.
            "APIXO_POLL_INTERVAL": "600",
            "SORA_ASYNC_REDIS_URL": redis_server.url,
            "SORA_APP_API_KEYS": APP_KEY,
        }
        options = ("--workers", str(WORKERS), "--log-config", str(log_config))
        looks_before_end: dict[str, int] = {}

        async def request(source: str, method: str, path: str, **options: Any) -> httpx.Response:
            # A new connection from its own loopback address: any worker may take it, and
            # the access log's client address tells which one did.
            transport = httpx.AsyncHTTPTransport(local_address=source)
            headers = {"Authorization": f"Bearer {APP_KEY}"}
            async with httpx.AsyncClient(
                base_url=origin, transport=transport, timeout=30, headers=headers
            ) as http:
                return await http.request(method, path, **options)

        async def video(number: int) -> tuple[str, list[httpx.Response]]:
            created = await request(
                f"127.1.0.{number + 1}", "POST", "/videos", json={"prompt": f"kite {number}"}
            )
            assert created.status_code == 200, created.text
            task_id: str = created.json()["task_id"]
            waits = []
            for waiter in range(WAITERS):
                path = f"/videos/{task_id}?timeout=20"
                source = f"127.2.{waiter}.{number + 1}"
                waits.append(asyncio.ensure_future(request(source, "GET", path)))
                await asyncio.sleep(0.05)  # apart, or one worker tends to take them all
            # Just before the end: how many status requests asked about the task.
            record = fake.tasks[task_id]
            await asyncio.sleep(record.complete_at - fake.now() - 0.05)
            looks_before_end[task_id] = record.polls
            return task_id, await asyncio.gather(*waits)

        # uvicorn stops its workers at the block's end, which close their clients.
        async with app_process(env, *options, port=port, started=WORKERS) as app:
            results = await asyncio.gather(*(video(number) for number in range(VIDEOS)))
    lines = app.lines
    log = "\n".join(lines)
    for task_id, answers in results:
        for got in answers:
            assert got.status_code == 200, (got.text, log)
            assert got.json()["url"] == f"{fake.origin}/files/{task_id}.mp4"
    stats = fake.stats
    assert stats.rate_limited == 0, log
    assert stats.max_requests_in_window <= REQUESTS
    assert stats.max_concurrent_tasks == SLOTS  # every slot used, by any worker, none over
    assert stats.creates == VIDEOS
    assert set(stats.creates_per_prompt.values()) == {1}
    # One callback per task, none refused: the workers share one callback secret.
    assert stats.callbacks_attempted == stats.callbacks_delivered == VIDEOS
    # Which worker served what, by the client address of each request.
    served = {m[2]: m[1] for m in map(ACCESS.match, lines) if m}
    shared = {m[2] for m in map(SHARED.match, lines) if m}
    woken_elsewhere = 0
    for number, (task_id, _) in enumerate(results):
        creator = served[f"127.1.0.{number + 1}"]
        waiters = [served[f"127.2.{waiter}.{number + 1}"] for waiter in range(WAITERS)]
        # A GET in the creator's worker waits at once; one in another worker first looks
        # at the task (one status request), then waits. Nothing else asks before the end
        # (no polls; a callback's confirmation comes after it). So when every such GET had
        # looked before the end, every waiter was waiting when the task ended. Its one
        # callback reached one worker: every waiting worker but that one was woken
        # through Redis, and all of them were when the receiver tracked nothing of it.
        if looks_before_end[task_id] == sum(waiter != creator for waiter in waiters):
            woken_elsewhere += len(set(waiters)) - (task_id not in shared)
    assert woken_elsewhere >= 1, log
