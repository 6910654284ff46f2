"""The typed inputs: wire form, local validation, decoding of what the service sends."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sora_async as sa
from sora_async._models import (
    CreateRequest,
    Envelope,
    WireStatus,
    status_from_wire,
)

SEED_TEXT_TO_VIDEO = """{
    "request_type": "async",
    "input": {
      "mode": "text-to-video",
      "prompt": "a cinematic tracking shot of a futuristic city with flying cars",
      "duration": 10,
      "size": "1280*720"
    }
  }"""

SEED_IMAGE_TO_VIDEO = """{
    "request_type": "callback",
    "callback_url": "https://your-server.com/callback",
    "input": {
      "mode": "image-to-video",
      "prompt": "make this image come alive with subtle motion",
      "duration": 15,
      "resolution": "1080p",
      "image_urls": [
        "https://example.com/reference_image.jpg"
      ]
    }
  }"""


def wire(request: CreateRequest) -> dict[str, object]:
    decoded: dict[str, object] = json.loads(msgspec.json.encode(request))
    return decoded


def test_seed_text_to_video_body_is_reproduced() -> None:
    """The seed's text-to-video curl body is exactly what we send (fields and values)."""
    request = CreateRequest(
        request_type="async",
        input=sa.TextToVideo(
            prompt="a cinematic tracking shot of a futuristic city with flying cars",
            duration=10,
            size="1280*720",
        ),
    )
    expected = json.loads(SEED_TEXT_TO_VIDEO)
    assert wire(request) == expected


def test_seed_image_to_video_body_is_reproduced() -> None:
    """The seed's image-to-video callback body is exactly what we send."""
    request = CreateRequest(
        request_type="callback",
        callback_url="https://your-server.com/callback",
        input=sa.ImageToVideo(
            prompt="make this image come alive with subtle motion",
            duration=15,
            resolution="1080p",
            image_urls=["https://example.com/reference_image.jpg"],  # type: ignore[arg-type]
        ),
    )
    expected = json.loads(SEED_IMAGE_TO_VIDEO)
    assert wire(request) == expected


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: sa.TextToVideo(prompt=""), "prompt"),
        (lambda: sa.TextToVideo(prompt="   "), "prompt"),
        (lambda: sa.TextToVideo(prompt="x" * 5001), "prompt"),
        (lambda: sa.TextToVideo(prompt="ok", duration=11), "duration"),
        (lambda: sa.TextToVideo(prompt="ok", duration=True), "duration"),
        (lambda: sa.TextToVideo(prompt="ok", duration="10"), "duration"),
        (lambda: sa.TextToVideo(prompt="ok", size="640*480"), "size"),
        (lambda: sa.TextToVideo(prompt="ok", resolution="1080p"), "resolution"),
        (lambda: sa.TextToVideo(prompt="ok", image_urls=("https://a/b.jpg",)), "image_urls"),
        (lambda: sa.ImageToVideo(prompt="ok"), "image_urls"),
        (lambda: sa.ImageToVideo(prompt="ok", image_urls=()), "image_urls"),
        (lambda: sa.ImageToVideo(prompt="ok", image_urls="https://a/b.jpg"), "image_urls"),
        (lambda: sa.ImageToVideo(prompt="ok", image_urls=("ftp://a/b.jpg",)), "image_urls[0]"),
        (lambda: sa.ImageToVideo(prompt="ok", image_urls=("b.jpg",)), "image_urls[0]"),
        (
            lambda: sa.ImageToVideo(prompt="ok", image_urls=("https://a/b.jpg",), size="1280*720"),
            "size",
        ),
        (
            lambda: sa.ImageToVideo(prompt="ok", image_urls=("https://a/b.jpg",), resolution="4k"),
            "resolution",
        ),
        (
            lambda: CreateRequest(input=sa.TextToVideo(prompt="ok"), request_type="callback"),
            "callback_url",
        ),
        (
            lambda: CreateRequest(
                input=sa.TextToVideo(prompt="ok"), request_type="callback", callback_url="nope"
            ),
            "callback_url",
        ),
        (
            lambda: CreateRequest(
                input=sa.TextToVideo(prompt="ok"), request_type="async", provider="cheap"
            ),
            "provider",
        ),
        (
            lambda: CreateRequest(input=sa.TextToVideo(prompt="ok"), request_type="sync"),
            "request_type",
        ),
        (lambda: sa.Limits(requests=1), "limits.requests"),
        (lambda: sa.Limits(concurrent_tasks=0), "limits.concurrent_tasks"),
        (lambda: sa.Limits(period=0), "limits.period"),
        (lambda: sa.Limits(period=float("inf")), "limits.period"),
        (lambda: sa.Limits(period=float("nan")), "limits.period"),
    ],
)
def test_bad_input_names_the_field(build: object, field: str) -> None:
    """Each local rule raises InputError (a ValueError) naming the field and the rule."""
    with pytest.raises(sa.InputError) as caught:
        build()  # type: ignore[operator]
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{field}: ")


