"""One batch, any number of hosts: ``sora-async batch FILE -o OUT --redis-url URL`` run as
real processes on one real redis-server, against the fake service at the real limits
(timings divided by SCALE), whose counters judge."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import sora_async as sa
from sora_async.testing import FakeApixo, RedisServer
from tests.links import cut_link
from tests.workers import scaled_fake, start_worker, until, write_prompts

pytestmark = [pytest.mark.looptime(False), pytest.mark.timeout(150)]


@pytest.fixture
async def service() -> AsyncIterator[FakeApixo]:
    # A key of its own: nothing an earlier test left on the session's Redis (slot
    # records of killed processes, whose task ids a fake of the same seed reuses) is
    # this test's.
    async with scaled_fake(seed=23, api_key=secrets.token_hex(8)) as fake:
        yield fake


def saved_items(folders: list[Path]) -> list[str]:
    """Return the item of every video saved, in every host's folder."""
    return sorted(path.stem for folder in folders for path in folder.glob("*.mp4"))


def manifest_ids(folder: Path, host: str) -> list[str]:
    path = folder / f"manifest-{host}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


async def assert_each_item_once_though_one_host_was_gone(
    service: FakeApixo, hosts: list[asyncio.subprocess.Process], outs: list[Path], count: int
) -> None:
    """Wait for both hosts, the first of which was gone from Redis past its lease for a
    while: every item created at most once and saved, inside the key's limits."""
    results = [await host.communicate() for host in hosts]
    logs = "\n".join((out + err).decode(errors="replace") for out, err in results)
    stats = service.stats
    # A create on the wire when the host went may time out when it is back: its item
    # is then uncertain (never created again), as in a single host's batch.
    rows = [json.loads(line) for line in (outs[1] / "manifest.jsonl").read_text().splitlines()]
    uncertain = {row["id"] for row in rows if row["state"] == "uncertain"}
    # A host exits 1 when an item it took ends uncertain, else 0.
    codes = [host.returncode for host in hosts]
    expected_codes = {0, 1} if uncertain else {0}
    assert set(codes) <= expected_codes, logs
    assert (1 in codes) == bool(uncertain), logs
    assert len(uncertain) <= 1
    assert stats.rate_limited == 0, logs
    assert stats.max_requests_in_window <= 60
    assert set(stats.creates_per_prompt.values()) == {1}
    assert len(stats.creates_per_prompt) >= count - len(uncertain)
    expected = {f"item-{i:03d}" for i in range(count)}
    assert set(saved_items(outs)) | uncertain == expected


