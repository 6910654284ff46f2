"""The fake APIXO service, exercised with raw aiohttp requests (not the client library)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sora_async.testing import FakeApixo, fixed, heavy_tailed, lognormal, uniform
from sora_async.testing._serve import parse_generation

KEY = "test-key"
EPOCH = 1767965610929
SORA = "sora-2-pro"


@dataclass
class Reply:
    """One HTTP answer: status, headers, raw body and the decoded JSON (None if not JSON)."""

    status: int
    headers: Mapping[str, str]
    raw: bytes
    body: Any


class Api:
    """Raw requests to a fake, as a client library would send them."""

    def __init__(self, fake: FakeApixo, http: aiohttp.ClientSession) -> None:
        self.fake, self.http = fake, http

    async def call(self, method: str, url: str, **kwargs: Any) -> Reply:
        async with self.http.request(method, url, **kwargs) as response:
            raw = await response.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            return Reply(response.status, dict(response.headers), raw, body)

    async def create(self, prompt: str = "a cat", model: str = SORA, **fields: Any) -> Reply:
        payload: dict[str, Any] = {"mode": "text-to-video", "prompt": prompt, "duration": 10}
        payload.update(fields)
        body = {"request_type": "async", "input": payload}
        return await self.call("POST", f"{self.fake.url}/generateTask/{model}", json=body)

    async def status(self, task_id: str, model: str = SORA) -> Reply:
        url = f"{self.fake.url}/statusTask/{model}"
        return await self.call("GET", url, params={"taskId": task_id})

    async def balance(self) -> Reply:
        return await self.call("GET", f"{self.fake.url}/apikeys/current-balance")

    async def new_task(self, prompt: str = "a cat") -> str:
        reply = await self.create(prompt)
        assert reply.status == 200, reply.body
        task_id: str = reply.body["data"]["taskId"]
        return task_id


@contextlib.asynccontextmanager
async def running(**knobs: Any) -> AsyncIterator[tuple[FakeApixo, Api]]:
    """Start a fake in the test's loop and a session that speaks to it with the key."""
    async with (
        FakeApixo(**knobs) as fake,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http,
    ):
        yield fake, Api(fake, http)


def walk_boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """Split ``data[start:end]`` into (type, offset, size) MP4 boxes; fail on a bad size."""
    end = len(data) if end is None else end
    boxes, at = [], start
    while at < end:
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        assert 8 <= size <= end - at, (kind, size)
        boxes.append((kind, at, size))
        at += size
    assert at == end
    return boxes


# -- shapes --------------------------------------------------------------------------


@pytest.mark.looptime
async def test_task_life_cycle_matches_the_seed_shapes() -> None:
    """create answers a taskId; status is pending, then processing, then success as in the seed."""
    async with running(generation_time=fixed(100.0), pending_time=2.0) as (fake, api):
        await asyncio.sleep(5.0)
        created = await api.create("a red kite")
        assert created.status == 200
        assert created.body["code"] == 200
        assert created.body["message"] == "success"
        task_id = created.body["data"]["taskId"]
        assert task_id.startswith("task_")
        assert list(created.body["data"]) == ["taskId"]

        pending = (await api.status(task_id)).body
        assert pending == {
            "code": 200,
            "message": "success",
            "data": {"taskId": task_id, "state": "pending", "createTime": EPOCH + 5000},
        }
        await asyncio.sleep(50.0)
        processing = (await api.status(task_id)).body["data"]
        assert processing["state"] == "processing"
        assert processing["progress"] == 50  # the field the docs do not list
        await asyncio.sleep(50.0)
        done = (await api.status(task_id)).body["data"]
        assert set(done) == {
            "taskId",
            "state",
            "resultJson",
            "createTime",
            "completeTime",
            "costTime",
        }
        assert done["state"] == "success"
        assert isinstance(done["resultJson"], str)
        assert json.loads(done["resultJson"]) == {
            "resultUrls": [f"{fake.origin}/files/{task_id}.mp4"]
        }
        assert done["completeTime"] == EPOCH + 105_000
        assert done["costTime"] == 100_000
        record = fake.tasks[task_id]
        assert record.prompt == "a red kite"
        assert record.state == "success"
        assert record.polls == 3
        assert record.first_seen_done_at == pytest.approx(105.0)


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("knobs", "prompt", "code"),
    [
        ({}, "sad [fail:SensitiveContent] cat", "SensitiveContent"),
        ({"failure_rate": 1.0, "fail_code": "MODEL_UNAVAILABLE"}, "a cat", "MODEL_UNAVAILABLE"),
    ],
)
async def test_failed_task_has_the_seed_failed_shape(
    knobs: dict[str, Any], prompt: str, code: str
) -> None:
    """A [fail:CODE] prompt or the failure rate ends the task failed with that failCode."""
    async with running(generation_time=fixed(30.0), **knobs) as (fake, api):
        task_id = await api.new_task(prompt)
        await asyncio.sleep(31.0)
        data = (await api.status(task_id)).body["data"]
        assert set(data) == {"taskId", "state", "failCode", "failMsg", "createTime", "completeTime"}
        assert (data["state"], data["failCode"]) == ("failed", code)
        assert isinstance(data["failMsg"], str)
        assert data["failMsg"]
        assert fake.tasks[task_id].final_state == "failed"


