"""An uncertain create's idempotency key: refused until an operator releases it, then
created again, knowingly."""

from __future__ import annotations

from pathlib import Path

import pytest

import sora_async as sa
from sora_async.testing import FakeApixo

pytestmark = pytest.mark.looptime

PROMPT = sa.TextToVideo(prompt="a lighthouse at dusk", duration=10)


@pytest.mark.parametrize("durable", [False, True])
async def test_an_uncertain_key_is_listed_refused_and_released(
    tmp_path: Path, durable: bool
) -> None:
    """A create reset after the service made its task: the key is listed as uncertain
    and a second submit with it raises SubmitUncertainError without a request. Once
    released, the next submit creates again (a second task: the caller chose to) and
    the key is no longer listed; a key that is not uncertain cannot be released."""
    store = sa.SQLiteStore(tmp_path / "tasks.db") if durable else None
    async with FakeApixo() as fake:
        client = sa.SoraClient(api_key=fake.api_key, base_url=fake.url, store=store)
        async with client:
            fake.inject("reset_after_create", on="create")
            with pytest.raises(sa.SubmitUncertainError):
                await client.submit(PROMPT, idempotency_key="k-1")
            assert await client.uncertain_keys() == ["k-1"]
            requests = fake.stats.requests
            with pytest.raises(sa.SubmitUncertainError, match="release_key"):
                await client.submit(PROMPT, idempotency_key="k-1")
            assert fake.stats.requests == requests
            assert not await client.release_key("unknown")
            assert await client.release_key("k-1")
            assert not await client.release_key("k-1")  # released once
            task_id = await client.submit(PROMPT, idempotency_key="k-1")
            assert await client.submit(PROMPT, idempotency_key="k-1") == task_id
            assert await client.uncertain_keys() == []
            assert not await client.release_key("k-1")  # made: nothing to release
            with pytest.raises(sa.InputError):
                await client.release_key("")
    assert fake.stats.creates_per_prompt[PROMPT.prompt] == 2
