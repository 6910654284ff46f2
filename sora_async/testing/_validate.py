"""Validate create-task bodies the way the real service does (per API-FACTS.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._media import frame_size

__all__ = [
    "DURATIONS",
    "MODEL_RULES",
    "SIZES",
    "CreateSpec",
    "InvalidBody",
    "ModelRules",
    "parse_create",
]

SIZES = frozenset({"720*1280", "1280*720", "1024*1792", "1792*1024"})
RESOLUTIONS = frozenset({"720p", "1080p"})
#: Union of the documented versions: 10/15 (seed) and 4/8/12 (newer pages).
DURATIONS = frozenset({4, 8, 10, 12, 15})
MODES = frozenset({"text-to-video", "image-to-video"})
REQUEST_TYPES = frozenset({"async", "callback"})
PROVIDERS = frozenset({"auto", "value", "official"})
MAX_PROMPT = 5000
_SORA_PRO = frozenset({"sora-2-pro"})
DEFAULT_DURATION = 10
OFFICIAL_DURATION = 12


class InvalidBody(Exception):
    """Signal a 400: the body breaks a rule; ``str(exc)`` goes to ``data.error``."""


@dataclass(frozen=True)
class CreateSpec:
    """Hold the accepted parts of a create body."""

    request_type: str
    callback_url: str | None
    provider: str
    input: dict[str, Any]
    prompt: str
    #: Seconds of video made and billed.
    duration: int
    width: int
    height: int
    #: ``video`` or ``image``: what the result files are.
    kind: str = "video"
    #: Image files made (image models), and their extension (``png`` or ``jpg``).
    images: int = 0
    image_format: str = "png"


def _optional_choice(obj: dict[str, Any], key: str, allowed: frozenset[str], where: str) -> None:
    value = obj.get(key)
    if value is not None and value not in allowed:
        choices = ", ".join(sorted(allowed))
        raise InvalidBody(f"Invalid field: {where}{key} must be one of {choices}")


def _check_sora(inp: dict[str, Any]) -> None:
    mode = inp.get("mode", "text-to-video")
    if mode not in MODES:
        raise InvalidBody("Invalid field: input.mode must be text-to-video or image-to-video")
    if mode == "text-to-video":
        _optional_choice(inp, "size", SIZES, "input.")
    else:
        _optional_choice(inp, "resolution", RESOLUTIONS, "input.")
        urls = inp.get("image_urls")
        if urls is None or urls == []:
            raise InvalidBody("Missing required field: input.image_urls")
        if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
            raise InvalidBody("Invalid field: input.image_urls must be a list of URLs")
    duration = inp.get("duration")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, int) or duration not in DURATIONS
    ):
        choices = ", ".join(str(d) for d in sorted(DURATIONS))
        raise InvalidBody(f"Invalid field: input.duration must be one of {choices}")


@dataclass(frozen=True)
class ModelRules:
    """What one model's docs page says its ``input`` must hold (union of page versions)."""

    kind: str
    prompt: int
    #: field -> allowed values (compared as strings; ints and digit strings alike).
    choices: dict[str, frozenset[str]] = field(default_factory=dict)
    #: value of ``mode`` (or ``generationType``) -> (least, most) image_urls; the first
    #: entry is the page's default mode.
    images: dict[str, tuple[int, int]] = field(default_factory=dict)
    image_key: str = "mode"
    texts: dict[str, int] = field(default_factory=dict)
    numbers: dict[str, tuple[float, float]] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    extra: Callable[[dict[str, Any]], None] | None = None


def _set(*values: str) -> frozenset[str]:
    return frozenset(values)


def _check_veo(inp: dict[str, Any]) -> None:
    if inp.get("generationType") == "REFERENCE_2_VIDEO":
        if inp.get("mode") != "fast":
            raise InvalidBody("Invalid field: input.mode must be fast for REFERENCE_2_VIDEO")
        if inp.get("aspect_ratio", "16:9") != "16:9":
            raise InvalidBody(
                "Invalid field: input.aspect_ratio must be 16:9 for REFERENCE_2_VIDEO"
            )


