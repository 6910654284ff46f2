"""Sora 2 Pro's typed inputs, the wire envelopes and results of the APIXO task API."""

from __future__ import annotations

import enum
import math
from typing import Any, Final, Literal, TypeVar, Union
from urllib.parse import urlsplit

import msgspec

from ._errors import InputError, ProtocolError

__all__ = [
    "DURATIONS",
    "PROVIDERS",
    "RESOLUTIONS",
    "SIZES",
    "CreateRequest",
    "ImageToVideo",
    "Limits",
    "Result",
    "TaskState",
    "TaskStatus",
    "TextToVideo",
    "Video",
    "VideoRequest",
]

MAX_PROMPT_CHARS: Final = 5000
# Durations some documented version of the service accepts: 10/15 (seed), 4/8/12 (newer).
DURATIONS: Final = frozenset({4, 8, 10, 12, 15})
SIZES: Final = ("720*1280", "1280*720", "1024*1792", "1792*1024")
RESOLUTIONS: Final = ("720p", "1080p")
PROVIDERS: Final = ("auto", "value", "official")

Size = Literal["720*1280", "1280*720", "1024*1792", "1792*1024"]
Resolution = Literal["720p", "1080p"]
Provider = Literal["auto", "value", "official"]
RequestType = Literal["async", "callback"]


