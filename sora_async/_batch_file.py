"""Batch files: JSONL requests or plain-text prompts, read a chunk at a time.

Every item gets a stable id (given, or a hash of its request) and its own file name:
ids that would share a file are refused with their line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import msgspec

from ._catalog import MODELS, ModelInput, RawInput, Request, check_model_id, to_wire_names
from ._download import file_stem
from ._errors import InputError
from ._models import VideoRequest

__all__ = [
    "BatchDefaults",
    "BatchItem",
    "BatchLineError",
    "load_requests",
    "read_items",
    "request_from",
]

_encoder = msgspec.json.Encoder(order="sorted")


class BatchLineError(InputError):
    """A line of a batch file is not a valid request; names the file and line."""

    def __init__(self, source: str, line: int, field: str, rule: str) -> None:
        super().__init__(field, rule)
        self.source = source
        self.line = line
        self.args = (f"{source}:{line}: {field}: {rule}",)


@dataclass(frozen=True)
class BatchDefaults:
    """Values for fields a line leaves out (plain-text lines leave out all but the prompt)."""

    duration: int | None = None
    size: str | None = None
    resolution: str | None = None


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch file, with its stable id."""

    id: str
    line: int
    request: Request

    @property
    def stem(self) -> str:
        """Return its file's name without extension, case-folded: on macOS and Windows
        "Intro.mp4" and "intro.mp4" are one file."""
        return file_stem(self.id).casefold()

    @property
    def request_json(self) -> str:
        """Return the request as canonical JSON (with ``model`` unless Sora 2 Pro's)."""
        return _request_json(self.request)


def _request_json(request: Request) -> str:
    data: Any
    if isinstance(request, RawInput):
        data = {**request.input, "model": request.model}
    elif isinstance(request, ModelInput):
        data = {**msgspec.to_builtins(request), "model": type(request).MODEL}
    else:
        data = request  # Sora 2 Pro's lines stay as they were: old journals resume
    return _encoder.encode(data).decode()


def request_from(
    fields: dict[str, Any], defaults: BatchDefaults, *, strict: bool = True
) -> Request:
    """Return the request a batch line's fields describe: ``model`` (default sora-2-pro)
    picks the typed input; a model without one gets a :class:`RawInput`. A field may
    be named as in Python (``generation_type``) or as on the wire (``generationType``).
    ``strict=False`` also takes text for numbers and booleans (``"10"``, ``"true"``).

    Raises InputError or msgspec.ValidationError for fields the model refuses.
    """
    fields = dict(fields)
    model = fields.pop("model", None)
    if model is None or model == "sora-2-pro":
        row = _with_defaults(to_wire_names("sora-2-pro", fields), defaults)
        return cast(Request, msgspec.convert(row, VideoRequest, strict=strict))
    check_model_id(model)
    info = MODELS.get(model)
    if info is not None and len(info.inputs) == 1:
        row = to_wire_names(model, fields)
        return cast(Request, msgspec.convert(row, info.inputs[0], strict=strict))
    return RawInput(model=model, input=fields)


def _with_defaults(row: dict[str, Any], defaults: BatchDefaults) -> dict[str, Any]:
    row = dict(row)
    mode = row.setdefault("mode", "image-to-video" if "image_urls" in row else "text-to-video")
    if defaults.duration is not None:
        row.setdefault("duration", defaults.duration)
    if mode == "text-to-video" and defaults.size is not None:
        row.setdefault("size", defaults.size)
    if mode == "image-to-video" and defaults.resolution is not None:
        row.setdefault("resolution", defaults.resolution)
    return row


def _item_id(row: dict[str, Any], request: Request) -> str:
    given = row.pop("id", None)
    if given is None:
        # The same request always gets the same id, so a re-run recognises it.
        return hashlib.sha256(_request_json(request).encode()).hexdigest()[:16]
    if isinstance(given, bool) or not isinstance(given, (str, int)) or not str(given).strip():
        raise InputError("id", "must be a non-empty string or a number")
    try:
        str(given).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (\ud800) cannot be journaled
        raise InputError("id", "must be valid Unicode text (it holds a lone surrogate)") from exc
    return str(given)