@pytest.mark.parametrize("duration", [4, 8, 10, 12, 15])
def test_every_documented_duration_is_accepted(duration: int) -> None:
    """Durations some documented version accepts are not blocked locally."""
    assert sa.TextToVideo(prompt="ok", duration=duration).duration == duration


@given(st.text(min_size=1, max_size=5000).filter(lambda s: s.strip()))
def test_any_nonblank_prompt_up_to_5000_chars_round_trips(prompt: str) -> None:
    """Any non-blank prompt within the limit encodes and decodes unchanged."""
    request = CreateRequest(request_type="async", input=sa.TextToVideo(prompt=prompt, duration=10))
    sent = msgspec.json.decode(msgspec.json.encode(request))["input"]
    assert msgspec.convert(sent, sa.TextToVideo) == request.input


@given(st.integers().filter(lambda d: d not in {4, 8, 10, 12, 15}))
def test_any_undocumented_duration_is_refused(duration: int) -> None:
    """A duration no documented version accepts is refused before any request."""
    with pytest.raises(sa.InputError, match="duration"):
        sa.TextToVideo(prompt="ok", duration=duration)


def test_decoding_a_jsonl_row_validates_the_same_rules() -> None:
    """A request decoded from JSON obeys the same rules, and the union picks the mode."""
    row = b'{"mode": "image-to-video", "prompt": "p", "image_urls": ["https://x/y.png"]}'
    decoded = msgspec.json.decode(row, type=sa.VideoRequest)
    assert isinstance(decoded, sa.ImageToVideo)
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(b'{"mode": "text-to-video", "prompt": ""}', type=sa.VideoRequest)
    assert isinstance(caught.value.__cause__, sa.InputError)


def test_seed_status_answers_decode_with_result_urls() -> None:
    """The seed's success and failed status bodies decode; resultJson becomes result_urls."""
    success = (
        b'{"code":200,"message":"success","data":{"taskId":"task_12345678","state":"success",'
        b'"resultJson":"{\\"resultUrls\\":[\\"https://r2.apixo.ai/video.mp4\\"]}",'
        b'"createTime":1767965610929,"completeTime":1767965730929,"costTime":120000,'
        b'"somethingNew":{"x":1}}}'
    )
    envelope = msgspec.json.decode(success, type=Envelope)
    status = status_from_wire(msgspec.json.decode(envelope.data, type=WireStatus))
    assert status.state is sa.TaskState.SUCCESS
    assert status.result_urls == ("https://r2.apixo.ai/video.mp4",)
    assert status.generation_seconds == 120.0
    assert sa.Video.from_status(status).url == "https://r2.apixo.ai/video.mp4"

    failed = b'{"taskId":"t","state":"failed","failCode":"SensitiveContent","failMsg":"no"}'
    status = status_from_wire(msgspec.json.decode(failed, type=WireStatus))
    assert status.terminal
    assert status.fail_code == "SensitiveContent"  # unknown codes are kept
