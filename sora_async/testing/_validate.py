"""Validate create-task bodies the way the real service does (per API-FACTS.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._media import frame_size

__all__ = ["DURATIONS", "SIZES", "CreateSpec", "InvalidBody", "parse_create"]

SIZES = frozenset({"720*1280", "1280*720", "1024*1792", "1792*1024"})
RESOLUTIONS = frozenset({"720p", "1080p"})
#: Union of the documented versions: 10/15 (seed) and 4/8/12 (newer pages).
DURATIONS = frozenset({4, 8, 10, 12, 15})
MODES = frozenset({"text-to-video", "image-to-video"})
REQUEST_TYPES = frozenset({"async", "callback"})
PROVIDERS = frozenset({"auto", "value", "official"})
MAX_PROMPT = 5000
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
    if len(prompt) > MAX_PROMPT:
        raise InvalidBody(f"Invalid field: input.prompt exceeds {MAX_PROMPT} characters")
    # The typed Sora rules; other models share the endpoints but not these fields.
    if model.startswith("sora-2"):
        _check_sora(inp)
    asked = inp.get("duration")
    duration = asked if isinstance(asked, int) and not isinstance(asked, bool) else 0
    if provider == "official":
        duration = OFFICIAL_DURATION
    elif duration not in DURATIONS:
        duration = DEFAULT_DURATION
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
    )
