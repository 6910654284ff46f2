"""HTTP helpers of the fake service: envelopes, faults on the wire, byte ranges."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web

from ._damage import CORRUPT_PAGE, STATUS_DAMAGES, damage_status
from ._faults import Fault, FaultSpec

__all__ = [
    "API_PREFIX",
    "Handler",
    "apply_fault",
    "drop_connection",
    "envelope",
    "envelope_body",
    "invalid",
    "json_errors",
    "retry_headers",
    "send_bytes",
]

API_PREFIX = "/api/v1"
STATUS_MESSAGES = {
    400: "Invalid parameters",
    401: "Invalid or missing API key",
    402: "Insufficient credits",
    403: "Forbidden",
    404: "Not found",
    429: "Rate limit exceeded",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service temporarily unavailable",
    504: "Gateway timeout",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def envelope_body(code: int, message: str, data: Any = None) -> bytes:
    """Return the JSON bytes of ``{"code", "message", "data"}``, as every answer encodes them."""
    return msgspec.json.encode({"code": code, "message": message, "data": data})


def envelope(
    code: int,
    message: str,
    data: Any = None,
    *,
    http_status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Return ``{"code", "message", "data"}`` as JSON; HTTP status = code unless given."""
    body = envelope_body(code, message, data)
    return web.Response(
        status=code if http_status is None else http_status,
        body=body,
        content_type="application/json",
        headers=headers,
    )


def invalid(error: str) -> web.Response:
    """Return a 400 whose ``data.error`` names what is wrong."""
    return envelope(400, "Invalid parameters", {"error": error})


def retry_headers(retry_after: float | None) -> dict[str, str] | None:
    """Return a ``Retry-After`` header (seconds) when one is wanted."""
    return None if retry_after is None else {"Retry-After": f"{retry_after:g}"}


def drop_connection(request: web.BaseRequest) -> None:
    """Abort the connection with a TCP reset; aiohttp then fails to write, quietly."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns close into RST: the client sees a reset, not a clean EOF.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return the inclusive byte span a ``Range`` header asks for; None to send it all.

    Raises:
        ValueError: the range cannot be satisfied (answer 416).
    """
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if match is None or match.group(1) == match.group(2) == "":
        return None  # absent, multi-range or malformed: RFC 9110 says ignore it
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0:
            raise ValueError("empty suffix range")
        return max(0, size - suffix), size - 1
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise ValueError("range starts past the end")
    end = size - 1 if last == "" else min(int(last), size - 1)
    return start, end


async def send_bytes(
    request: web.Request, data: bytes, content_type: str, *, truncate: bool = False
) -> web.StreamResponse:
    """Answer with ``data``, honouring ``Range``; ``truncate`` sends half and resets."""
    size = len(data)
    try:
        span = _parse_range(request.headers.get("Range"), size)
    except ValueError:
        return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
    headers = {"Accept-Ranges": "bytes"}
    status, body = 200, data
    if span is not None:
        start, end = span
        status, body = 206, data[start : end + 1]
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if not truncate:
        return web.Response(status=status, body=body, content_type=content_type, headers=headers)
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = content_type
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    drop_connection(request)
    return response


async def apply_fault(
    request: web.Request, fault: FaultSpec, work: Handler, *, is_file: bool = False
) -> web.StreamResponse:
    """Answer ``request`` as ``fault`` says, calling ``work`` only when the fault does the work."""
    kind = fault.kind
    message = STATUS_MESSAGES.get(fault.status, "Error")
    if kind is Fault.SLOW:
        await request.read()  # the request arrived whole: a slow create still makes its task
        await asyncio.sleep(fault.delay)
        return await work(request)
    if kind is Fault.SERVER_ERROR:
        return envelope(fault.status, message, headers=retry_headers(fault.retry_after))
    if kind is Fault.ERROR_IN_200:
        return envelope(fault.status, message, http_status=200)
    if kind is Fault.RESET or (is_file and kind is Fault.RESET_AFTER_CREATE):
        drop_connection(request)
        return web.Response()
    if kind is Fault.RATE_LIMIT:
        raise AssertionError("rate_limit faults are answered before the work")
    if kind is Fault.CORRUPT_FILE:
        return web.Response(status=200, body=CORRUPT_PAGE, content_type="text/html")
    response = await work(request)
    if kind in STATUS_DAMAGES:
        body = response.body if isinstance(response, web.Response) else None
        if response.status != 200 or not isinstance(body, bytes):
            return response  # an error answer (404...) stays as it is
        damaged = damage_status(kind, body, str(request.url.origin()), fault.times)
        return web.Response(status=200, body=damaged, content_type="application/json")
    if kind is Fault.RESET_AFTER_CREATE:
        drop_connection(request)
        return response
    # BROKEN_JSON: the work is done, the answer is cut in half.
    body = response.body if isinstance(response, web.Response) else None
    if not isinstance(body, bytes):
        body = b'{"code":200,"message":"success","data":{}}'
    return web.Response(
        status=200, body=body[: max(1, len(body) // 2)], content_type="application/json"
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer unknown API paths and wrong methods with the JSON envelope too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith(API_PREFIX):
            return envelope(exc.status, exc.reason)
        raise