@pytest.mark.looptime
async def test_finish_ends_a_task_now() -> None:
    """finish() ends a running task at once, as success or failed with a given code."""
    async with running(generation_time=fixed(500.0)) as (fake, api):
        first, second = await api.new_task("one"), await api.new_task("two")
        await asyncio.sleep(10.0)
        fake.finish(first)
        fake.finish(second, "failed", fail_code="PROCESSING_TIMEOUT")
        assert fake.unfinished_tasks() == 0
        assert (await api.status(first)).body["data"]["costTime"] == 10_000
        assert (await api.status(second)).body["data"]["failCode"] == "PROCESSING_TIMEOUT"
        with pytest.raises(ValueError, match="already"):
            fake.finish(first)


# -- auth, validation, not found ----------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}])
async def test_wrong_or_missing_key_is_401_and_not_counted(headers: dict[str, str]) -> None:
    """Without the right Bearer key every API call is 401, counted only as unauthorized."""
    async with running() as (fake, api), aiohttp.ClientSession(headers=headers) as anon:
        api.http = anon
        for reply in (await api.create(), await api.status("task_1"), await api.balance()):
            assert reply.status == 401
            assert reply.body == {
                "code": 401,
                "message": "Invalid or missing API key",
                "data": None,
            }
        assert fake.stats.unauthorized == 3
        assert fake.stats.requests == 0
        assert fake.stats.creates == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": {"mode": "text-to-video", "duration": 10}}, "input.prompt"),
        ({"input": {"prompt": ""}}, "input.prompt"),
        ({"input": {"prompt": "x" * 5001}}, "input.prompt"),
        ({"request_type": "sync", "input": {"prompt": "a"}}, "request_type"),
        ({"request_type": "callback", "input": {"prompt": "a"}}, "callback_url"),
        ({"provider": "cheap", "input": {"prompt": "a"}}, "provider"),
        ({"input": {"prompt": "a", "mode": "video-to-video"}}, "input.mode"),
        ({"input": {"prompt": "a", "size": "640*480"}}, "input.size"),
        ({"input": {"prompt": "a", "duration": 7}}, "input.duration"),
        ({"input": {"prompt": "a", "duration": "10"}}, "input.duration"),
        ({"input": {"prompt": "a", "mode": "image-to-video"}}, "input.image_urls"),
        ({"input": {"prompt": "a", "mode": "image-to-video", "image_urls": []}}, "image_urls"),
        (
            {
                "input": {
                    "prompt": "a",
                    "mode": "image-to-video",
                    "image_urls": ["https://x/a.png"],
                    "resolution": "4k",
                }
            },
            "input.resolution",
        ),
        ({"input": "a cat"}, "input"),
        ([1, 2], "JSON object"),
    ],
)
async def test_invalid_create_is_400_naming_the_field(body: Any, field: str) -> None:
    """Each rule of the create body answers 400 with data.error naming the field; no task."""
    async with running() as (fake, api):
        reply = await api.call("POST", f"{fake.url}/generateTask/{SORA}", json=body)
        assert reply.status == 400
        assert reply.body["code"] == 400
        assert field in reply.body["data"]["error"]
        assert fake.stats.creates == 0
        assert fake.balance == 100.0


