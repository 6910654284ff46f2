"""examples/fastapi_app.py under abuse, run as an operator runs it: ``python -m uvicorn``
in a process, the fake service in another (``python -m sora_async.testing``). Memory and
CPU are read from the app's own /proc entries; requests from the fake's counters.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.processes import APP_KEY, app_process, fake_and_app

SLOTS = 10
FAKE_LIMITS = ("--requests", "600", "--period", "6", "--concurrent-tasks", str(SLOTS))
QUICK = ("--generation", "fixed:0.5", "--pending-time", "0.1", "--balance", "1e6")
ENV = {"APIXO_LIMITS": f"600/6/{SLOTS}"}
OTHER_KEY = "other-tenant-" + "b" * 24  # a second app key: another tenant
MB = 1024 * 1024


def status_kb(pid: int, field: str) -> int:
    """Return ``field`` (VmRSS, VmHWM) of process ``pid`` in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system) process ``pid`` has used, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


async def chunks(total: int, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    """Yield ``total`` bytes of a JSON-looking body, ``size`` at a time (never held whole)."""
    block = b"[" + b"1," * (size // 2 - 1) + b"1"
    sent = 0
    while sent < total:
        piece = block[: total - sent]
        yield piece
        sent += len(piece)


async def test_big_bodies_are_refused_unread_without_a_key_and_413_with_one() -> None:
    """Four 64 MB POST bodies at once without an API key (streamed, chunked), and one
    with a Content-Length of 64 MB: each is answered 401 and the app's peak resident
    memory grows by a few MB, not by the bodies (it was read and parsed before the
    401: +567 MB for one 200 MB body). With the key, a chunked 64 MB body and one
    announcing 64 MB are 413, as is an oversized callback; a body under the limit
    still works. Nothing of it reaches the service."""
    async with fake_and_app(FAKE_LIMITS + QUICK, env=ENV) as (fake, app, _):
        pid = app.process.pid
        async with app.http() as http:  # one request through, so that the app is warm
            assert (await http.get("/status")).status_code == 200
        before = status_kb(pid, "VmHWM")
        async with app.http(key=None) as anonymous:
            chunked = [anonymous.post("/videos", content=chunks(64 * MB)) for _ in range(4)]
            announced = anonymous.post(
                "/videos",
                content=chunks(64 * MB),
                headers={"Content-Length": str(64 * MB)},
            )
            refused = await asyncio.gather(*chunked, announced)
        peak = status_kb(pid, "VmHWM")
        async with app.http() as http:
            too_big = await http.post("/videos", content=chunks(64 * MB))
            too_long = await http.post(
                "/videos", content=b"{" + b" " * (300 * 1024) + b"}"
            )  # a Content-Length over the limit
            callback = await http.post("/apixo/callback?token=x", content=chunks(8 * MB))
            fine = await http.post("/videos", json={"prompt": "kite"})
        stats = await fake.stats()
    growth = (peak - before) / 1024
    print(f"peak RSS {before / 1024:.0f} -> {peak / 1024:.0f} MB over 5 x 64 MB unkeyed bodies")
    assert [answer.status_code for answer in refused] == [401] * 5, [a.text for a in refused]
    assert growth < 32, f"{growth:.0f} MB"
    assert too_big.status_code == 413, too_big.text
    assert too_big.json()["detail"]["error"] == "body_too_large"
    assert too_long.status_code == 413, too_long.text
    assert callback.status_code == 413, callback.text
    assert fine.status_code == 200, fine.text
    assert stats["creates"] == 1


async def test_tenants_are_apart_across_a_restart(tmp_path: Path) -> None:
    """Two app keys are two tenants. B sending A's Idempotency-Key with A's body gets a
    task of its own, and with another body its own task too (not a 422 that tells it
    the key exists); B's GET of A's task is 404, as an unknown id, and costs no
    request; A's retry of its key still answers A's task. After a restart on the same
    store the tasks keep their tenants: each GETs its own (200), not the other's (404)."""
    env = ENV | {
        "SORA_APP_API_KEYS": f"{APP_KEY},{OTHER_KEY}",
        "SORA_ASYNC_STORE": str(tmp_path / "tasks.db"),
    }
    body = {"prompt": "a kite over the sea"}

    async def post(http: httpx.AsyncClient, key: str, json: dict[str, str]) -> str:
        answer = await http.post("/videos", json=json, headers={"Idempotency-Key": key})
        assert answer.status_code == 200, answer.text
        task_id: str = answer.json()["task_id"]
        return task_id

    async with fake_and_app(FAKE_LIMITS + QUICK, env=env) as (fake, app, app_env):
        async with app.http() as a, app.http(key=OTHER_KEY) as b:
            a_first = await post(a, "order-1", body)
            a_second = await post(a, "order-2", body)
            a_keyless = (await a.post("/videos", json={"prompt": "no key"})).json()["task_id"]
            b_same = await post(b, "order-1", body)
            b_other_body = await post(b, "order-2", {"prompt": "something else"})
            assert await post(a, "order-1", body) == a_first  # A's key is still A's
            looked = (await fake.stats())["requests_by_kind"]["status"]
            foreign = [
                await b.get(f"/videos/{task_id}", params={"timeout": 5})
                for task_id in (a_first, a_second, a_keyless)
            ]
            assert (await fake.stats())["requests_by_kind"]["status"] == looked
            own = await b.get(f"/videos/{b_same}", params={"timeout": 30})
        restarted = app_process(app_env, port=app.address[1])
        async with restarted as again, again.http() as a, again.http(key=OTHER_KEY) as b:
            a_after = await a.get(f"/videos/{a_first}", params={"timeout": 30})
            b_after = await b.get(f"/videos/{a_first}", params={"timeout": 5})
            a_of_b = await a.get(f"/videos/{b_other_body}", params={"timeout": 5})
            b_own_after = await b.get(f"/videos/{b_other_body}", params={"timeout": 30})
        stats = await fake.stats()
    assert len({a_first, a_second, a_keyless, b_same, b_other_body}) == 5
    assert stats["creates"] == 5
    for answer in foreign:
        assert answer.status_code == 404, answer.text
        assert answer.json()["detail"]["error"] == "unknown_task"
    assert own.status_code == 200, own.text
    assert (a_after.status_code, b_own_after.status_code) == (200, 200)
    assert (b_after.status_code, a_of_b.status_code) == (404, 404)


async def test_the_api_docs_are_off_unless_asked_for() -> None:
    """/docs, /redoc and /openapi.json: 401 without a key and 404 with one by default;
    with SORA_APP_DOCS=1 they are served (200 without a key)."""
    paths = ("/docs", "/redoc", "/openapi.json")
    async with fake_and_app(FAKE_LIMITS + QUICK, env=ENV) as (_, app, app_env):
        async with app.http(key=None) as anonymous, app.http() as http:
            strangers = [(await anonymous.get(path)).status_code for path in paths]
            callers = [(await http.get(path)).status_code for path in paths]
        await app.stop()
        env = app_env | {"SORA_APP_DOCS": "1"}
        documented = app_process(env, port=app.address[1])
        async with documented as again, again.http(key=None) as anonymous:
            served = [await anonymous.get(path) for path in paths]
    assert strangers == [401, 401, 401]
    assert callers == [404, 404, 404]
    assert [answer.status_code for answer in served] == [200, 200, 200]
    assert "/videos" in served[2].json()["paths"]


FILES = 64  # the app's open-file limit in the test at the file limit


def few_files() -> None:
    """Lower this process's open-file limit to FILES (run in the app's process)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))


async def test_idle_connections_past_the_file_limit_do_not_spin_a_core() -> None:
    """With the app's open-file limit at 64 and 100 idle connections held open (the app
    can accept no more), the process sleeps between its retries of ``accept()``: well
    under 0.3 CPU-seconds per second over 4 s (it spun a core: 23 CPU-s in 28 s at
    ``ulimit -n 1024`` with 1,100 connections). Once they close, it serves again."""
    async with fake_and_app(FAKE_LIMITS + QUICK, env=ENV, preexec_fn=few_files) as (_, app, _):
        pid = app.process.pid
        idle = [await asyncio.open_connection(*app.address) for _ in range(FILES + 36)]
        await asyncio.sleep(1.0)  # every descriptor taken: accept() fails from here on
        cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(4.0)
        share = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - wall_before)
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(1.5)  # the accept loop's next retry finds descriptors again
        async with app.http() as http:
            served = await http.get("/status")
    print(f"{share:.3f} CPU-s per s at the file limit")
    assert share < 0.3, app.log[-3000:]
    assert served.status_code == 200, served.text
