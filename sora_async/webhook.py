"""Receive the provider's callbacks: a framework-neutral handler and ready adapters.

The provider POSTs the status envelope to the client's ``callback_url`` when a task
ends, answers must come within 30 s, and nothing is signed. So the handler answers at
once, checks the callback URL's token in constant time (each create's URL carries a
token of its own, an HMAC under the client's secret: see ``_callback_tokens``), and,
unless told to trust a verified callback, confirms a terminal one with one status
request before any waiter sees it. A claim of a task's end that carries another
task's token, or the bare secret, is dropped without a request. Duplicates, late
arrivals and unknown task ids are harmless. Refusals are logged at most once per 10 s,
with a count.

Example (aiohttp)::

    client = sa.SoraClient(callback_url="https://example.com/apixo/callback")
    app = sora_async.webhook.aiohttp_app(client)
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from ._callback_tokens import verify
from ._client import SoraClient
from ._errors import ProtocolError
from ._models import decode_envelope, decode_status

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "MAX_CALLBACK_BYTES",
    "aiohttp_app",
    "callback_path",
    "fastapi_router",
    "handle_callback",
]

logger = logging.getLogger("sora_async")


class _RefusalLog:
    """Log refused callbacks at most once per ``every`` seconds, with a count: a flood
    of junk must not become a flood of log lines (nor spend the CPU to write them)."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._next = 0.0
        self._quiet = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._quiet += 1
            return
        if self._quiet:
            message += f" (and {self._quiet} more refused in the last %gs)"
            args = (*args, self.every)
        self._quiet = 0
        self._next = now + self.every
        logger.warning(message, *args)


_refused = _RefusalLog()

#: Callback bodies are a few hundred bytes; anything far larger is refused unread.
MAX_CALLBACK_BYTES = 64 * 1024


def callback_path(client: SoraClient) -> str:
    """Return the path of the client's ``callback_url`` (where the receiver listens)."""
    if client.callback_url is None:
        raise ValueError("the client has no callback_url: pass SoraClient(callback_url=...)")
    return urlsplit(client.callback_url).path or "/"


def handle_callback(client: SoraClient, body: bytes, token: str | None) -> int:
    """Take one callback and return the HTTP status to answer.

    200: taken (also for duplicates and tasks this client does not know, so the
    provider stops retrying); 403: wrong or missing token; 400: not a status
    envelope; 413: larger than MAX_CALLBACK_BYTES. Never raises for bad input.
    """
    if len(body) > MAX_CALLBACK_BYTES:
        return 413
    secret = client.callback_secret
    nonce: str | None = None
    if secret is not None:
        nonce = verify(secret, token)
        if nonce is None:
            _refused.warning("callback refused: wrong or missing token")
            return 403
    try:
        envelope = decode_envelope(body)
        if envelope.code != 200:
            raise ValueError(f"envelope code {envelope.code}")
        status = decode_status(envelope.data)
    except (msgspec.MsgspecError, ValueError, ProtocolError) as exc:
        _refused.warning("callback refused: not a status envelope (%s)", exc)
        return 400
    trusted = secret is not None and not client.confirm_callbacks
    bound = nonce or None  # the bare secret (LEGACY) is bound to no task
    if not client.announce(status, trusted=trusted, nonce=bound):
        # Another process sharing the key (through Redis) may track it.
        client.governor.share(status, trusted=trusted, nonce=bound)
        logger.info("callback for task %s not tracked here: shared", status.task_id)
    return 200


def aiohttp_app(client: SoraClient) -> web.Application:
    """Return an aiohttp Application that receives callbacks at the callback URL's path."""
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_CALLBACK_BYTES:
            return web.Response(status=413)
        # content.read(n) returns one chunk, not n bytes: read to the end, bounded.
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > MAX_CALLBACK_BYTES:
                return web.Response(status=413)
        status = handle_callback(client, bytes(body), request.query.get("token"))
        return web.Response(status=status)

    app = web.Application(client_max_size=MAX_CALLBACK_BYTES + 1)
    app.router.add_post(callback_path(client), receive)
    return app


def fastapi_router(client: SoraClient) -> Any:
    """Return a FastAPI ``APIRouter`` that receives callbacks at the callback URL's path."""
    from fastapi import APIRouter, Request, Response

    router = APIRouter()

    # A plain Starlette route: FastAPI would read the string annotations (this module
    # uses postponed annotations) in module globals, miss the lazily imported Request,
    # and ask for a query parameter named "request".
    async def receive(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_CALLBACK_BYTES:
            return Response(status_code=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_CALLBACK_BYTES:
                return Response(status_code=413)
        status = handle_callback(client, bytes(body), request.query_params.get("token"))
        return Response(status_code=status)

    router.add_route(callback_path(client), receive, methods=["POST"], include_in_schema=False)
    return router