async def test_missing_prompt_error_is_worded_as_documented() -> None:
    """A body without input.prompt gets exactly the documented data.error; bad JSON is 400."""
    async with running() as (fake, api):
        reply = await api.call("POST", f"{fake.url}/generateTask/{SORA}", json={"input": {}})
        assert reply.body["data"] == {"error": "Missing required field: input.prompt"}
        broken = await api.call("POST", f"{fake.url}/generateTask/{SORA}", data=b"{nope")
        assert broken.status == 400


async def test_unknown_task_model_or_path_is_404() -> None:
    """Unknown task ids, models and API paths are 404 envelopes; a missing taskId is 400."""
    async with running() as (fake, api):
        task_id = await api.new_task()
        assert (await api.status("task_unknown")).body == {
            "code": 404,
            "message": "Task not found",
            "data": None,
        }
        assert (await api.status(task_id, model="veo-3-1")).status == 404
        assert (await api.create(model="sora-9")).status == 404
        assert (await api.status(task_id, model="sora-9")).status == 404
        missing = await api.call("GET", f"{fake.url}/statusTask/{SORA}")
        assert missing.status == 400
        assert "taskId" in missing.body["data"]["error"]
        nowhere = await api.call("GET", f"{fake.url}/nowhere")
        assert nowhere.status == 404
        assert nowhere.body["code"] == 404


async def test_other_models_share_the_endpoints() -> None:
    """Models without typed rules in the fake accept any input with a prompt."""
    async with running() as (fake, api):
        reply = await api.create("a dog", model="kling-2-6", size="16:9", duration=6)
        assert reply.status == 200
        assert fake.tasks[reply.body["data"]["taskId"]].model == "kling-2-6"


async def test_violating_prompt_is_refused_at_create() -> None:
    """A [violate] prompt gets 400 with the policy message, no task and no charge."""
    async with running() as (fake, api):
        reply = await api.create("a [violate] scene")
        assert (reply.status, reply.body["data"]) == (400, None)
        assert reply.body["message"] == "Content violates provider policy, please adjust the prompt"
        assert fake.stats.creates == 0
        assert fake.balance == 100.0


# -- rate window ------------------------------------------------------------------------


@pytest.mark.looptime
async def test_sixty_admitted_then_429_until_the_window_slides() -> None:
    """The 61st request in a trailing 60 s window is 429; once the window slides, admitted."""
    async with running() as (fake, api):
        for _ in range(60):
            assert (await api.balance()).status == 200
        refused = await api.status("task_x")
        assert refused.status == 429
        assert refused.body == {"code": 429, "message": "Rate limit exceeded", "data": None}
        assert "Retry-After" not in refused.headers
        await asyncio.sleep(59.9)
        assert (await api.balance()).status == 429
        await asyncio.sleep(0.2)
        assert (await api.balance()).status == 200
        stats = fake.stats
        assert stats.requests == 63
        assert stats.rate_limited == 2
        assert stats.rate_limited_by_kind == {"create": 0, "status": 1, "balance": 1}
        assert stats.requests_by_kind == {"create": 0, "status": 1, "balance": 62}
        assert stats.max_requests_in_window == 60


@pytest.mark.looptime
async def test_max_requests_in_window_is_the_trailing_maximum() -> None:
    """max_requests_in_window is the most admitted requests seen in any trailing window."""
    async with running(requests=100) as (fake, api):
        for _ in range(30):
            await api.balance()
        await asyncio.sleep(45.0)
        for _ in range(25):
            await api.balance()
        assert fake.stats.max_requests_in_window == 55
        await asyncio.sleep(16.0)  # the first 30 have left the window
        for _ in range(20):
            await api.balance()
        assert fake.stats.max_requests_in_window == 55
        for _ in range(11):
            await api.balance()
        assert fake.stats.max_requests_in_window == 56


