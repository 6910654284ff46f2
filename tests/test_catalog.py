"""The model catalogue: typed inputs per model, the raw escape hatch, image results."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sora_async as sa
from sora_async.testing import FakeApixo
from sora_async.testing._validate import InvalidBody, parse_create

IMG = "https://example.com/a.jpg"
IMG2 = "https://example.com/b.png"


def sent(client: sa.SoraClient, request: Any) -> tuple[str, dict[str, Any]]:
    """Return the model and the JSON body the client would send for ``request``."""
    body: dict[str, Any] = json.loads(msgspec.json.encode(client.create_request(request)))
    return client.model_for(request), body


# Each row: a request, the model it goes to, and its ``input`` on the wire in the
# shape of the model's docs page (the required fields the page shows included).
WIRE_CASES: list[tuple[Any, str, dict[str, Any]]] = [
    (
        sa.Sora2(
            prompt="a paper boat", duration=12, aspect_ratio="landscape", remove_watermark=True
        ),
        "sora-2",
        {
            "mode": "text-to-video",
            "prompt": "a paper boat",
            "duration": 12,
            "aspect_ratio": "landscape",
            "remove_watermark": True,
        },
    ),
    (
        sa.Sora2(prompt="it moves", image_urls=[IMG]),
        "sora-2",
        {"mode": "image-to-video", "prompt": "it moves", "image_urls": [IMG]},
    ),
    (
        sa.Veo31(prompt="a city at dawn", aspect_ratio="16:9"),
        "veo-3-1",
        {
            "mode": "quality",
            "prompt": "a city at dawn",
            "generationType": "TEXT_2_VIDEO",
            "aspect_ratio": "16:9",
        },
    ),
    (
        sa.Veo31(prompt="morph", image_urls=[IMG, IMG2], seed=7, watermark="me"),
        "veo-3-1",
        {
            "mode": "quality",
            "prompt": "morph",
            "generationType": "FIRST_AND_LAST_FRAMES_2_VIDEO",
            "image_urls": [IMG, IMG2],
            "watermark": "me",
            "seed": 7,
        },
    ),
    (
        sa.Veo31(
            prompt="style", mode="fast", generation_type="REFERENCE_2_VIDEO", image_urls=[IMG]
        ),
        "veo-3-1",
        {
            "mode": "fast",
            "prompt": "style",
            "generationType": "REFERENCE_2_VIDEO",
            "image_urls": [IMG],
        },
    ),
    (
        sa.Veo31Extend(task_id="task_1", prompt="go on"),
        "veo-3-1-extend",
        {"taskId": "task_1", "mode": "fast", "prompt": "go on"},
    ),
    (
        sa.Kling25TurboPro(prompt="peaks", duration=10, negative_prompt="blur", cfg_scale=0.6),
        "kling-2-5-turbo-pro",
        {
            "mode": "text-to-video",
            "prompt": "peaks",
            "duration": 10,
            "negative_prompt": "blur",
            "cfg_scale": 0.6,
        },
    ),
    (
        sa.Wan25(prompt="clouds", resolution="1080p", enable_prompt_expansion=True, seed=3),
        "wan-2-5",
        {
            "mode": "text-to-video",
            "prompt": "clouds",
            "resolution": "1080p",
            "duration": 5,
            "seed": 3,
            "enable_prompt_expansion": True,
        },
    ),
    (
        sa.NanoBanana(prompt="a cafe", aspect_ratio="3:2", output_format="png"),
        "nano-banana",
        {
            "mode": "text-to-image",
            "prompt": "a cafe",
            "aspect_ratio": "3:2",
            "output_format": "png",
        },
    ),
    (
        sa.NanoBanana2(prompt="a street", image_urls=[IMG] * 14, resolution="4k"),
        "nano-banana-2",
        {
            "mode": "image-to-image",
            "prompt": "a street",
            "resolution": "4k",
            "image_urls": [IMG] * 14,
        },
    ),
    (
        sa.RawInput(model="seedream-4-5", input={"prompt": "a fox", "max_images": 2}),
        "seedream-4-5",
        {"prompt": "a fox", "max_images": 2},
    ),
]


@pytest.mark.parametrize(("request_", "model", "expected"), WIRE_CASES)
def test_each_model_sends_the_body_its_page_describes(
    request_: Any, model: str, expected: dict[str, Any]
) -> None:
    """The request decides the model, and ``input`` on the wire has the page's field names."""
    client = sa.SoraClient(api_key="k", base_url="http://127.0.0.1:9/api/v1")
    where, body = sent(client, request_)
    assert where == model
    assert body == {"request_type": "async", "input": expected}
    # The fake, which follows the pages, accepts exactly this body.
    parse_create(body, model)


