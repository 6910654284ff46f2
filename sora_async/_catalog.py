"""The provider's model catalogue: one typed input per model and one table row each.

Every model is served by the same two task endpoints; only ``input`` differs. A
typed input checks locally what the model's docs page makes certainly wrong, and
knows which model it goes to. Where versions of a page disagree, the union of
what they accept passes: the server is the authority.

Adding a model is one class below (its fields and ``__post_init__`` rules) and
one :class:`ModelInfo` row in ``_ROWS``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, Union

import msgspec

from ._errors import InputError
from ._models import ImageToVideo, Limits, TextToVideo, check_http_url
from ._pricing import Price

__all__ = [
    "MODELS",
    "Kling25TurboPro",
    "ModelInfo",
    "ModelInput",
    "NanoBanana",
    "NanoBanana2",
    "RawInput",
    "Request",
    "Sora2",
    "Veo31",
    "Veo31Extend",
    "VideoInput",
    "Wan25",
    "check_model_id",
    "limits_for",
    "model_info",
    "model_of",
]

Kind = Literal["video", "image"]
_MODEL_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# --- rules shared by the models ---------------------------------------------------------


def check_model_id(model: object, field: str = "model") -> str:
    """Return ``model`` if it is a well-formed model id (it goes into a URL path)."""
    if not isinstance(model, str) or not _MODEL_ID.match(model):
        raise InputError(field, f"must be a model id such as 'veo-3-1', got {model!r}")
    return model


def _prompt(value: object, limit: int, field: str = "prompt", *, required: bool = True) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip():
        raise InputError(field, "must be a non-empty string")
    if len(value) > limit:
        raise InputError(field, f"must be at most {limit} characters, got {len(value)}")


def _one_of(field: str, value: object, allowed: Sequence[object]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or value not in allowed:
        choices = ", ".join(str(a) for a in allowed)
        raise InputError(field, f"must be one of {choices}; got {value!r}")


def _urls(owner: msgspec.Struct, low: int, high: int, why: str) -> tuple[str, ...]:
    """Check ``owner.image_urls`` holds ``low``..``high`` http(s) URLs; store a tuple."""
    urls: Any = getattr(owner, "image_urls", None)
    if isinstance(urls, (str, bytes)):
        raise InputError("image_urls", "must be a list of URLs, not a single string")
    found = tuple(urls or ())
    if not low <= len(found) <= high:
        span = f"exactly {low}" if low == high else f"{low} to {high}"
        raise InputError("image_urls", f"must hold {span} image URLs {why}; got {len(found)}")
    for index, url in enumerate(found):
        check_http_url(f"image_urls[{index}]", url)
    if urls is not None and not isinstance(urls, tuple):
        msgspec.structs.force_setattr(owner, "image_urls", found)
    return found


def _number(field: str, value: object, low: float, high: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InputError(field, f"must be a number from {low} to {high}; got {value!r}")


def _whole(field: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(field, f"must be a whole number; got {value!r}")


def _default(owner: msgspec.Struct, field: str, value: object) -> None:
    # The pages mark ``mode`` and its kin required: send them even when inferred.
    if getattr(owner, field) is None:
        msgspec.structs.force_setattr(owner, field, value)


def _by_images(owner: Any, text_mode: str, image_mode: str, low: int, high: int) -> None:
    """Infer ``mode`` from ``image_urls`` when not given, check it, and check the number
    of images for that mode (``low``..``high`` with images, none without)."""
    _default(owner, "mode", image_mode if owner.image_urls else text_mode)
    _one_of("mode", owner.mode, (text_mode, image_mode))
    if owner.mode == image_mode:
        _urls(owner, low, high, f"for {image_mode}")
    elif owner.image_urls is not None:
        raise InputError("image_urls", f"is for {image_mode}")


class ModelInput(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """A typed ``input`` for one model; ``MODEL`` is the model it is sent to."""

    MODEL: ClassVar[str]


# --- video models -----------------------------------------------------------------------


class Sora2(ModelInput, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Ask ``sora-2`` for a video; ``mode`` follows from ``image_urls`` when not given.

    Example::

        sa.Sora2(prompt="a paper boat on a river", duration=8, aspect_ratio="landscape")
    """

    MODEL: ClassVar[str] = "sora-2"
    prompt: str
    mode: Literal["text-to-video", "image-to-video"] | None = None
    duration: int | None = None
    aspect_ratio: str | None = None
    image_urls: tuple[str, ...] | None = None
    remove_watermark: bool | None = None

    def __post_init__(self) -> None:
        _prompt(self.prompt, 10000)
        _by_images(self, "text-to-video", "image-to-video", 1, 1)
        _one_of("duration", self.duration, (4, 8, 10, 12, 15))
        _one_of("aspect_ratio", self.aspect_ratio, ("landscape", "portrait", "16:9", "9:16", "1:1"))


