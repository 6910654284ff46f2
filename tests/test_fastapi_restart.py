"""examples/fastapi_app.py stopped at its edges, as an operator stops it: SIGKILL and
SIGTERM while creates wait for a request permit or are on the wire, then a restart on
the same SQLite store. Real uvicorn, the fake service in its own process, at
time-compressed limits; the fake's counters judge (429s, creates per prompt).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import APP_KEY, AppProcess, FakeProcess, app_process, fake_and_app

# 10 requests in any 8 s and 20 slots: 10 creates fill the window, and 10 more wait
# for a request permit (never for a slot) for about 9 s.
WINDOW = 10
FAKE_LIMITS = ("--requests", str(WINDOW), "--period", "8", "--concurrent-tasks", "20")
RUNNING = ("--generation", "fixed:60", "--pending-time", "0.1", "--balance", "1e6")
ENV = {"APIXO_LIMITS": f"{WINDOW}/8/20"}

OTHER_KEY = "other-tenant-" + "c" * 24  # a second app key: another tenant


async def fill_window(app: AppProcess, fake: FakeProcess) -> None:
    """Spend the app's whole window on creates of tasks that run on (no key)."""
    async with app.http() as http:
        posts = [http.post("/videos", json={"prompt": f"filler {n}"}) for n in range(WINDOW)]
        assert [answer.status_code for answer in await asyncio.gather(*posts)] == [200] * WINDOW
    assert (await fake.stats())["requests"] == WINDOW


def keyed_post(http: httpx.AsyncClient, n: int, **options: Any) -> Any:
    """POST prompt ``keyed n`` with Idempotency-Key ``keyed-n``."""
    headers = {"Idempotency-Key": f"keyed-{n}"}
    return http.post("/videos", json={"prompt": f"keyed {n}"}, headers=headers, **options)


async def test_kill9_while_creates_wait_for_a_permit_then_restart(tmp_path: Path) -> None:
    """SIGKILL with the window spent and 10 keyed POSTs waiting for a permit, then a
    restart on the same store: the restarted app remembers the last window's sends
    (``/status`` shows them) and waits for it, so the service sees 0 x 429; each key
    retried answers 200 and is created exactly once."""
    env = ENV | {"SORA_ASYNC_STORE": str(tmp_path / "tasks.db")}
    async with fake_and_app(FAKE_LIMITS + RUNNING, env=env) as (fake, app, app_env):
        await fill_window(app, fake)
        async with app.http() as http:
            waiting = [asyncio.ensure_future(keyed_post(http, n)) for n in range(10)]
            await asyncio.sleep(1.0)
            assert not any(post.done() for post in waiting)
            await app.stop(signal.SIGKILL)
            await asyncio.gather(*waiting, return_exceptions=True)
        assert (await fake.stats())["creates"] == WINDOW  # none of the 10 was sent
        async with app_process(app_env, port=app.address[1]) as again, again.http() as http:
            status = (await http.get("/status")).json()
            remembered = status["requests_in_window"]
            started = asyncio.get_running_loop().time()
            answers = await asyncio.gather(*(keyed_post(http, n) for n in range(10)))
            took = asyncio.get_running_loop().time() - started
            repeated = await keyed_post(http, 3)
        stats = await fake.stats()
    print(f"restart: {remembered} sends remembered, 10 keyed creates after {took:.1f} s")
    assert [answer.status_code for answer in answers] == [200] * 10, [a.text for a in answers]
    assert repeated.json() == answers[3].json()
    assert remembered == WINDOW
    # The 10 tasks running hold slots; the 10 creates never sent hold none.
    assert (status["slots_in_use"], status["uncertain_keys"]) == (WINDOW, [])
    assert stats["rate_limited"] == 0
    assert stats["creates"] == WINDOW + 10
    assert max(stats["creates_per_prompt"].values()) == 1