def test_sora_2_pro_stays_the_default_model() -> None:
    """TextToVideo / ImageToVideo still go to the client's model, sora-2-pro by default."""
    client = sa.SoraClient(api_key="k", base_url="http://127.0.0.1:9/api/v1")
    assert client.model_for(sa.TextToVideo(prompt="x")) == "sora-2-pro"
    assert client.model_for(sa.ImageToVideo(prompt="x", image_urls=[IMG])) == "sora-2-pro"


# Each row: a factory that must raise, and the field the InputError names.
BAD: list[tuple[Callable[[], object], str]] = [
    (lambda: sa.Sora2(prompt="x" * 10001), "prompt"),
    (lambda: sa.Sora2(prompt="x", duration=5), "duration"),
    (lambda: sa.Sora2(prompt="x", aspect_ratio="square"), "aspect_ratio"),
    (lambda: sa.Sora2(prompt="x", image_urls=[IMG, IMG2]), "image_urls"),
    (lambda: sa.Sora2(prompt="x", mode="text-to-video", image_urls=[IMG]), "image_urls"),
    (lambda: sa.Veo31(prompt=" "), "prompt"),
    (lambda: sa.Veo31(prompt="x", mode="slow"), "mode"),  # type: ignore[arg-type]
    (lambda: sa.Veo31(prompt="x", aspect_ratio="1:1"), "aspect_ratio"),  # type: ignore[arg-type]
    (lambda: sa.Veo31(prompt="x", image_urls=[IMG, IMG, IMG]), "image_urls"),
    (lambda: sa.Veo31(prompt="x", generation_type="REFERENCE_2_VIDEO", image_urls=[IMG]), "mode"),
    (
        lambda: sa.Veo31(
            prompt="x",
            mode="fast",
            generation_type="REFERENCE_2_VIDEO",
            aspect_ratio="9:16",
            image_urls=[IMG],
        ),
        "aspect_ratio",
    ),
    (
        lambda: sa.Veo31(
            prompt="x", mode="fast", generation_type="REFERENCE_2_VIDEO", image_urls=[IMG] * 4
        ),
        "image_urls",
    ),
    (lambda: sa.Veo31(prompt="x", generation_type="TEXT_2_VIDEO", image_urls=[IMG]), "image_urls"),
    (lambda: sa.Veo31(prompt="x", seed=1.5), "seed"),  # type: ignore[arg-type]
    (lambda: sa.Veo31Extend(task_id="", prompt="x"), "task_id"),
    (lambda: sa.Veo31Extend(task_id="t", prompt="x", mode="turbo"), "mode"),  # type: ignore[arg-type]
    (lambda: sa.Kling25TurboPro(prompt="x" * 2501), "prompt"),
    (lambda: sa.Kling25TurboPro(prompt="x", duration=8), "duration"),
    (lambda: sa.Kling25TurboPro(prompt="x", cfg_scale=1.5), "cfg_scale"),
    (lambda: sa.Kling25TurboPro(prompt="x", negative_prompt="n" * 2501), "negative_prompt"),
    (lambda: sa.Kling25TurboPro(prompt="x", mode="image-to-video"), "image_urls"),
    (lambda: sa.Kling25TurboPro(prompt="x", image_urls=[IMG] * 3), "image_urls"),
    (lambda: sa.Wan25(prompt="x" * 801), "prompt"),
    (lambda: sa.Wan25(prompt="x", resolution="4k"), "resolution"),  # type: ignore[arg-type]
    (lambda: sa.Wan25(prompt="x", duration=15), "duration"),
    (lambda: sa.Wan25(prompt="x", image_urls=[IMG, IMG2]), "image_urls"),
    (lambda: sa.Wan25(prompt="x", image_urls=[IMG], aspect_ratio="16:9"), "aspect_ratio"),
    (lambda: sa.Wan25(prompt="x", negative_prompt="n" * 501), "negative_prompt"),
    (lambda: sa.NanoBanana(prompt="x" * 5001), "prompt"),
    (lambda: sa.NanoBanana(prompt="x", aspect_ratio="1:4"), "aspect_ratio"),
    (lambda: sa.NanoBanana(prompt="x", output_format="webp"), "output_format"),  # type: ignore[arg-type]
    (lambda: sa.NanoBanana(prompt="x", image_urls=[IMG] * 6), "image_urls"),
    (lambda: sa.NanoBanana(prompt="x", image_urls=["ftp://a/b.png"]), "image_urls[0]"),
    (lambda: sa.NanoBanana2(prompt="x", image_urls=[IMG] * 15), "image_urls"),
    (lambda: sa.NanoBanana2(prompt="x", resolution="8k"), "resolution"),  # type: ignore[arg-type]
    (lambda: sa.NanoBanana2(prompt="x" * 20001), "prompt"),
    (lambda: sa.RawInput(model="bad/model", input={}), "model"),
    (lambda: sa.RawInput(model="", input={}), "model"),
    (lambda: sa.RawInput(model="m", input=["not", "an", "object"]), "input"),  # type: ignore[arg-type]
    (lambda: sa.RawInput(model="m", input={"x": object()}), "input"),
]