_VIDEO_MODES = _set("text-to-video", "image-to-video")
_IMAGE_MODES = _set("text-to-image", "image-to-image")
_RATIOS = ("1:1", "9:16", "16:9", "4:3", "3:4", "3:2", "2:3", "5:4", "4:5", "21:9", "auto")
#: The models the fake knows the rules of, by id; others only need a prompt.
MODEL_RULES: dict[str, ModelRules] = {
    "sora-2-pro": ModelRules("video", MAX_PROMPT, extra=_check_sora),
    "sora-2": ModelRules(
        "video",
        10000,
        {
            "mode": _VIDEO_MODES,
            "duration": _set("4", "8", "10", "12", "15"),
            "n_frames": _set("10", "15"),
            "aspect_ratio": _set("landscape", "portrait", "16:9", "9:16", "1:1"),
        },
        {"text-to-video": (0, 0), "image-to-video": (1, 1)},
    ),
    "veo-3-1": ModelRules(
        "video",
        10000,
        {
            "mode": _set("quality", "fast"),
            "generationType": _set(
                "TEXT_2_VIDEO", "FIRST_AND_LAST_FRAMES_2_VIDEO", "REFERENCE_2_VIDEO"
            ),
            "aspect_ratio": _set("16:9", "9:16", "auto"),
        },
        {
            "TEXT_2_VIDEO": (0, 0),
            "FIRST_AND_LAST_FRAMES_2_VIDEO": (1, 2),
            "REFERENCE_2_VIDEO": (1, 3),
        },
        image_key="generationType",
        required=("mode", "generationType"),
        extra=_check_veo,
    ),
    "veo-3-1-extend": ModelRules(
        "video", 10000, {"mode": _set("fast", "quality")}, required=("taskId", "mode")
    ),
    "kling-2-5-turbo-pro": ModelRules(
        "video",
        2500,
        {
            "mode": _VIDEO_MODES,
            "duration": _set("5", "10"),
            "aspect_ratio": _set("16:9", "9:16", "1:1"),
        },
        {"text-to-video": (0, 0), "image-to-video": (1, 2)},
        texts={"negative_prompt": 2500},
        numbers={"cfg_scale": (0.0, 1.0)},
    ),
    "wan-2-5": ModelRules(
        "video",
        800,
        {
            "mode": _VIDEO_MODES,
            "resolution": _set("720p", "1080p"),
            "duration": _set("5", "10"),
            "aspect_ratio": _set("16:9", "9:16", "1:1"),
        },
        {"text-to-video": (0, 0), "image-to-video": (1, 1)},
        texts={"negative_prompt": 500},
    ),
    "nano-banana": ModelRules(
        "image",
        5000,
        {
            "mode": _IMAGE_MODES,
            "aspect_ratio": _set(*_RATIOS),
            "output_format": _set("png", "jpeg"),
        },
        {"text-to-image": (0, 0), "image-to-image": (1, 5)},
    ),
    "nano-banana-2": ModelRules(
        "image",
        20000,
        {
            "mode": _IMAGE_MODES,
            "aspect_ratio": _set(*_RATIOS, "1:4", "4:1", "1:8", "8:1"),
            "resolution": _set("1k", "2k", "4k"),
            "output_format": _set("png", "jpeg", "jpg"),
        },
        {"text-to-image": (0, 0), "image-to-image": (1, 14)},
    ),
}
#: Image models served without typed rules here: their results are still images.
IMAGE_MODELS = frozenset({"seedream-4-5", "seedream-5-0", "flux-2", "midjourney"})
_ANY_PROMPT = 20000


def _as_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (str, int)):
        return str(value)
    return None