def check_http_url(field: str, url: object) -> None:
    """Raise InputError unless ``url`` is an absolute http(s) URL with a host."""
    if not isinstance(url, str):
        raise InputError(field, f"must be an http(s) URL string, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(field, f"must be an absolute http(s) URL, got {url!r}")


def check_count(field: str, value: object, minimum: int) -> None:
    """Raise InputError unless ``value`` is a whole number of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(field, "must be a whole number")
    if value < minimum:
        raise InputError(field, f"must be at least {minimum}, got {value}")


def check_positive(field: str, value: float) -> None:
    """Raise InputError unless ``value`` is a number above zero."""
    if not value > 0:
        raise InputError(field, f"must be a positive number, got {value}")


def check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise InputError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise InputError(field, f"must be one of {', '.join(allowed)}; got {value!r}")


class _VideoInput(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    # Both modes carry every field so that a misplaced one (size on image-to-video,
    # resolution on text-to-video) gets an InputError naming the rule, not a TypeError.
    prompt: str
    duration: int | None = None
    size: Size | None = None
    resolution: Resolution | None = None
    image_urls: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("prompt", "must be a non-empty string")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InputError(
                "prompt", f"must be at most {MAX_PROMPT_CHARS} characters, got {len(self.prompt)}"
            )
        if self.duration is not None and (
            isinstance(self.duration, bool) or self.duration not in DURATIONS
        ):
            allowed = ", ".join(str(d) for d in sorted(DURATIONS))
            raise InputError("duration", f"must be one of {allowed} seconds; got {self.duration!r}")


class TextToVideo(
    _VideoInput,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    tag_field="mode",
    tag="text-to-video",
):
    """Ask for a video from a text prompt.

    ``size`` is one of ``720*1280``, ``1280*720``, ``1024*1792``, ``1792*1024``;
    ``duration`` is in seconds (10 or 15 per the original docs, 4, 8 or 12 per newer
    ones; the server decides). Raises :class:`InputError` for anything certainly wrong.

    Example::

        sa.TextToVideo(prompt="a lighthouse in a storm", duration=10, size="1280*720")
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size is not None:
            check_choice("size", self.size, SIZES)
        if self.resolution is not None:
            raise InputError("resolution", "is for image-to-video; text-to-video takes size")
        if self.image_urls is not None:
            raise InputError("image_urls", "is for image-to-video; use sa.ImageToVideo")


class ImageToVideo(
    _VideoInput,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    tag_field="mode",
    tag="image-to-video",
):
    """Ask for a video that animates a reference image.

    ``image_urls`` holds http(s) URLs of JPG, PNG or WebP images (10 MB at most each);
    ``resolution`` is ``720p`` or ``1080p``. Raises :class:`InputError` for anything
    certainly wrong.

    Example::

        sa.ImageToVideo(prompt="the sea moves", image_urls=["https://example.com/a.jpg"],
                        resolution="1080p", duration=15)
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size is not None:
            raise InputError("size", "is for text-to-video; image-to-video takes resolution")
        if self.resolution is not None:
            check_choice("resolution", self.resolution, RESOLUTIONS)
        if isinstance(self.image_urls, (str, bytes)):
            raise InputError("image_urls", "must be a list of URLs, not a single string")
        if not self.image_urls:
            raise InputError("image_urls", "must hold at least one image URL for image-to-video")
        if not isinstance(self.image_urls, tuple):
            # Accept any sequence from callers; store it immutably.
            msgspec.structs.force_setattr(self, "image_urls", tuple(self.image_urls))
        for index, url in enumerate(self.image_urls):
            check_http_url(f"image_urls[{index}]", url)


VideoRequest = Union[TextToVideo, ImageToVideo]  # noqa: UP007 - a runtime alias on 3.10


class CreateRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The body of ``POST /generateTask/{model}``.

    ``input`` is a typed input (a msgspec Struct) or, for ``sa.RawInput``, its dict.
    """

    input: Any
    # No default: the seed always sends request_type, and omit_defaults would drop it.
    request_type: RequestType
    callback_url: str | None = None
    provider: Provider = "auto"

    def __post_init__(self) -> None:
        check_choice("request_type", self.request_type, ("async", "callback"))
        check_choice("provider", self.provider, PROVIDERS)
        if self.request_type == "callback":
            if self.callback_url is None:
                raise InputError("callback_url", "is required when request_type is callback")
            check_http_url("callback_url", self.callback_url)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The limits of one API key: ``requests`` per ``period`` seconds, ``concurrent_tasks``.

    Example::

        sa.Limits(requests=60, period=60.0, concurrent_tasks=10)
    """

    requests: int = 60
    period: float = 60.0
    concurrent_tasks: int = 10

    def __post_init__(self) -> None:
        check_count("limits.requests", self.requests, 2)
        check_positive("limits.period", self.period)
        if self.period == float("inf"):  # no request would ever be sent
            raise InputError("limits.period", "must be a finite number of seconds, got inf")
        check_count("limits.concurrent_tasks", self.concurrent_tasks, 1)


class TaskState(str, enum.Enum):
    """The life cycle of a task on the server."""

    PENDING = "pending"
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """Return whether the task has ended (success or failed)."""
        return self in (TaskState.SUCCESS, TaskState.FAILED)


# gc=False: strings, numbers and an enum can be in no reference cycle, so the garbage
# collector need not track the (up to keep_results) statuses a scheduler remembers.
class TaskStatus(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A task as the status endpoint (or a callback) reports it.

    ``result_urls`` is decoded from the service's ``resultJson`` string; times are
    epoch milliseconds as sent. Unknown fields are ignored, unknown fail codes kept.
    """

    task_id: str
    state: TaskState
    result_urls: tuple[str, ...] = ()
    fail_code: str | None = None
    fail_msg: str | None = None
    create_time: int | None = None
    complete_time: int | None = None
    cost_time: int | None = None

    @property
    def terminal(self) -> bool:
        """Return whether the task has ended."""
        return self.state.terminal

    @property
    def generation_seconds(self) -> float | None:
        """Return ``completeTime - createTime`` in seconds, when both are known."""
        if self.create_time is None or self.complete_time is None:
            return None
        return (self.complete_time - self.create_time) / 1000.0


_R = TypeVar("_R", bound="Result")


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """A finished task of any model: its task id and result URLs (which expire: download soon).

    A task may have several results (an image model asked for several images).
    ``model`` is the model that made it, when known.
    """

    task_id: str
    urls: tuple[str, ...]
    create_time: int | None = None
    complete_time: int | None = None
    model: str | None = None

    @classmethod
    def from_status(cls: type[_R], status: TaskStatus, model: str | None = None) -> _R:
        """Build a result from a successful status."""
        return cls(
            task_id=status.task_id,
            urls=status.result_urls,
            create_time=status.create_time,
            complete_time=status.complete_time,
            model=model,
        )

    @property
    def url(self) -> str:
        """Return the first result URL."""
        return self.urls[0]


class Video(Result, frozen=True, kw_only=True):
    """A finished video generation (a :class:`Result` of a video model)."""


# --- the wire ---------------------------------------------------------------------------

# Structs of strings and numbers only (gc=False) can never be in a reference cycle: the
# garbage collector need not track them, and each answer then costs it nothing.


class Envelope(msgspec.Struct, kw_only=True, gc=False):
    """Every response body: ``{"code", "message", "data"}``; ``data`` decoded later."""

    code: int
    message: str = ""
    data: msgspec.Raw = msgspec.Raw(b"null")


class CreatedTask(msgspec.Struct, kw_only=True, rename="camel", gc=False):
    """``data`` of a successful create."""

    task_id: str


class WireStatus(msgspec.Struct, kw_only=True, rename="camel", gc=False):
    """``data`` of a status answer (or a callback) exactly as sent."""

    task_id: str
    # A string, not the enum: states the service adds later must not be unreadable.
    state: str
    result_json: str | None = None
    fail_code: str | int | None = None
    fail_msg: str | None = None
    create_time: int | float | None = None
    complete_time: int | float | None = None
    cost_time: int | float | None = None


class ResultJson(msgspec.Struct, gc=False):
    """The JSON object carried as a string in ``resultJson``."""

    resultUrls: tuple[str, ...] = ()


_result_decoder = msgspec.json.Decoder(ResultJson)
_status_decoder = msgspec.json.Decoder(WireStatus)
#: The decoder of every response envelope (answers and callbacks alike).
envelope_decoder = msgspec.json.Decoder(Envelope)
_STATES = {state.value: state for state in TaskState}


def _short(value: str, limit: int = 80) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters (answers may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _millis(value: float | None) -> int | None:
    return None if value is None or not math.isfinite(value) else int(value)


def _result_urls(wire: WireStatus, task_id: str) -> tuple[str, ...]:
    """Return the result URLs of a success; ProtocolError unless there is at least one
    and each is an absolute http(s) URL (``file:``, ``javascript:``, relative: refused)."""
    try:
        urls = _result_decoder.decode(wire.result_json or "{}").resultUrls
    except msgspec.MsgspecError as exc:
        raise ProtocolError(task_id, f"success with an unreadable resultJson ({exc})") from exc
    if not urls:
        raise ProtocolError(task_id, "success without a result URL")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ProtocolError(
                task_id, f"success with a result URL that is not http(s): {_short(url)}"
            )
    return urls


def status_from_wire(wire: WireStatus, task_id: str | None = None) -> TaskStatus:
    """Turn the wire status into a TaskStatus, checked against the task asked about.

    Raises ProtocolError when ``taskId`` is empty or not ``task_id`` (when given),
    ``state`` is empty, or a success lacks a readable absolute http(s) result URL.
    States the service adds later read as ``processing`` (not terminal).
    """
    asked = task_id if task_id is not None else wire.task_id
    if not wire.task_id:
        raise ProtocolError(task_id, "a status without a taskId")
    if task_id is not None and wire.task_id != task_id:
        raise ProtocolError(task_id, f"a status of another task, {_short(wire.task_id)}")
    if not wire.state:
        raise ProtocolError(asked, "a status without a state")
    state = _STATES.get(wire.state.lower(), TaskState.PROCESSING)
    urls = _result_urls(wire, asked) if state is TaskState.SUCCESS else ()
    return TaskStatus(
        task_id=wire.task_id,
        state=state,
        result_urls=urls,
        fail_code=None if wire.fail_code is None else str(wire.fail_code),
        fail_msg=wire.fail_msg,
        create_time=_millis(wire.create_time),
        complete_time=_millis(wire.complete_time),
        cost_time=_millis(wire.cost_time),
    )


def decode_envelope(body: bytes) -> Envelope:
    """Decode a response or callback body into its Envelope.

    Raises msgspec.DecodeError / ValidationError when it is not one, including JSON
    nested too deeply to read (which msgspec reports as a RecursionError).
    """
    try:
        return envelope_decoder.decode(body)
    except RecursionError as exc:
        raise msgspec.DecodeError("JSON nested too deeply") from exc


def decode_status(data: bytes, task_id: str | None = None) -> TaskStatus:
    """Decode an envelope's ``data`` (a status answer or a callback) into a TaskStatus.

    Raises ProtocolError when it is not a valid status (of ``task_id``, when given):
    see status_from_wire.
    """
    try:
        wire = _status_decoder.decode(data)
    except (msgspec.MsgspecError, RecursionError) as exc:
        raise ProtocolError(task_id, f"not a task status ({exc})") from exc
    return status_from_wire(wire, task_id)