@pytest.mark.looptime
@pytest.mark.parametrize("limits_per", ["model", "key"])
async def test_limits_per_model_or_for_the_key_as_a_whole(limits_per: str) -> None:
    """limits_per="model" gives each model its own window and slots; "key" counts every
    model in one window and one task count. Either way the fake counts the requests of
    all models together in max_requests_in_window_all_models."""
    async with running(requests=10, concurrent_tasks=3, limits_per=limits_per) as (fake, api):
        for i in range(3):
            assert (await api.create(f"sora {i}")).status == 200
        kling = await api.create("kling 0", model="kling-2-6")
        for _ in range(6):
            await api.status("task_x", model="kling-2-6")  # 404s, counted in the window
        window = await api.status("task_x", model="kling-2-6")
        stats = fake.stats
        if limits_per == "model":
            assert (kling.status, window.status) == (200, 404)
            assert stats.max_requests_in_window_by_model == {"sora-2-pro": 3, "kling-2-6": 8}
            assert stats.max_requests_in_window == 8
            assert stats.max_concurrent_tasks == 4
            assert stats.max_requests_in_window_all_models == 11
        else:
            assert kling.status == 429  # the key's 3 tasks are held by sora-2-pro's
            assert kling.body["message"] == "Concurrent task limit exceeded"
            assert window.status == 429  # the 11th request of the key's window
            assert stats.max_requests_in_window == 10
            assert stats.max_concurrent_tasks == 3
            assert stats.max_requests_in_window_all_models == 10


@pytest.mark.looptime
async def test_retry_after_knob_sets_the_header() -> None:
    """With retry_after set, 429 answers carry a Retry-After header in seconds."""
    async with running(requests=1, retry_after=2.5) as (_, api):
        await api.balance()
        refused = await api.balance()
        assert (refused.status, refused.headers["Retry-After"]) == (429, "2.5")


# -- task slots --------------------------------------------------------------------------


@pytest.mark.looptime
async def test_eleventh_unfinished_task_is_429_until_one_finishes() -> None:
    """Ten unfinished tasks fill the key; the 11th create is 429, a finished task frees a slot."""
    async with running(generation_time=uniform(100.0, 200.0), seed=3) as (fake, api):
        ids = [await api.new_task(f"p{i}") for i in range(10)]
        refused = await api.create("p10")
        assert refused.status == 429
        assert refused.body["message"] == "Concurrent task limit exceeded"
        assert fake.stats.concurrency_limited == 1
        assert fake.stats.creates == 10
        first_end = min(fake.tasks[t].complete_at for t in ids)
        await asyncio.sleep(first_end - fake.now() - 0.5)
        assert fake.unfinished_tasks() == 10
        assert (await api.create("p10")).status == 429
        await asyncio.sleep(1.0)
        assert fake.unfinished_tasks() == 9
        assert (await api.create("p10")).status == 200
        assert fake.stats.max_concurrent_tasks == 10
        assert fake.stats.creates_per_prompt["p10"] == 1


@pytest.mark.looptime
async def test_max_concurrent_tasks_sees_tasks_finish_on_the_clock() -> None:
    """Tasks that ended before later creates do not add up in max_concurrent_tasks."""
    async with running(generation_time=fixed(100.0)) as (fake, api):
        for i in range(5):
            await api.new_task(f"a{i}")
        await asyncio.sleep(150.0)
        for i in range(4):
            await api.new_task(f"b{i}")
        assert fake.stats.max_concurrent_tasks == 5
        assert fake.unfinished_tasks() == 4


@pytest.mark.looptime
async def test_neighbour_takes_slots_and_window_share() -> None:
    """A neighbour's phantom tasks and requests count for the limits, not in our counters."""
    async with running(generation_time=fixed(1000.0)) as (fake, api):
        fake.add_neighbour(requests_per_minute=60, tasks=4)
        statuses = [(await api.create(f"n{i}")).status for i in range(7)]
        assert statuses == [200] * 6 + [429]
        await asyncio.sleep(30.0)  # phantoms at 0, 1, ..., 30 s: 31 in the window
        replies = [(await api.balance()).status for _ in range(30)]
        assert replies.count(200) == 60 - 31 - 7
        fake.remove_neighbours()
        replies = [(await api.balance()).status for _ in range(40)]
        assert replies.count(200) == 60 - 29
        assert fake.stats.requests == 77
        assert fake.stats.max_requests_in_window == 60
        assert fake.unfinished_tasks() == 6
        assert (await api.create("n7")).status == 429


