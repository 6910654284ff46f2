"""Input field names: the Python names ``sora-async models`` shows (``generation_type``)
and the names on the wire (``generationType``), one mapping for ``--set``, JSONL lines
and CSV headers alike."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from ._catalog import MODELS
from ._errors import InputError
from ._models import ImageToVideo, TextToVideo

__all__ = ["input_names", "list_names", "python_name", "to_wire_names"]


@functools.cache
def _input_fields(model: str) -> tuple[tuple[str, str, bool], ...] | None:
    """Return the Python name, the wire name and whether it holds a list, of each input
    field of ``model``'s typed input; None for a model without one."""
    if model == "sora-2-pro":
        kinds: tuple[type[Any], ...] = (TextToVideo, ImageToVideo)
        fields = {"mode": ("mode", False)}  # the tag that picks TextToVideo or ImageToVideo
    else:
        row = MODELS.get(model)
        if row is None or len(row.inputs) != 1:
            return None
        kinds, fields = row.inputs, {}
    for kind in kinds:
        for field in msgspec.inspect.type_info(kind).fields:  # type: ignore[attr-defined]
            types = getattr(field.type, "types", (field.type,))  # T | None: a UnionType
            listed = any(isinstance(t, _LIST_TYPES) for t in types)
            fields[field.name] = (field.encode_name, listed)
    return tuple((python, wire, listed) for python, (wire, listed) in fields.items())


_LIST_TYPES: Final = (msgspec.inspect.VarTupleType, msgspec.inspect.ListType)


@functools.cache
def input_names(model: str) -> dict[str, str] | None:
    """Return the input field names ``model``'s typed input takes, each mapped to its
    name on the wire: the Python names (``generation_type``, as ``sora-async models``
    shows them) and the wire names (``generationType``) alike. None for a model
    without a typed input (its fields go as they are, in a :class:`RawInput`)."""
    fields = _input_fields(model)
    if fields is None:
        return None
    return {name: wire for python, wire, _ in fields for name in (python, wire)}


@functools.cache
def list_names(model: str) -> frozenset[str]:
    """Return the names (both forms) of ``model``'s input fields that hold a list."""
    fields = _input_fields(model) or ()
    return frozenset(name for python, wire, listed in fields if listed for name in (python, wire))


def python_name(model: str, name: str) -> str:
    """Return the Python name of ``model``'s input field ``name`` (a wire name or not)."""
    return next((python for python, wire, _ in _input_fields(model) or () if wire == name), name)


def to_wire_names(model: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``fields`` (an input of ``model``) keyed by their names on the wire; each
    may be named as in Python or as on the wire.

    Raises InputError naming a field that ``model`` does not take (and listing the
    ones it takes), or one given under both its names.
    """
    names = input_names(model)
    if names is None:
        return dict(fields)
    wire: dict[str, Any] = {}
    given: dict[str, str] = {}  # wire name: the name it was given by
    for key, value in fields.items():
        name = names.get(key)
        if name is None:
            shown = ", ".join(
                python if python == on_wire else f"{python} ({on_wire})"
                for python, on_wire, _ in _input_fields(model) or ()
            )
            raise InputError(key, f"is not an input field of {model}; it takes {shown}")
        if name in given:
            raise InputError(key, f"is given twice, as {given[name]} and {key}")
        given[name] = key
        wire[name] = value
    return wire
