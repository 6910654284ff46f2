"""Keys before bodies, bounded bodies and tenants kept apart, for examples/fastapi_app.py.

:class:`Guard` is an ASGI middleware: it checks the app's API key from the request's
headers before anything reads the body (401 without reading it), refuses a body
larger than its limit (413: at once from ``Content-Length``, else as soon as a
chunked body passes the limit) and tells the routes which key was sent, as a
*tenant*: a short hash of the key, never the key. :class:`Tenants` keeps each
tenant's tasks and idempotency keys apart from the others'.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

import sora_async as sa

__all__ = ["TENANT", "Guard", "Tenants", "matching_key", "tenant_of"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TENANT = "sora_app.tenant"  # the scope's entry naming the caller's tenant
MAX_KEY_LENGTH = 255  # the client's own limit on an idempotency key


def tenant_of(key: str) -> str:
    """Return the tenant of app key ``key``: a short hash, safe to log and to store."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def matching_key(offered: Collection[str | None], known: Collection[bytes]) -> bytes | None:
    """Return the known key among ``offered``, compared in constant time, or None.

    Every known key is compared with every offered one: the time taken tells nothing
    of how much of a key was right, nor which key matched.
    """
    found = None
    for given in offered:
        if given is None:
            continue
        for key in known:
            if secrets.compare_digest(given.encode(), key):
                found = key
    return found


def _offered(headers: list[tuple[bytes, bytes]]) -> list[str | None]:
    """Return the keys a request offers: a Bearer token and an ``X-API-Key``."""
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                bearer = credentials.strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1")
    return [bearer, api_key]


async def answer(send: Send, status: int, detail: dict[str, Any], **headers: str) -> None:
    """Send a JSON answer ``{"detail": detail}`` with ``status`` and ``headers``."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for name, value in headers.items():
        raw.append((name.lower().replace("_", "-").encode(), value.encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    """A chunked body passed the limit: the app's reading of it stops here."""


class Guard:
    """Check the app's key before the body is read, and bound every body.

    ``keys``: the keys a caller must send (``Authorization: Bearer <key>`` or
    ``X-API-Key: <key>``); empty: no authentication. ``open_paths``: paths that take
    no key (the callback route authenticates by its own secret). ``max_body``: the
    largest request body in bytes. A request that fails either check is answered
    401 or 413 without its body being read (uvicorn then discards what the caller
    still sends, without keeping it). Routes find the caller's tenant (see
    :func:`tenant_of`) in ``scope[TENANT]``.

    Example::

        app.add_middleware(Guard, keys=["a-key-of-16-chars-or-more"], max_body=262144)
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Collection[str] = (),
        open_paths: Collection[str] = (),
        max_body: int,
    ) -> None:
        self.app = app
        self._known = [key.encode() for key in keys]
        self._tenants = {key.encode(): tenant_of(key) for key in keys}
        self._open = frozenset(open_paths)
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if self._known and scope["path"] not in self._open:
            key = matching_key(_offered(headers), self._known)
            if key is None:
                await answer(send, 401, {"error": "unauthorized"}, WWW_Authenticate="Bearer")
                return
            scope[TENANT] = self._tenants[key]
        length = next((value for name, value in headers if name == b"content-length"), None)
        if length is not None:
            if not length.isdigit():
                await answer(send, 400, {"error": "bad_content_length"})
                return
            if int(length) > self.max_body:
                await self._too_large(send)
                return
        await self._bounded(scope, receive, send)

    async def _too_large(self, send: Send) -> None:
        await answer(send, 413, {"error": "body_too_large", "max_bytes": self.max_body})

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, stopping a (chunked) body at the limit with a 413."""
        read = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal read, over
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_body:
                    over = True
                    raise _TooLarge
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to a body it could not read: ours goes instead
            started = True
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counted, sending)
        if over and not started:
            await self._too_large(send)


class Tenants:
    """Keep each tenant's tasks and idempotency keys apart.

    A caller's ``Idempotency-Key`` is stored as its tenant's (:meth:`key_for`), so
    another tenant's same key is another key: its own new task, and never a 422 that
    tells it the key exists. A POST without a key is given one of its tenant's,
    unless the client resubmits uncertain creates (a key promises one task, so the
    client never resubmits under one): then its task is remembered in memory only,
    for the process's life. :meth:`owns` answers whether a task is a tenant's: from
    memory, else from the client's store (the task's record carries its tenant's key).
    """

    def __init__(self, client: sa.SoraClient, *, keep: int = 100_000) -> None:
        self._client = client
        self._keep = keep
        self._owners: OrderedDict[str, str] = OrderedDict()  # task id -> tenant

    @staticmethod
    def prefix(tenant: str) -> str:
        """Return the start of every idempotency key stored for ``tenant``."""
        return f"tenant-{tenant}:"

    def key_for(self, tenant: str, key: str | None) -> str | None:
        """Return the key to store for ``tenant``'s ``Idempotency-Key`` (made up when
        None, unless the client resubmits uncertain creates). Raises sa.InputError
        for a key the client would refuse (empty, longer than 255 characters)."""
        if key is not None and not key.strip():
            raise sa.InputError("idempotency_key", "must be a non-empty string")
        if key is not None and len(key) > MAX_KEY_LENGTH:
            raise sa.InputError("idempotency_key", f"must be at most {MAX_KEY_LENGTH} characters")
        if key is None:
            if self._client.on_uncertain == "resubmit":
                return None
            key = f"auto-{secrets.token_hex(16)}"
        scoped = self.prefix(tenant) + key
        if len(scoped) > MAX_KEY_LENGTH:  # still the caller's key alone, and its tenant's
            scoped = self.prefix(tenant) + "sha256-" + hashlib.sha256(key.encode()).hexdigest()
        return scoped

    def own_keys(self, tenant: str, keys: list[str]) -> list[str]:
        """Return which of the stored ``keys`` are ``tenant``'s, as the caller sent them
        (a key too long to store whole shows as its hash)."""
        prefix = self.prefix(tenant)
        return [key[len(prefix) :] for key in keys if key.startswith(prefix)]

    def remember(self, tenant: str, task_id: str) -> None:
        """Record that ``task_id`` is ``tenant``'s (the oldest are forgotten past ``keep``)."""
        self._owners[task_id] = tenant
        self._owners.move_to_end(task_id)
        while len(self._owners) > self._keep:
            self._owners.popitem(last=False)

    async def owns(self, tenant: str, task_id: str) -> bool:
        """Return whether ``task_id`` was made by ``tenant`` (here, or recorded in the
        store by an earlier process or another worker)."""
        owner = self._owners.get(task_id)
        if owner is not None:
            return secrets.compare_digest(owner, tenant)
        store = self._client.store
        if store is None:
            return False
        record = await store.find_task(task_id)
        return record is not None and record.key.startswith(self.prefix(tenant))