# -- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_error_fault_does_no_work(status: int) -> None:
    """server_error answers HTTP status with the same envelope code and makes no task."""
    async with running() as (fake, api):
        fake.inject("server_error", on="create", status=status, retry_after=1.0)
        reply = await api.create()
        assert (reply.status, reply.body["code"], reply.body["data"]) == (status, status, None)
        assert reply.headers["Retry-After"] == "1"
        assert fake.stats.creates == 0
        assert fake.stats.requests == 1
        assert fake.stats.faults["server_error"] == 1
        assert (await api.create()).status == 200  # used up


async def test_reset_fault_drops_the_connection_without_work() -> None:
    """reset closes the connection before answering: a connection error and no task."""
    async with running() as (fake, api):
        fake.inject("reset", on="create")
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.create()
        assert fake.stats.creates == 0
        assert fake.stats.requests == 1
        assert (await api.balance()).status == 200


async def test_reset_after_create_makes_the_task_but_no_answer() -> None:
    """reset_after_create makes and counts the task, then drops the connection unanswered."""
    async with running() as (fake, api):
        fake.inject("reset_after_create", on="create")
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.create("paid once")
        assert fake.stats.creates == 1
        assert fake.unfinished_tasks() == 1
        assert fake.stats.creates_per_prompt["paid once"] == 1
        assert fake.balance == pytest.approx(97.0)


@pytest.mark.looptime
async def test_slow_fault_answers_after_the_delay() -> None:
    """slow waits delay seconds of loop time, then answers normally."""
    async with running() as (fake, api):
        fake.inject("slow", on="create", delay=30.0)
        started = fake.now()
        reply = await api.create()
        assert reply.status == 200
        assert fake.now() - started == pytest.approx(30.0, abs=0.1)
        assert fake.tasks[reply.body["data"]["taskId"]].created_at == pytest.approx(30.0, abs=0.1)


async def test_broken_json_fault_is_200_with_an_undecodable_body() -> None:
    """broken_json answers HTTP 200 with a truncated, non-JSON body."""
    async with running() as (fake, api):
        fake.inject("broken_json", on="status")
        reply = await api.status("task_x")
        assert reply.status == 200
        assert reply.body is None
        assert reply.raw.startswith(b"{")


@pytest.mark.parametrize("status", [400, 500])
async def test_error_in_200_fault_carries_the_code_in_the_body(status: int) -> None:
    """error_in_200 answers HTTP 200 whose envelope code is the error; no task."""
    async with running() as (fake, api):
        fake.inject("error_in_200", on="create", status=status)
        reply = await api.create()
        assert reply.status == 200
        assert reply.body["code"] == status
        assert fake.stats.creates == 0


async def test_rate_limit_fault_is_429_whatever_the_limits() -> None:
    """rate_limit answers 429 (with Retry-After if asked) and is counted as rate limited."""
    async with running() as (fake, api):
        fake.inject("rate_limit", on="balance", times=2, retry_after=7)
        first, second, third = [await api.balance() for _ in range(3)]
        assert (first.status, first.headers["Retry-After"]) == (429, "7")
        assert (second.status, third.status) == (429, 200)
        assert fake.stats.rate_limited == 2
        assert fake.stats.faults["rate_limit"] == 2


async def test_faults_hit_only_matching_requests_in_order() -> None:
    """A fault waits for a request of its kind; faults queued for one kind go in order."""
    async with running() as (fake, api):
        fake.inject("server_error", on="status", status=500)
        fake.inject("error_in_200", on="status", status=400)
        fake.inject("server_error", on="any", status=502)
        assert (await api.balance()).status == 502  # "any" matched the first API call
        assert (await api.status("task_x")).status == 500
        assert (await api.status("task_x")).body["code"] == 400
        assert (await api.status("task_x")).status == 404
        assert fake.pending_faults() == []