def read_items(
    path: Path, defaults: BatchDefaults | None = None, *, chunk: int = 2000
) -> Iterator[list[BatchItem]]:
    """Yield the items of a JSONL file (one request object a line, optional ``id``) or
    a plain-text file (one prompt a line; blank lines and ``#`` comments skipped), in
    lists of up to ``chunk``, reading the file as they are taken: memory holds one
    chunk, whatever the file's size. A UTF-8 byte order mark at the file's start is
    skipped (one further in is a bad line).

    Raises BatchLineError naming the file and line of a bad line once the chunks
    before it are yielded, and InputError when the file cannot be read. Ids repeated
    in the file are not checked here (see load_requests; a batch's journal checks
    them).
    """
    defaults = defaults or BatchDefaults()
    jsonl = path.suffix in (".jsonl", ".json", ".ndjson")
    items: list[BatchItem] = []
    try:
        with path.open("rb") as file:
            # Lines end at "\n" only: a text-mode split would also cut a JSON string
            # at U+2028 or U+0085, which JSON allows raw.
            for number, raw in enumerate(file, start=1):
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError("file", f"cannot read {path}: line {number}: {exc}") from exc
                item = _parse_line(path, number, text.strip(), jsonl, defaults)
                if item is not None:
                    items.append(item)
                    if len(items) >= chunk:
                        yield items
                        items = []
    except OSError as exc:
        raise InputError("file", f"cannot read {path}: {exc}") from exc
    if items:
        yield items


def _parse_line(
    path: Path, number: int, line: str, jsonl: bool, defaults: BatchDefaults
) -> BatchItem | None:
    if not line or (not jsonl and line.startswith("#")):
        return None
    try:
        if line.startswith("\ufeff"):  # files pasted together: it would hide in a prompt
            raise InputError("line", "starts with a byte order mark; only the file may")
        row: dict[str, Any] = json.loads(line) if jsonl else {"prompt": line}
        if not isinstance(row, dict):
            raise InputError("line", "must be a JSON object")
        request = request_from({k: v for k, v in row.items() if k != "id"}, defaults)
        return BatchItem(_item_id(row, request), number, request)
    except InputError as exc:
        raise BatchLineError(str(path), number, exc.field, exc.rule) from exc
    except json.JSONDecodeError as exc:
        raise BatchLineError(str(path), number, "line", f"is not JSON: {exc.msg}") from exc
    except msgspec.ValidationError as exc:
        cause = exc.__cause__
        if isinstance(cause, InputError):
            raise BatchLineError(str(path), number, cause.field, cause.rule) from exc
        raise BatchLineError(str(path), number, "line", str(exc)) from exc


def repeated_id(item: BatchItem, line: int) -> str:
    """The rule a line breaks whose id repeats ``line``'s."""
    return f"{item.id!r} repeats line {line}; give each an id"


def shared_file(item: BatchItem, other_id: str, line: int) -> str:
    """The rule a line breaks whose file name is ``other_id``'s (at ``line``)."""
    return (
        f"{item.id!r} would share a file name with {other_id!r} (line {line})"
        " on a case-insensitive disk; give each a distinct id"
    )


def load_requests(path: Path, defaults: BatchDefaults | None = None) -> list[BatchItem]:
    """Read a whole batch file (see read_items) into a list.

    Raises BatchLineError naming the file and line of the first bad line (a repeated
    id, or ids that would share a file name, included), and InputError when the file
    cannot be read. Nothing is sent.
    """
    items: list[BatchItem] = []
    seen: dict[str, int] = {}
    files: dict[str, tuple[int, str]] = {}
    for chunk in read_items(path, defaults):
        for item in chunk:
            if item.id in seen:
                raise BatchLineError(str(path), item.line, "id", repeated_id(item, seen[item.id]))
            seen[item.id] = item.line
            other = files.get(item.stem)
            if other is not None:
                rule = shared_file(item, other[1], other[0])
                raise BatchLineError(str(path), item.line, "id", rule)
            files[item.stem] = (item.line, item.id)
            items.append(item)
    return items
