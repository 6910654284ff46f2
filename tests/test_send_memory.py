"""The window of sends outlives the process: a client restarted on a SQLite store
counts its predecessor's sends of the last window before its first request."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

import sora_async as sa
from sora_async.testing import FakeApixo

pytestmark = pytest.mark.looptime

LIMITS = sa.Limits(requests=10, period=60.0, concurrent_tasks=10)


def client_on(fake: FakeApixo, path: Path | None) -> sa.SoraClient:
    store = sa.SQLiteStore(path) if path is not None else None
    return sa.SoraClient(api_key=fake.api_key, base_url=fake.url, limits=LIMITS, store=store)


async def test_a_restart_on_the_store_waits_for_the_window_spent_before(tmp_path: Path) -> None:
    """A client spends its 10 requests and closes; the next one on the same store sees
    them in its window and sends its first request only once they left it: 0 x 429.
    Without the store the next client sends at once and earns a 429 (the control)."""
    loop = asyncio.get_running_loop()
    async with FakeApixo(requests=10, period=60.0) as fake:
        async with client_on(fake, tmp_path / "tasks.db") as first:
            started = loop.time()
            for _ in range(10):
                await first.balance()
        async with client_on(fake, tmp_path / "tasks.db") as second:
            assert second.governor.requests_in_window() == 10
            assert second.snapshot().requests_in_window == 10
            await second.balance()
            waited = loop.time() - started
        assert fake.stats.rate_limited == 0
        assert 60.0 <= waited <= 62.0
        async with client_on(fake, tmp_path / "tasks.db") as third:
            for _ in range(10):  # the window the second left: at once
                await third.balance()
        async with client_on(fake, None) as forgetful:
            await forgetful.balance()
        assert fake.stats.rate_limited >= 1


async def test_the_store_keeps_only_the_last_window(tmp_path: Path) -> None:
    """Sends older than the window are forgotten as new ones are written: the table
    holds a few dozen rows however long a client runs."""
    store = sa.SQLiteStore(tmp_path / "tasks.db")
    await store.open()
    now = time.time()
    for second in range(300):  # five minutes of sends, written a second at a time
        at = now - 300 + second
        await store.record_sends("sora-2-pro", [at], forget_before=at - 61)
    await store.record_sends("veo-3-1", [now], forget_before=now - 61)
    recent = await store.recent_sends()
    await store.close()
    assert len(recent["sora-2-pro"]) == 62
    assert recent["sora-2-pro"] == sorted(recent["sora-2-pro"])
    assert recent["veo-3-1"] == [now]
    with sqlite3.connect(tmp_path / "tasks.db") as db:
        (rows,) = db.execute("SELECT count(*) FROM sends").fetchone()
    assert rows == 63