# -- files -------------------------------------------------------------------------------


@pytest.mark.looptime
async def test_result_file_is_a_valid_mp4_with_range_support() -> None:
    """The result URL serves a small MP4 (ftyp, moov, mdat) and honours Range requests."""
    async with running(generation_time=fixed(60.0), requests=3) as (fake, api):
        task_id = await api.new_task()
        url = f"{fake.origin}/files/{task_id}.mp4"
        assert (await api.call("GET", url)).status == 404  # not done yet
        await asyncio.sleep(61.0)
        anon = aiohttp.ClientSession()  # files need no key
        async with anon:
            full = await Api(fake, anon).call("GET", url)
            assert full.status == 200
            assert full.headers["Content-Type"] == "video/mp4"
            assert full.headers["Accept-Ranges"] == "bytes"
            assert int(full.headers["Content-Length"]) == len(full.raw) > 1000
            assert full.raw[4:8] == b"ftyp"
            boxes = walk_boxes(full.raw)
            assert [kind for kind, _, _ in boxes] == [b"ftyp", b"moov", b"mdat"]
            _, moov_at, moov_size = boxes[1]
            assert [k for k, _, _ in walk_boxes(full.raw, moov_at + 8, moov_at + moov_size)] == [
                b"mvhd",
                b"trak",
            ]
            stco = full.raw.index(b"stco")
            (offset,) = struct.unpack(">I", full.raw[stco + 12 : stco + 16])
            assert offset == boxes[2][1] + 8  # the first sample is mdat's first byte
            tail = await Api(fake, anon).call("GET", url, headers={"Range": "bytes=100-"})
            assert tail.status == 206
            assert tail.raw == full.raw[100:]
            assert tail.headers["Content-Range"] == f"bytes 100-{len(full.raw) - 1}/{len(full.raw)}"
            span = await Api(fake, anon).call("GET", url, headers={"Range": "bytes=10-19"})
            assert span.raw == full.raw[10:20]
            assert span.headers["Content-Length"] == "10"
            past = await Api(fake, anon).call("GET", url, headers={"Range": "bytes=99999-"})
            assert past.status == 416
            again = await Api(fake, anon).call("GET", url)
            assert again.raw == full.raw  # deterministic per task
            assert (await Api(fake, anon).call("GET", f"{fake.origin}/files/x.mp4")).status == 404
        assert fake.stats.downloads == 7
        assert fake.stats.requests == 1


@pytest.mark.looptime
async def test_file_faults_cut_or_refuse_downloads() -> None:
    """File faults: broken_json cuts the body short, server_error answers 5xx."""
    async with running(generation_time=fixed(1.0)) as (fake, api):
        task_id = await api.new_task()
        await asyncio.sleep(2.0)
        url = f"{fake.origin}/files/{task_id}.mp4"
        fake.inject("broken_json", on="file")
        with pytest.raises(aiohttp.ClientPayloadError):
            await api.call("GET", url)
        fake.inject("server_error", on="file", status=503)
        assert (await api.call("GET", url)).status == 503
        assert (await api.call("GET", url)).status == 200


# -- money, prompts, clock -----------------------------------------------------------------


async def test_balance_falls_per_create_until_insufficient_credits() -> None:
    """Each create costs price x seconds (12 s with official); then 'Insufficient credits'."""
    async with running(balance=10.0, price_per_second=0.25) as (fake, api):
        assert (await api.balance()).body == {"code": 200, "message": "success", "data": 10.0}
        await api.new_task()
        official = {"request_type": "async", "provider": "official", "input": {"prompt": "b"}}
        reply = await api.call("POST", f"{fake.url}/generateTask/{SORA}", json=official)
        assert reply.status == 200
        assert fake.tasks[reply.body["data"]["taskId"]].duration == 12
        assert (await api.balance()).body["data"] == pytest.approx(10.0 - 2.5 - 3.0)
        fake.set_balance(2.0)
        refused = await api.create()
        assert refused.body == {"code": 400, "message": "Insufficient credits", "data": None}
        assert refused.status == 400
        assert fake.stats.creates == 2
        fake.credits_error_code = 402
        assert (await api.create()).status == 402


