"""Shared fixtures: the fake service on loopback and a client pointed at it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

import sora_async as sa
from sora_async.testing import FakeApixo, RedisServer, fixed, redis_server_binary


@pytest.fixture
async def fake() -> AsyncIterator[FakeApixo]:
    """A fake service at the real limits; every generation takes 120 s; credit for 300."""
    async with FakeApixo(generation_time=fixed(120.0), balance=900.0) as server:
        yield server


@pytest.fixture
async def client(fake: FakeApixo) -> AsyncIterator[sa.SoraClient]:
    """A client at the real limits, pointed at ``fake``."""
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as opened:
        yield opened


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, for the whole session (no persistence)."""
    if redis_server_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run installs it")
        pytest.skip("redis-server not installed (Debian: apt-get install redis-server)")
    with RedisServer() as server:
        yield server