class Veo31(ModelInput, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Ask ``veo-3-1`` for a video (``mode`` quality or fast).

    ``generation_type`` is ``TEXT_2_VIDEO`` without images and
    ``FIRST_AND_LAST_FRAMES_2_VIDEO`` with them, unless given;
    ``REFERENCE_2_VIDEO`` takes 1-3 images, fast mode and 16:9.

    Example::

        sa.Veo31(prompt="a city at dawn", mode="fast", aspect_ratio="16:9")
    """

    MODEL: ClassVar[str] = "veo-3-1"
    prompt: str
    mode: Literal["quality", "fast"] | None = None
    generation_type: (
        Literal["TEXT_2_VIDEO", "FIRST_AND_LAST_FRAMES_2_VIDEO", "REFERENCE_2_VIDEO"] | None
    ) = msgspec.field(default=None, name="generationType")
    aspect_ratio: Literal["16:9", "9:16", "auto"] | None = None
    image_urls: tuple[str, ...] | None = None
    watermark: str | None = None
    seed: int | None = None
    enable_translation: bool | None = msgspec.field(default=None, name="enableTranslation")

    def __post_init__(self) -> None:
        _prompt(self.prompt, 10000)
        _default(self, "mode", "quality")
        _one_of("mode", self.mode, ("quality", "fast"))
        kind = "FIRST_AND_LAST_FRAMES_2_VIDEO" if self.image_urls else "TEXT_2_VIDEO"
        _default(self, "generation_type", kind)
        kinds = ("TEXT_2_VIDEO", "FIRST_AND_LAST_FRAMES_2_VIDEO", "REFERENCE_2_VIDEO")
        _one_of("generation_type", self.generation_type, kinds)
        _one_of("aspect_ratio", self.aspect_ratio, ("16:9", "9:16", "auto"))
        _whole("seed", self.seed)
        if self.generation_type == "TEXT_2_VIDEO":
            _urls(self, 0, 0, "for TEXT_2_VIDEO")
        elif self.generation_type == "FIRST_AND_LAST_FRAMES_2_VIDEO":
            _urls(self, 1, 2, "(first and last frame)")
        else:
            _urls(self, 1, 3, "for REFERENCE_2_VIDEO")
            if self.mode != "fast":
                raise InputError("mode", "must be fast for REFERENCE_2_VIDEO")
            if self.aspect_ratio not in (None, "16:9"):
                raise InputError("aspect_ratio", "must be 16:9 for REFERENCE_2_VIDEO")


class Veo31Extend(
    ModelInput, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Continue an earlier ``veo-3-1`` task (``task_id``) with a new prompt.

    Example::

        sa.Veo31Extend(task_id=video.task_id, prompt="the chase goes on", mode="fast")
    """

    MODEL: ClassVar[str] = "veo-3-1-extend"
    task_id: str = msgspec.field(name="taskId")
    prompt: str
    mode: Literal["fast", "quality"] | None = None
    watermark: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not self.task_id.strip():
            raise InputError("task_id", "must be the task id of an earlier veo-3-1 task")
        _prompt(self.prompt, 10000)
        _default(self, "mode", "fast")
        _one_of("mode", self.mode, ("fast", "quality"))
        _whole("seed", self.seed)


class Kling25TurboPro(
    ModelInput, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Ask ``kling-2-5-turbo-pro`` for a 5 or 10 s video; a second image is the last frame.

    Example::

        sa.Kling25TurboPro(prompt="snowy peaks", duration=5, aspect_ratio="16:9")
    """

    MODEL: ClassVar[str] = "kling-2-5-turbo-pro"
    prompt: str
    mode: Literal["text-to-video", "image-to-video"] | None = None
    duration: int | None = None
    aspect_ratio: Literal["16:9", "9:16", "1:1"] | None = None
    image_urls: tuple[str, ...] | None = None
    negative_prompt: str | None = None
    cfg_scale: float | None = None

    def __post_init__(self) -> None:
        _prompt(self.prompt, 2500)
        _by_images(self, "text-to-video", "image-to-video", 1, 2)  # 2nd: the last frame
        _default(self, "duration", 5)
        _one_of("duration", self.duration, (5, 10))
        _one_of("aspect_ratio", self.aspect_ratio, ("16:9", "9:16", "1:1"))
        _prompt(self.negative_prompt, 2500, "negative_prompt", required=False)
        _number("cfg_scale", self.cfg_scale, 0, 1)


class Wan25(ModelInput, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Ask ``wan-2-5`` for a 5 or 10 s video at 720p or 1080p.

    Example::

        sa.Wan25(prompt="clouds over a lake", resolution="720p", duration=5)
    """

    MODEL: ClassVar[str] = "wan-2-5"
    prompt: str
    mode: Literal["text-to-video", "image-to-video"] | None = None
    resolution: Literal["720p", "1080p"] | None = None
    duration: int | None = None
    aspect_ratio: Literal["16:9", "9:16", "1:1"] | None = None
    image_urls: tuple[str, ...] | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    enable_prompt_expansion: bool | None = None

    def __post_init__(self) -> None:
        _prompt(self.prompt, 800)
        _by_images(self, "text-to-video", "image-to-video", 1, 1)
        _default(self, "resolution", "720p")
        _one_of("resolution", self.resolution, ("720p", "1080p"))
        _default(self, "duration", 5)
        _one_of("duration", self.duration, (5, 10))
        _one_of("aspect_ratio", self.aspect_ratio, ("16:9", "9:16", "1:1"))
        _prompt(self.negative_prompt, 500, "negative_prompt", required=False)
        _whole("seed", self.seed)
        if self.mode == "image-to-video" and self.aspect_ratio is not None:
            raise InputError("aspect_ratio", "is for text-to-video only")


# --- image models -----------------------------------------------------------------------

_BANANA_RATIOS: Final = ("1:1", "9:16", "16:9", "4:3", "3:4", "3:2", "2:3", "5:4", "4:5", "21:9")


class NanoBanana(
    ModelInput, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Ask ``nano-banana`` for an image; with ``image_urls`` (1-5) it edits them.

    Example::

        sa.NanoBanana(prompt="a cosy cafe in the rain", aspect_ratio="3:2", output_format="png")
    """

    MODEL: ClassVar[str] = "nano-banana"
    prompt: str
    mode: Literal["text-to-image", "image-to-image"] | None = None
    aspect_ratio: str | None = None
    image_urls: tuple[str, ...] | None = None
    output_format: Literal["png", "jpeg"] | None = None

    def __post_init__(self) -> None:
        _prompt(self.prompt, 5000)
        _by_images(self, "text-to-image", "image-to-image", 1, 5)
        _one_of("aspect_ratio", self.aspect_ratio, (*_BANANA_RATIOS, "auto"))
        _one_of("output_format", self.output_format, ("png", "jpeg"))


class NanoBanana2(
    ModelInput, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Ask ``nano-banana-2`` for an image at 1k, 2k or 4k; up to 14 reference images.

    Example::

        sa.NanoBanana2(prompt="a neon street", aspect_ratio="16:9", resolution="2k")
    """

    MODEL: ClassVar[str] = "nano-banana-2"
    prompt: str
    mode: Literal["text-to-image", "image-to-image"] | None = None
    aspect_ratio: str | None = None
    resolution: Literal["1k", "2k", "4k"] | None = None
    image_urls: tuple[str, ...] | None = None
    output_format: Literal["png", "jpeg", "jpg"] | None = None

    def __post_init__(self) -> None:
        _prompt(self.prompt, 20000)
        _by_images(self, "text-to-image", "image-to-image", 1, 14)
        ratios = ("auto", *_BANANA_RATIOS, "1:4", "4:1", "1:8", "8:1")
        _one_of("aspect_ratio", self.aspect_ratio, ratios)
        _one_of("resolution", self.resolution, ("1k", "2k", "4k"))
        _one_of("output_format", self.output_format, ("png", "jpeg", "jpg"))


# --- the escape hatch -------------------------------------------------------------------


class RawInput(msgspec.Struct, frozen=True, kw_only=True):
    """Send ``input`` as it is to ``model``: for models or fields not typed here yet.

    Only the model id's form and that ``input`` is a JSON object are checked.

    Example::

        sa.RawInput(model="seedream-4-5", input={"prompt": "a fox", "max_images": 2})
    """

    model: str
    input: dict[str, Any]

    def __post_init__(self) -> None:
        check_model_id(self.model)
        if not isinstance(self.input, dict) or not all(isinstance(k, str) for k in self.input):
            raise InputError("input", "must be a JSON object (a dict with string keys)")
        try:
            msgspec.json.encode(self.input)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError("input", f"must be JSON-serialisable: {exc}") from exc


#: Any request the client accepts.
Request = Union[TextToVideo, ImageToVideo, ModelInput, RawInput]  # noqa: UP007
#: The typed inputs of video models (their results are :class:`Video`).
VideoInput = Union[  # noqa: UP007
    TextToVideo, ImageToVideo, Sora2, Veo31, Veo31Extend, Kling25TurboPro, Wan25
]


# --- the table --------------------------------------------------------------------------


# Sora 2 Pro's page: 60 requests a minute, 10 unfinished tasks; the cautious default.
_SORA_LIMITS: Final = Limits()


@dataclass(frozen=True)
class ModelInfo:
    """One model of the catalogue: its id, result kind, typed inputs and limits.

    ``limits_documented`` is False where the model's page states no figure and the
    Sora 2 Pro figures stand in as a cautious default. ``price`` is the page's (None
    where it states none: Sora 2 Pro's pages do not). ``mean_seconds`` is the
    prior of its generation time (the scheduler learns the real one).
    """

    id: str
    kind: Kind
    inputs: tuple[type[Any], ...]
    fields: str
    mean_seconds: float
    limits: Limits = _SORA_LIMITS
    limits_documented: bool = False
    #: As its page states it (None: the page states none; give it with prices=).
    price: Price | None = None


_ROWS: Final = (
    ModelInfo(
        "sora-2-pro",
        "video",
        (TextToVideo, ImageToVideo),
        "prompt, duration, size | resolution, image_urls",
        180.0,
        limits_documented=True,
    ),
    ModelInfo(
        "sora-2",
        "video",
        (Sora2,),
        "prompt, mode, duration, aspect_ratio",
        180.0,
        price=Price(0.10, 0.15),  # its page: $0.10-0.15 a video
    ),
    ModelInfo(
        "veo-3-1",
        "video",
        (Veo31,),
        "prompt, mode, generation_type, image_urls",
        120.0,
        # Its page: $0.20 a video in fast mode, $1.50 in quality mode.
        price=Price(0.20, 1.50, rates={"fast": (0.20, 0.20), "quality": (1.50, 1.50)}),
    ),
    ModelInfo("veo-3-1-extend", "video", (Veo31Extend,), "task_id, prompt, mode, seed", 120.0),
    ModelInfo(
        "kling-2-5-turbo-pro", "video", (Kling25TurboPro,), "prompt, duration, cfg_scale", 120.0
    ),
    ModelInfo(
        "wan-2-5",
        "video",
        (Wan25,),
        "prompt, resolution, duration, image_urls",
        180.0,
        # Its page: $0.08 a second at 720p (the default), $0.13 at 1080p; 5 s by default.
        price=Price(
            0.08,
            0.13,
            unit="second",
            by="resolution",
            rates={"720p": (0.08, 0.08), "1080p": (0.13, 0.13)},
            default="720p",
            seconds=5,
        ),
    ),
    ModelInfo(
        "nano-banana",
        "image",
        (NanoBanana,),
        "prompt, aspect_ratio, image_urls",
        15.0,
        price=Price(0.03, unit="image"),  # its page: $0.03 an image
    ),
    ModelInfo("nano-banana-2", "image", (NanoBanana2,), "prompt, resolution, image_urls", 30.0),
    ModelInfo(
        "ltx-2-19b",
        "video",
        (),
        "(sa.RawInput)",
        60.0,
        Limits(requests=10000, concurrent_tasks=1000),
        limits_documented=True,
    ),
)

MODELS: Final[dict[str, ModelInfo]] = {row.id: row for row in _ROWS}
"""Every model this client knows, by id (others go through :class:`RawInput`)."""


def model_of(request: object, default: str) -> str:
    """Return the model ``request`` goes to (Sora 2 Pro inputs go to ``default``)."""
    if isinstance(request, RawInput):
        return request.model
    if isinstance(request, ModelInput):
        return type(request).MODEL
    if isinstance(request, (TextToVideo, ImageToVideo)):
        return default
    raise InputError(
        "request",
        "must be a typed input such as sa.TextToVideo or sa.Veo31, or sa.RawInput; "
        f"got {type(request).__name__}",
    )


def model_info(model: str) -> ModelInfo | None:
    """Return the table row of ``model``, or None for a model not in the table."""
    return MODELS.get(model)


def limits_for(model: str, overrides: dict[str, Limits] | None = None) -> Limits:
    """Return the limits of ``model``: an override, else the table, else the Sora figures."""
    if overrides and model in overrides:
        return overrides[model]
    row = MODELS.get(model)
    return row.limits if row is not None else Limits()