async def test_creates_per_prompt_counts_paid_duplicates() -> None:
    """creates_per_prompt counts tasks made per prompt: a resubmitted prompt shows 2."""
    async with running() as (fake, api):
        for prompt in ("same", "other", "same"):
            await api.new_task(prompt)
        assert fake.stats.creates_per_prompt == {"same": 2, "other": 1}
        assert fake.stats.creates == 3


@pytest.fixture
async def early_fake() -> AsyncIterator[FakeApixo]:
    """A fake started in fixture setup, before looptime switches the loop to virtual time."""
    async with FakeApixo(generation_time=fixed(120.0)) as fake:
        yield fake


@pytest.mark.looptime
async def test_clock_survives_a_fake_started_in_a_fixture(early_fake: FakeApixo) -> None:
    """Server time stays continuous when looptime turns on after the fake started."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        api = Api(early_fake, http)
        task_id = await api.new_task()
        assert 0 <= early_fake.now() < 60
        await asyncio.sleep(121.0)
        data = (await api.status(task_id)).body["data"]
        assert data["state"] == "success"
        assert data["costTime"] == 120_000


def test_generation_time_distributions() -> None:
    """The distribution factories draw in range, with the asked mean, from a seeded generator."""
    rng = random.Random(1)
    draws = [lognormal(180.0, 0.4)(rng) for _ in range(20_000)]
    assert sum(draws) / len(draws) == pytest.approx(180.0, rel=0.02)
    assert all(60.0 <= heavy_tailed()(rng) <= 900.0 for _ in range(1000))
    assert all(5.0 <= uniform(5.0, 6.0)(rng) <= 6.0 for _ in range(100))
    assert fixed(7.0)(rng) == 7.0
    assert parse_generation("heavy_tailed:60,900,1.2") == heavy_tailed(60, 900, 1.2)
    with pytest.raises(ValueError, match="unknown"):
        parse_generation("gamma:1")


def test_standalone_prints_the_base_url_and_key() -> None:
    """python -m sora_async.testing listens and prints the base URL and the API key."""
    command = [sys.executable, "-m", "sora_async.testing", "--port", "0", "--api-key", "k1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            url_line, key_line = process.stdout.readline(), process.stdout.readline()
        finally:
            process.terminate()
        assert process.wait(timeout=10) == 0
    assert url_line.startswith("APIXO_BASE_URL=http://127.0.0.1:")
    assert url_line.rstrip().endswith("/api/v1")
    assert key_line.strip() == "APIXO_API_KEY=k1"


async def test_state_file_carries_tasks_over_a_restart(tmp_path: Path) -> None:
    """A fake with a state file, stopped and started again, still answers for the tasks it
    made (one that was due to end meanwhile has ended), serves their files on the same
    port, counts them in its stats, and never reuses their ids."""
    state = tmp_path / "fake.jsonl"
    async with running(state_file=state, generation_time=fixed(0.3)) as (fake, api):
        first = (await api.create("before the restart")).body["data"]["taskId"]
        assert (await api.status(first)).body["data"]["state"] in ("pending", "processing")
        port = fake.port
    await asyncio.sleep(0.5)  # the task ends while no fake runs
    async with running(state_file=state, generation_time=fixed(0.3)) as (fake, api):
        assert fake.port == port
        answer = (await api.status(first)).body["data"]
        assert answer["state"] == "success"
        (url,) = json.loads(answer["resultJson"])["resultUrls"]
        assert (await api.call("GET", url)).raw[4:8] == b"ftyp"
        second = (await api.create("after the restart")).body["data"]["taskId"]
        assert second != first
        assert fake.stats.creates == 2
        async with api.http.get(f"{fake.origin}/fake/stats") as response:
            counters = await response.json()
        assert counters["creates_per_prompt"] == {"before the restart": 1, "after the restart": 1}
