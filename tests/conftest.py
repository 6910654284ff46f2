"""Shared fixtures: the fake service on loopback and a client pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import sora_async as sa
from sora_async.testing import FakeApixo, fixed


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
