"""Batch files: JSONL requests, CSV rows or plain-text prompts, read a chunk at a time.

The format follows the file's extension (case aside): ``.jsonl``, ``.ndjson`` and
``.json`` are JSONL, ``.csv`` is CSV, anything else is one prompt a line. Every item
gets a stable id (given, or a hash of its request) and its own file name: ids that
would share a file are refused with their line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, cast

import msgspec

from ._catalog import (
    MODELS,
    ModelInput,
    RawInput,
    Request,
    check_model_id,
)
from ._download import file_stem
from ._errors import InputError
from ._field_names import list_names, python_name, to_wire_names
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
_JSONL: Final = (".jsonl", ".ndjson", ".json")
# msgspec's words for a value of the wrong type, and for where it is.
_AT: Final = re.compile(r"(?P<rule>.*) - at `\$\.?(?P<name>[^`\[]*)(?P<rest>[^`]*)`", re.S)
_EXPECTED: Final = re.compile(r"Expected `(?P<want>.+)`, got `(?P<got>.+)`", re.S)
_MISSING: Final = re.compile(r"Object missing required field `(?P<name>.+)`", re.S)


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

    Raises InputError naming the field the model refuses and the rule it breaks.
    """
    fields = dict(fields)
    model = fields.pop("model", None)
    if model is None or model == "sora-2-pro":
        row = _with_defaults(to_wire_names("sora-2-pro", fields), defaults)
        return _convert("sora-2-pro", row, VideoRequest, strict)
    check_model_id(model)
    info = MODELS.get(model)
    if info is not None and len(info.inputs) == 1:
        return _convert(model, to_wire_names(model, fields), info.inputs[0], strict)
    return RawInput(model=model, input=fields)


def _convert(model: str, row: dict[str, Any], kind: Any, strict: bool) -> Request:
    try:
        return cast(Request, msgspec.convert(row, kind, strict=strict))
    except msgspec.ValidationError as exc:
        cause = exc.__cause__  # a model's own rule (its __post_init__)
        if isinstance(cause, InputError):
            raise InputError(cause.field, cause.rule) from exc
        raise InputError(*_field_and_rule(model, row, str(exc))) from exc


def _field_and_rule(model: str, row: dict[str, Any], message: str) -> tuple[str, str]:
    """Return the field (by its Python name) and the rule of msgspec's ``message``."""
    missing = _MISSING.fullmatch(message)
    if missing is not None:
        return python_name(model, missing["name"]), "is required"
    found = _AT.fullmatch(message)
    if found is None:
        return "input", message
    name, rule = found["name"], found["rule"]
    expected = _EXPECTED.fullmatch(rule)
    if expected is not None:
        value = row.get(name) if not found["rest"] else None
        got = repr(value) if isinstance(value, str) else expected["got"]
        rule = f"must be {expected['want'].replace(' | null', '')}; got {got}"
    return python_name(model, name) + found["rest"] if name else "input", rule


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
    """Yield the items of a batch file in lists of up to ``chunk``, reading the file as
    they are taken: memory holds one chunk, whatever the file's size.

    The format follows the extension: JSONL (one request object a line, optional
    ``id``), CSV (a header row naming the fields, then one request a row; an empty
    cell is a field not given, text is read as the field's type, a list field takes
    a JSON array or values separated by spaces), or else plain text (one prompt a
    line; blank lines and ``#`` comments skipped). A field goes by the name
    ``sora-async models`` shows or by its wire name. A UTF-8 byte order mark at the
    file's start is skipped (one further in is a bad line).

    Raises BatchLineError naming the file and line of a bad line once the chunks
    before it are yielded, and InputError when the file cannot be read. Ids repeated
    in the file are not checked here (see load_requests; a batch's journal checks
    them).
    """
    defaults = defaults or BatchDefaults()
    suffix = path.suffix.lower()
    items: list[BatchItem] = []
    try:
        with path.open("rb") as file:
            if suffix == ".csv":
                rows = _csv_rows(path, file)
            else:
                rows = _text_rows(path, file, suffix in _JSONL)
            for number, row in rows:
                items.append(_item(path, number, row, defaults, strict=suffix != ".csv"))
                if len(items) >= chunk:
                    yield items
                    items = []
    except OSError as exc:
        raise InputError("file", f"cannot read {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise InputError("file", f"cannot read {path}: it is not UTF-8 text: {exc}") from exc
    if items:
        yield items


def _text_rows(path: Path, file: IO[bytes], jsonl: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield the number and fields of each line of a JSONL or plain-text file."""
    # Lines end at "\n" only: a text-mode split would also cut a JSON string at U+2028
    # or U+0085, which JSON allows raw.
    for number, raw in enumerate(file, start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError as exc:
            raise InputError("file", f"cannot read {path}: line {number}: {exc}") from exc
        if not line or (not jsonl and line.startswith("#")):
            continue
        if line.startswith("\ufeff"):  # files pasted together: it would hide in a prompt
            rule = "starts with a byte order mark; only the file may"
            raise BatchLineError(str(path), number, "line", rule)
        if not jsonl:
            yield number, {"prompt": line}
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BatchLineError(str(path), number, "line", f"is not JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise BatchLineError(str(path), number, "line", "must be a JSON object")
        yield number, row


def _csv_rows(path: Path, file: IO[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield the number of the line each row of a CSV file starts on, and its fields:
    the header's names, for the cells that are not empty."""
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
    reader = csv.reader(text, strict=True)
    names: list[str] | None = None
    end = 0  # the last line read: a quoted cell may span lines
    try:
        for cells in reader:
            number, end = end + 1, reader.line_num
            cells = [cell.strip() for cell in cells]
            if not any(cells):
                continue  # a blank row
            if names is None:
                names = _header(path, number, cells)
                continue
            if len(cells) > len(names):
                rule = f"has {len(cells)} cells; the header names {len(names)} fields"
                raise BatchLineError(str(path), number, "line", rule)
            row: dict[str, Any] = {
                name: cell for name, cell in zip(names, cells, strict=False) if cell
            }
            yield number, _csv_lists(path, number, row)
    except csv.Error as exc:
        raise BatchLineError(str(path), end + 1, "line", f"is not CSV: {exc}") from exc


def _header(path: Path, number: int, names: list[str]) -> list[str]:
    for index, name in enumerate(names):
        if not name:
            rule = f"column {index + 1} has no name; the header row names every field"
            raise BatchLineError(str(path), number, "header", rule)
        if name in names[:index]:
            raise BatchLineError(str(path), number, name, "names two columns")
    return names


def _csv_lists(path: Path, number: int, row: dict[str, Any]) -> dict[str, Any]:
    """Read the cells of the model's list fields: a JSON array, or words."""
    model = row.get("model") or "sora-2-pro"
    for name in list_names(model) & row.keys():
        cell = row[name]
        if not cell.startswith("["):
            row[name] = cell.split()
            continue
        try:
            row[name] = json.loads(cell)
        except json.JSONDecodeError as exc:
            rule = f"is not a JSON array: {exc.msg} (or give values separated by spaces)"
            raise BatchLineError(str(path), number, name, rule) from exc
    return row


def _item(
    path: Path, number: int, row: dict[str, Any], defaults: BatchDefaults, *, strict: bool
) -> BatchItem:
    try:
        fields = {k: v for k, v in row.items() if k != "id"}
        request = request_from(fields, defaults, strict=strict)
        return BatchItem(_item_id(row, request), number, request)
    except InputError as exc:
        raise BatchLineError(str(path), number, exc.field, exc.rule) from exc


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