async def test_hosts_pull_one_batch_a_killed_one_is_covered_and_a_late_one_joins(
    service: FakeApixo, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Three hosts on one batch of 60 prompts, each into its own folder; one is killed
    with SIGKILL mid-run and never restarted; a fourth starts halfway. Every prompt is
    created exactly once and saved (the killed host's running tasks by the others),
    inside the key's limits, and the late host takes items at once."""
    prompts = write_prompts(tmp_path, 60)
    outs = [tmp_path / f"out-{n}" for n in range(4)]
    hosts = [
        await start_worker(
            service, redis_server.url, prompts, outs[n], None, "--host", f"h{n}", "--batch", "kill"
        )
        for n in range(3)
    ]
    await until(lambda: service.stats.creates >= 15)
    hosts[0].send_signal(signal.SIGKILL)
    await until(lambda: service.stats.creates >= 30)
    late = await start_worker(
        service, redis_server.url, prompts, outs[3], None, "--host", "h3", "--batch", "kill"
    )
    results = [await host.communicate() for host in (*hosts[1:], late)]
    logs = "\n".join((out + err).decode(errors="replace") for out, err in results)
    print(logs)  # shown when the test fails
    codes = [process.returncode for process in (*hosts, late)]
    stats = service.stats
    # The kill comes just after a create reached the service: when that create's answer
    # had not reached the killed host yet, nobody can name its task, and the host that
    # takes the item over reports it uncertain (never created again) and exits 1.
    rows = [json.loads(line) for line in (outs[1] / "manifest.jsonl").read_text().splitlines()]
    uncertain = {row["id"] for row in rows if row["state"] == "uncertain"}
    assert len(uncertain) <= 1, logs
    assert codes[0] == -signal.SIGKILL
    assert sorted(codes[1:]) == ([0, 0, 0] if not uncertain else [0, 0, 1]), logs
    assert stats.rate_limited == 0, (stats.rate_limited_by_kind, logs)
    assert stats.max_requests_in_window <= 60
    assert stats.max_concurrent_tasks <= 10
    assert len(stats.creates_per_prompt) == 60
    assert set(stats.creates_per_prompt.values()) == {1}
    saved = saved_items(outs)
    assert set(saved) | uncertain == {f"item-{i:03d}" for i in range(60)}
    # The live hosts' manifests name what they saved; the late host took its share.
    assert manifest_ids(outs[3], "h3")
    listed = [i for n in (1, 2, 3) for i in manifest_ids(outs[n], f"h{n}")]
    assert len(listed) == len(set(listed))
    assert set(listed) | {path.stem for path in outs[0].glob("*.mp4")} == set(saved) | uncertain
    # Each live host writes the whole batch's manifest, in file order, naming who saved
    # what; so does `sora-async manifest` from Redis alone.
    report = json.loads(results[0][0].decode().strip().splitlines()[-1])
    command = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sora_async", "manifest", "--redis-url", redis_server.url),
        *("--batch", report["batch"], "-o", str(tmp_path / "all.jsonl"), "--json"),
        stdout=asyncio.subprocess.PIPE,
    )
    printed, _ = await command.communicate()
    assert json.loads(printed)["items"] == 60
    for path in (outs[1] / "manifest.jsonl", tmp_path / "all.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [row["id"] for row in rows] == [f"item-{i:03d}" for i in range(60)]
        assert {row["id"] for row in rows if row["state"] != "downloaded"} == uncertain
        assert {row["host"] for row in rows} <= {"h0", "h1", "h2", "h3"}
        for row in rows:
            if row["state"] == "downloaded":
                assert Path(row["files"][0]).parent == outs[int(row["host"][1])]
    governor = sa.RedisGovernor(redis_server.url, api_key=service.api_key)
    connection = aioredis.from_url(redis_server.url)
    try:
        # An uncertain create's slot stays held for uncertain_hold: its task may run.
        assert await connection.hlen(f"{governor.prefix}:slots") <= len(uncertain)
    finally:
        await connection.aclose()


async def test_a_host_cut_from_redis_past_its_lease_loses_its_items_and_creates_nothing_twice(
    service: FakeApixo, redis_server: RedisServer, tmp_path: Path
) -> None:
    """One host reaches Redis through a link that is cut (every connection reset, new
    ones refused) for two leases while it holds items; the service stays reachable.
    The other host takes its items meanwhile; when the link comes back the cut host
    creates none of them again. Both finish; every prompt once."""
    prompts = write_prompts(tmp_path, 30)
    outs = [tmp_path / f"out-{n}" for n in range(2)]
    async with cut_link(("127.0.0.1", redis_server.port)) as link:
        linked_url = f"redis://127.0.0.1:{link.port}/0"
        hosts = [
            # A batch of its own: the file is the paused test's, whose batch is done.
            await start_worker(
                service, url, prompts, out, None, "--host", f"c{n}", "--batch", "cut"
            )
            for n, (url, out) in enumerate(zip((linked_url, redis_server.url), outs, strict=True))
        ]
        await until(lambda: service.stats.creates >= 8)
        link.cut()
        before = service.stats.creates
        await asyncio.sleep(2 * 3.0)  # two leases (the workers' lease: 3 s at this scale)
        await until(lambda: service.stats.creates >= before + 6)  # the other host goes on
        link.restore()
        await assert_each_item_once_though_one_host_was_gone(service, hosts, outs, 30)