@pytest.mark.parametrize(("make", "field"), BAD)
def test_a_bad_field_names_the_field_and_rule(make: Callable[[], object], field: str) -> None:
    """Every model's rules raise InputError naming the field (a ValueError too)."""
    with pytest.raises(sa.InputError) as caught:
        make()
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)


def test_a_foreign_object_is_refused() -> None:
    """Something that is not a typed input or RawInput names ``request``."""
    client = sa.SoraClient(api_key="k", base_url="http://127.0.0.1:9/api/v1")
    with pytest.raises(sa.InputError) as caught:
        client.create_request({"prompt": "x"})  # type: ignore[arg-type]
    assert caught.value.field == "request"


@given(st.text(min_size=1, max_size=800).filter(lambda s: s.strip()))
def test_any_prompt_within_every_limit_is_accepted_by_every_model(prompt: str) -> None:
    """A prompt within the strictest limit (wan-2-5's 800) passes every typed model."""
    for make in (sa.Sora2, sa.Veo31, sa.Kling25TurboPro, sa.Wan25, sa.NanoBanana, sa.NanoBanana2):
        assert make(prompt=prompt).prompt == prompt


@pytest.mark.parametrize(
    ("model", "inp", "error"),
    [
        ("veo-3-1", {"prompt": "x", "mode": "quality"}, "input.generationType"),
        (
            "veo-3-1",
            {
                "prompt": "x",
                "mode": "quality",
                "generationType": "REFERENCE_2_VIDEO",
                "image_urls": [IMG],
            },
            "fast",
        ),
        ("kling-2-5-turbo-pro", {"prompt": "x", "mode": "image-to-video"}, "input.image_urls"),
        ("wan-2-5", {"prompt": "x" * 801}, "800"),
        ("nano-banana", {"prompt": "x", "output_format": "gif"}, "output_format"),
        ("veo-3-1-extend", {"prompt": "x", "mode": "fast"}, "input.taskId"),
    ],
)
def test_the_fake_refuses_what_the_pages_forbid(
    model: str, inp: dict[str, Any], error: str
) -> None:
    """The fake's own per-model rules turn a forbidden input into a 400."""
    with pytest.raises(InvalidBody, match=error.replace(".", r"\.")):
        parse_create({"request_type": "async", "input": inp}, model)


