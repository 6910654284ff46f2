"""Damaged answers of the fake service: status envelopes that read but make no sense,
and result files that are not videos.

Each damage has variants served in turn (``turn`` counts the hits of one fault), so
that a fault queued for five requests shows a client several kinds of nonsense.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from ._faults import Fault

__all__ = ["CORRUPT_PAGE", "STATUS_DAMAGES", "damage_status"]

#: Faults that damage a status answer's ``data`` (the work is done, the answer lies).
STATUS_DAMAGES = frozenset(
    {
        Fault.OTHER_TASK,
        Fault.NO_RESULT_URL,
        Fault.BAD_RESULT_JSON,
        Fault.BAD_RESULT_URL,
        Fault.BAD_STATUS_DATA,
    }
)
#: What a CDN sends instead of a video when something behind it broke.
CORRUPT_PAGE = b"<!doctype html><title>502 Bad Gateway</title><h1>Bad Gateway</h1>"

_BAD_URLS = ("file:///etc/passwd", "javascript:alert(1)", "/files/relative.mp4")


def _result_json(*urls: str) -> str:
    return msgspec.json.encode({"resultUrls": list(urls)}).decode()


def _success(data: dict[str, Any], result_json: str) -> dict[str, Any]:
    done = dict(data, state="success", resultJson=result_json)
    done.setdefault("completeTime", data.get("createTime"))
    done.pop("failCode", None)
    done.pop("failMsg", None)
    done.pop("progress", None)
    return done


def damage_status(kind: Fault, body: bytes, origin: str, turn: int) -> bytes:
    """Return the status answer ``body`` damaged as ``kind`` says (variant ``turn``).

    ``origin`` is the fake's ``http://host:port`` (for the URLs of another task).
    """
    envelope = msgspec.json.decode(body)
    data: dict[str, Any] = envelope.get("data") or {}
    task_id = str(data.get("taskId", ""))
    damaged: Any
    if kind is Fault.OTHER_TASK:
        # Another task's success, with its own URLs: a client must not take it for this one.
        other = "task_" + hashlib.sha256(task_id.encode()).hexdigest()[:16]
        damaged = _success(data, _result_json(f"{origin}/files/{other}.mp4"))
        damaged["taskId"] = other
    elif kind is Fault.NO_RESULT_URL:
        damaged = _success(data, _result_json())
    elif kind is Fault.BAD_RESULT_JSON:
        damaged = _success(data, '{"resultUrls": ["https://cdn.example/v.mp4"')
    elif kind is Fault.BAD_RESULT_URL:
        damaged = _success(data, _result_json(_BAD_URLS[turn % len(_BAD_URLS)]))
    elif kind is Fault.BAD_STATUS_DATA:
        variant = turn % 4
        if variant == 0:
            damaged = {k: v for k, v in data.items() if k != "state"}
        elif variant == 1:
            damaged = dict(data, state=2)
        elif variant == 2:
            damaged = None
        else:
            damaged = [data]
    else:
        raise ValueError(f"{kind.value} does not damage a status answer")
    return msgspec.json.encode(dict(envelope, data=damaged))