def _check_model(rules: ModelRules, inp: dict[str, Any]) -> None:
    for key in rules.required:
        if inp.get(key) in (None, ""):
            raise InvalidBody(f"Missing required field: input.{key}")
    for key, allowed in rules.choices.items():
        value = inp.get(key)
        if value is not None and _as_text(value) not in allowed:
            choices = ", ".join(sorted(allowed))
            raise InvalidBody(f"Invalid field: input.{key} must be one of {choices}")
    for key, limit in rules.texts.items():
        text = inp.get(key)
        if text is not None and (not isinstance(text, str) or len(text) > limit):
            raise InvalidBody(f"Invalid field: input.{key} must be text of at most {limit} chars")
    for key, (low, high) in rules.numbers.items():
        number = inp.get(key)
        if number is not None and (
            isinstance(number, bool)
            or not isinstance(number, (int, float))
            or not low <= number <= high
        ):
            raise InvalidBody(f"Invalid field: input.{key} must be from {low} to {high}")
    if rules.images:
        first = next(iter(rules.images))
        low, high = rules.images.get(str(inp.get(rules.image_key) or first), (0, 0))
        urls = inp.get("image_urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
            raise InvalidBody("Invalid field: input.image_urls must be a list of URLs")
        if len(urls) < low:
            raise InvalidBody("Missing required field: input.image_urls")
        if len(urls) > high:
            raise InvalidBody(f"Invalid field: input.image_urls takes at most {high} here")
    if rules.extra is not None:
        rules.extra(inp)


def parse_create(body: Any, model: str) -> CreateSpec:
    """Check a decoded create body for ``model`` and return what it asks for.

    Raises:
        InvalidBody: the body breaks a rule of the service.
    """
    if not isinstance(body, dict):
        raise InvalidBody("Request body must be a JSON object")
    request_type = body.get("request_type", "async")
    if request_type not in REQUEST_TYPES:
        raise InvalidBody("Invalid field: request_type must be async or callback")
    callback_url = body.get("callback_url")
    if callback_url is not None and not isinstance(callback_url, str):
        raise InvalidBody("Invalid field: callback_url must be a string")
    if request_type == "callback" and not callback_url:
        raise InvalidBody("Missing required field: callback_url (request_type is callback)")
    provider = body.get("provider", "auto")
    if provider not in PROVIDERS:
        raise InvalidBody("Invalid field: provider must be one of auto, official, value")
    inp = body.get("input")
    if not isinstance(inp, dict):
        raise InvalidBody("Missing required field: input")
    prompt = inp.get("prompt")
    if prompt is None or prompt == "":
        raise InvalidBody("Missing required field: input.prompt")
    if not isinstance(prompt, str):
        raise InvalidBody("Invalid field: input.prompt must be a string")
    rules = MODEL_RULES.get(model)
    limit = rules.prompt if rules is not None else _ANY_PROMPT
    if len(prompt) > limit:
        raise InvalidBody(f"Invalid field: input.prompt exceeds {limit} characters")
    if rules is not None:
        _check_model(rules, inp)
    kind = rules.kind if rules is not None else "image" if model in IMAGE_MODELS else "video"
    asked = _as_text(inp.get("duration")) or ""
    duration = int(asked) if asked.isdigit() else 0
    if provider == "official" and model.startswith("sora-2"):
        duration = OFFICIAL_DURATION
    elif duration not in DURATIONS and not (model not in _SORA_PRO and 1 <= duration <= 60):
        duration = DEFAULT_DURATION
    if kind == "image":
        duration = 0
    count = inp.get("max_images", inp.get("num_images", 1))
    images = count if isinstance(count, int) and not isinstance(count, bool) else 1
    image_format = "jpg" if inp.get("output_format") in ("jpeg", "jpg") else "png"
    size, resolution = inp.get("size"), inp.get("resolution")
    width, height = frame_size(
        size if isinstance(size, str) else None,
        resolution if isinstance(resolution, str) else None,
    )
    return CreateSpec(
        request_type=str(request_type),
        callback_url=callback_url,
        provider=str(provider),
        input=inp,
        prompt=prompt,
        duration=duration,
        width=width,
        height=height,
        kind=kind,
        images=max(1, min(images, 15)) if kind == "image" else 0,
        image_format=image_format,
    )