@pytest.mark.looptime
async def test_one_client_drives_sora_veo_and_images(fake: FakeApixo, tmp_path: Path) -> None:
    """Sora 2 Pro, Veo 3.1 and Nano Banana from one client: each request goes to its
    own model, videos come back as Video, images as Result saved with their type."""
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        sora = await client.generate(sa.TextToVideo(prompt="a kite", duration=10))
        veo = await client.generate(sa.Veo31(prompt="a city", mode="fast"))
        images = await client.generate(
            sa.RawInput(model="nano-banana", input={"prompt": "a cafe", "max_images": 2})
        )
        jpeg = await client.generate(sa.NanoBanana(prompt="a cat", output_format="jpeg"))
        assert isinstance(sora, sa.Video)
        assert isinstance(veo, sa.Video)
        assert not isinstance(images, sa.Video)
        assert isinstance(images, sa.Result)
        assert (sora.model, veo.model, images.model) == ("sora-2-pro", "veo-3-1", "nano-banana")
        assert {fake.tasks[r.task_id].model for r in (sora, veo, images)} == {
            "sora-2-pro",
            "veo-3-1",
            "nano-banana",
        }
        assert len(images.urls) == 2
        paths = await client.download_all(images, tmp_path)
        assert [p.suffix for p in paths] == [".png", ".png"]
        assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
        (photo,) = await client.download_all(jpeg, tmp_path, name="cat")
        assert photo.name == "cat.jpg"
        assert photo.read_bytes()[:2] == b"\xff\xd8"
        film = await client.download(veo, tmp_path)
        assert film.suffix == ".mp4"
        assert fake.stats.rate_limited == 0


@pytest.mark.looptime
async def test_bad_input_spends_no_request(fake: FakeApixo) -> None:
    """A bad typed input fails locally: the fake sees no request at all."""
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        with pytest.raises(sa.InputError):
            await client.generate(sa.Veo31(prompt="x", aspect_ratio="4:3"))  # type: ignore[arg-type]
        with pytest.raises(sa.InputError):
            await client.submit("a prompt")  # type: ignore[arg-type]
    assert fake.stats.requests == 0


@pytest.mark.looptime
async def test_veo_extend_continues_a_veo_task_and_fails_on_any_other(fake: FakeApixo) -> None:
    """veo-3-1-extend of a veo-3-1 task succeeds; of a Sora task it fails with TASKID_ERROR."""
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        veo = await client.generate(sa.Veo31(prompt="a chase"))
        longer = await client.generate(sa.Veo31Extend(task_id=veo.task_id, prompt="more"))
        assert isinstance(longer, sa.Video)
        assert longer.model == "veo-3-1-extend"
        sora = await client.generate(sa.TextToVideo(prompt="a kite"))
        with pytest.raises(sa.TaskFailedError) as caught:
            await client.generate(sa.Veo31Extend(task_id=sora.task_id, prompt="more"))
        assert caught.value.fail_code == "TASKID_ERROR"


@pytest.mark.looptime
async def test_raw_input_reaches_the_fake_as_sent(fake: FakeApixo) -> None:
    """RawInput sends its object untouched, even fields no page documents yet."""
    async with sa.SoraClient(api_key=fake.api_key, base_url=fake.url) as client:
        raw = {"prompt": "a dog", "brand_new_field": [1, 2]}
        task_id = await client.submit(sa.RawInput(model="ltx-2-19b", input=raw))
        assert fake.tasks[task_id].input == raw
        assert fake.tasks[task_id].model == "ltx-2-19b"
        status = await client.status(task_id)  # asked on the task's own model
        assert status.task_id == task_id