async def test_kill9_with_creates_on_the_wire_then_release(tmp_path: Path) -> None:
    """SIGKILL while 2 keyed creates reached the service (it answers them 3 s late and
    makes their tasks then). After a restart on the store, each key answers 409
    ``uncertain`` naming the key and the way out, and costs no create; ``/status``
    lists both keys. ``POST /videos/release`` with one key lets the next POST with it
    create again (a second task, knowingly); the other still answers 409. Another
    tenant (app key) sees none of these keys and cannot release them."""
    slow = ("--fault", "slow:create:2:3", "--requests", "600", "--period", "6")
    env = {
        "APIXO_LIMITS": "600/6/10",
        "SORA_ASYNC_STORE": str(tmp_path / "tasks.db"),
        "SORA_APP_API_KEYS": f"{APP_KEY},{OTHER_KEY}",
    }
    async with fake_and_app(slow + RUNNING, env=env) as (fake, app, app_env):
        async with app.http() as http:
            sent = [asyncio.ensure_future(keyed_post(http, n)) for n in range(2)]
            for _ in range(100):
                if (await fake.stats())["requests_by_kind"].get("create") == 2:
                    break
                await asyncio.sleep(0.05)
            await app.stop(signal.SIGKILL)
            await asyncio.gather(*sent, return_exceptions=True)
        await asyncio.sleep(3.5)  # the service makes both tasks: paid for, never named
        assert (await fake.stats())["creates"] == 2
        async with (
            app_process(app_env, port=app.address[1]) as again,
            again.http() as http,
            again.http(key=OTHER_KEY) as other,
        ):
            others_listed = (await other.get("/status")).json()["uncertain_keys"]
            others_release = await other.post(
                "/videos/release", headers={"Idempotency-Key": "keyed-0"}
            )
            refused = await keyed_post(http, 0)
            listed = (await http.get("/status")).json()["uncertain_keys"]
            anyone = await http.post("/videos/release", headers={"Idempotency-Key": "nobody"})
            released = await http.post("/videos/release", headers={"Idempotency-Key": "keyed-0"})
            created = await keyed_post(http, 0)
            still = await keyed_post(http, 1)
            listed_after = (await http.get("/status")).json()["uncertain_keys"]
        stats = await fake.stats()
    assert refused.status_code == 409, refused.text
    detail = refused.json()["detail"]
    assert (detail["error"], detail["idempotency_key"]) == ("uncertain", "keyed-0")
    assert "POST /videos/release" in detail["message"]
    assert sorted(listed) == ["keyed-0", "keyed-1"]
    assert others_listed == []
    assert others_release.status_code == 404, others_release.text
    assert anyone.status_code == 404, anyone.text
    assert released.status_code == 200, released.text
    assert created.status_code == 200, created.text
    assert still.status_code == 409, still.text
    assert listed_after == ["keyed-1"]
    assert stats["creates_per_prompt"] == {"keyed 0": 2, "keyed 1": 1}
    assert stats["rate_limited"] == 0


@pytest.mark.parametrize("options", [(), ("--timeout-graceful-shutdown", "10")])
async def test_sigterm_while_creates_wait_for_a_permit(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    """SIGTERM (with and without --timeout-graceful-shutdown) with the window spent and
    4 keyed POSTs waiting for a permit: each answers 503 with Retry-After at once, the
    process exits within a second, nothing was sent for them; a restart on the store
    creates each key once when retried, with 0 x 429."""
    env = ENV | {"SORA_ASYNC_STORE": str(tmp_path / "tasks.db")}
    async with fake_and_app(FAKE_LIMITS + RUNNING, *options, env=env) as (fake, app, app_env):
        await fill_window(app, fake)
        async with app.http() as http:
            waiting = [asyncio.ensure_future(keyed_post(http, n)) for n in range(4)]
            await asyncio.sleep(1.0)
            assert not any(post.done() for post in waiting)
            exited_after = await app.stop(signal.SIGTERM)
            refused = await asyncio.gather(*waiting)
        assert (await fake.stats())["creates"] == WINDOW
        async with app_process(app_env, port=app.address[1]) as again, again.http() as http:
            answers = await asyncio.gather(*(keyed_post(http, n) for n in range(4)))
        stats = await fake.stats()
    print(f"exit {exited_after:.2f} s after SIGTERM with 4 creates waiting for a permit")
    for answer in refused:
        assert answer.status_code == 503, answer.text
        assert answer.json()["detail"]["error"] == "shutting_down"
        assert int(answer.headers["Retry-After"]) > 0
    assert "Traceback" not in app.log, app.log
    assert exited_after < 1.0, app.log
    assert [answer.status_code for answer in answers] == [200] * 4, [a.text for a in answers]
    assert stats["rate_limited"] == 0
    assert stats["creates"] == WINDOW + 4
    assert max(stats["creates_per_prompt"].values()) == 1
