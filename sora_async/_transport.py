"""HTTP to the APIXO service: aiohttp, msgspec, retries and error mapping.

The transport knows nothing of task slots. Before every attempt it asks the
governor of the call's model for a permit, and tells it about 429s and successes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp
import msgspec
from multidict import CIMultiDict, CIMultiDictProxy

from ._errors import (
    AuthenticationError,
    ProtocolError,
    RateLimitError,
    ServerError,
    SoraError,
    SubmitUncertainError,
    TransportError,
    error_from_response,
)
from ._governor import Governor, RequestKind
from ._models import CreatedTask, CreateRequest, TaskStatus, decode_envelope, decode_status
from ._priority import Priority
from ._recorder import Recorder

__all__ = ["CreateHooks", "RetryPolicy", "Transport"]

logger = logging.getLogger("sora_async")

T = TypeVar("T")

_created_decoder = msgspec.json.Decoder(CreatedTask)
_balance_decoder = msgspec.json.Decoder(float)
_encoder = msgspec.json.Encoder()
_NULL = msgspec.Raw(b"null")

# 503 means the service turned the request away, so a create certainly made no
# task; any other 5xx may have come after the task was made.
_CREATE_SAFE_STATUSES = frozenset({503})


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried: ``attempts`` in all within ``deadline`` seconds (429s do
    not count against ``attempts``: they are waited out until the deadline).

    Back-off is exponential from ``base`` up to ``cap`` seconds with full jitter;
    ``timeout`` bounds one attempt (connect, send and read).
    """

    attempts: int = 6
    base: float = 0.5
    cap: float = 30.0
    deadline: float = 300.0
    timeout: float = 60.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Return the sleep before retry number ``attempt`` (1-based)."""
        return rng.uniform(0, min(self.cap, self.base * 2 ** (attempt - 1)))


class CreateHooks(Protocol):
    """What a create tells its caller about its bytes, attempt by attempt."""

    async def sending(self) -> None:
        """Awaited once the attempt's permit is granted, just before its bytes leave.

        Whatever it raises stops the create unsent and propagates as it is.
        """

    async def no_task(self) -> None:
        """Awaited when an answer proved that the attempt made no task (429, 503, a
        refused connection), before any wait for the next attempt."""


class _Retry(Exception):
    """An attempt failed in a way that may be retried."""

    def __init__(
        self, cause: Exception, *, wait: float | None = None, refused: bool = False
    ) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.wait = wait
        # True when the request certainly never reached the service.
        self.refused = refused


def _transport_error(message: str, exc: BaseException) -> TransportError:
    error = TransportError(message)
    error.__cause__ = exc
    return error


def _error_data(data: bytes) -> Any:
    """Return an error answer's ``data`` as Python values (None when unreadable)."""
    try:
        return msgspec.json.decode(data)
    except (msgspec.MsgspecError, RecursionError):
        return None


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare; fall back to our own back-off


class Transport:
    """Send the three API calls, each retried by its own rules."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        governor_for: Callable[[str], Governor],
        retry: RetryPolicy,
        seed: int | None = None,
    ) -> None:
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        # Each (key, model) may have its own budget: the model picks the governor.
        self._governor_for = governor_for
        self._retry = retry
        self._random = random.Random(seed)
        self._session: aiohttp.ClientSession | None = None
        # After a 401 nothing that uses the key can succeed: refuse without sending.
        self._key_refused: AuthenticationError | None = None
        self.recorder: Recorder | None = None  # set by sora_async.otel.instrument()
        # Built once: the key goes on API calls only, never on the session, since
        # result URLs may live on another host. Read-only multidicts, which aiohttp
        # takes as they are (a dict it would copy into a new one for every request).
        auth = {"Authorization": f"Bearer {api_key}"}
        self._headers = CIMultiDictProxy(CIMultiDict(auth))
        self._json_headers = CIMultiDictProxy(
            CIMultiDict({**auth, "Content-Type": "application/json"})
        )

    def __repr__(self) -> str:
        return f"Transport(base_url={self._base_url!r})"

    async def open(self) -> None:
        """Open the HTTP session (inside the running loop)."""
        timeout = aiohttp.ClientTimeout(total=self._retry.timeout)
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=100),
        )

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """Return the open session (downloads share its connection pool)."""
        if self._session is None:
            raise RuntimeError("transport is not open")
        return self._session

    # --- the three calls --------------------------------------------------------------

    async def create(
        self,
        model: str,
        request: CreateRequest,
        *,
        hooks: CreateHooks | None = None,
        priority: Priority = "normal",
    ) -> str:
        """Create a task and return its id.

        Retried only where the service certainly made no task (refused connection,
        429, 503). Raises SubmitUncertainError where it may have made one.
        ``hooks`` hear of each attempt: ``sending()`` between its permit and its send,
        ``no_task()`` after an answer that proved it made no task. ``priority`` orders
        the create among those waiting for a permit.
        """
        body = _encoder.encode(request)
        url = f"{self._base_url}/generateTask/{model}"
        started = asyncio.get_running_loop().time()
        try:
            return await self._create_once(model, url, body, hooks, priority, False)
        except _Retry as retry:
            failed = retry
        return await self._with_retries(
            "create", failed, started, self._create_once, model, url, body, hooks, priority
        )

    async def _create_once(
        self,
        model: str,
        url: str,
        body: bytes,
        hooks: CreateHooks | None,
        priority: Priority,
        prepaid: bool,
    ) -> str:
        try:
            raw = await self._send(
                "create", model, "POST", url, body=body, hooks=hooks, priority=priority
            )
        except _Retry as retry:
            cause = retry.cause
            if not (
                retry.refused
                or isinstance(cause, RateLimitError)
                or (isinstance(cause, ServerError) and cause.code in _CREATE_SAFE_STATUSES)
            ):
                raise SubmitUncertainError(f"create may have made a task: {cause}") from cause
            if hooks is not None:
                await hooks.no_task()  # before the wait: no bytes of it are on the wire
            raise
        try:
            return _created_decoder.decode(raw).task_id
        except (msgspec.MsgspecError, RecursionError) as exc:
            raise SubmitUncertainError(
                f"create answered success without a readable task id: {exc}"
            ) from exc

    async def status(self, model: str, task_id: str, *, prepaid: bool = False) -> TaskStatus:
        """Return the status of one task (retried on 429, 5xx, network errors).

        ``prepaid``: the caller already took the governor's permit for the first attempt.
        """
        url = f"{self._base_url}/statusTask/{model}"
        started = asyncio.get_running_loop().time()
        try:
            try:
                return await self._status_once(model, url, task_id, prepaid)
            except _Retry as retry:
                failed = retry
            return await self._with_retries(
                "status", failed, started, self._status_once, model, url, task_id
            )
        except ProtocolError as exc:
            if exc.task_id is not None:
                raise
            raise ProtocolError(task_id, exc.problem) from exc.__cause__

    async def _status_once(self, model: str, url: str, task_id: str, prepaid: bool) -> TaskStatus:
        raw = await self._send(
            "status", model, "GET", url, params={"taskId": task_id}, prepaid=prepaid
        )
        # An answer that reads but makes no sense is not retried here: the
        # scheduler counts such answers per task and gives up after a few.
        return decode_status(raw, task_id)

    async def balance(self, model: str) -> float:
        """Return the key's remaining balance in USD, spending from ``model``'s budget."""
        url = f"{self._base_url}/apikeys/current-balance"
        started = asyncio.get_running_loop().time()
        try:
            return await self._balance_once(model, url, False)
        except _Retry as retry:
            failed = retry
        return await self._with_retries("balance", failed, started, self._balance_once, model, url)

    async def _balance_once(self, model: str, url: str, prepaid: bool) -> float:
        raw = await self._send("balance", model, "GET", url)
        try:
            return _balance_decoder.decode(raw)
        except (msgspec.MsgspecError, RecursionError) as exc:
            raise ProtocolError(None, f"a balance that is not a number ({exc})") from exc

    # --- machinery ----------------------------------------------------------------------

    async def _with_retries(
        self,
        kind: RequestKind,
        retry: _Retry,
        started: float,
        attempt: Callable[..., Awaitable[T]],
        *args: Any,
    ) -> T:
        """Return ``attempt(*args, False)``, called again while it raises _Retry, after a
        first attempt (sent at loop time ``started``) failed with ``retry``.

        The first attempt is the caller's own: a request that succeeds at once (the
        usual case) costs no coroutine of this one.
        """
        loop = asyncio.get_running_loop()
        deadline = started + self._retry.deadline
        number = 0  # failed attempts that count against RetryPolicy.attempts
        while True:
            cause = retry.cause
            if isinstance(cause, RateLimitError):
                # A 429 is the key's traffic, not a fault of this call: the governor
                # pauses everyone and the next permit waits for it; only the
                # deadline bounds how long we keep asking.
                wait = 0.0
            else:
                number += 1
                wait = self._retry.backoff(number, self._random)
                if retry.wait is not None:
                    wait = max(wait, retry.wait)
            if number >= self._retry.attempts or loop.time() + wait > deadline:
                raise cause from cause.__cause__
            logger.info("%s attempt %d failed (%s); retrying in %.2f s", kind, number, cause, wait)
            await asyncio.sleep(wait)
            try:
                return await attempt(*args, False)
            except _Retry as again:
                retry = again

    async def _send(
        self,
        kind: RequestKind,
        model: str,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
        prepaid: bool = False,
        hooks: CreateHooks | None = None,
        priority: Priority = "normal",
    ) -> bytes:
        """Send one attempt and return the envelope's raw ``data``.

        Raises an APIError for a definitive error answer, or _Retry wrapping the
        failure for anything that may be retried. ``hooks.sending()`` is awaited
        between the permit and the send.
        """
        governor = self._governor_for(model)
        recorder = self.recorder
        waited = 0.0
        if self._key_refused is None and not prepaid:
            if recorder is None:
                await governor.request(kind, priority)
            else:
                asked = asyncio.get_running_loop().time()
                await governor.request(kind, priority)
                waited = asyncio.get_running_loop().time() - asked
        if self._key_refused is not None:
            raise self._key_refused
        if hooks is not None:
            await hooks.sending()
        outcome = "ok"
        try:
            # The exchange in this coroutine, not one of its own: one fewer per request.
            headers = self._headers if body is None else self._json_headers
            loop = asyncio.get_running_loop()
            sent = loop.time()
            try:
                async with self.session.request(
                    method, url, data=body, params=params, headers=headers
                ) as response:
                    # The request reached the service before its answer began.
                    governor.request_took(loop.time() - sent)
                    payload = await response.read()
            except aiohttp.ClientConnectorError as exc:
                error = _transport_error(f"cannot connect: {exc}", exc)
                raise _Retry(error, refused=True) from exc
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # It may have reached the service at any time until now.
                governor.request_took(loop.time() - sent)
                message = f"{type(exc).__name__}: {exc}".rstrip(": ")
                raise _Retry(_transport_error(message, exc)) from exc
            except asyncio.CancelledError:
                # Given up on mid-way: when (or whether) it arrives is unknown.
                governor.request_took(math.inf)
                raise
            return self._answer(kind, governor, response, payload)
        except _Retry as retry:
            outcome = _outcome(retry.cause)
            raise
        except SoraError as error:
            outcome = _outcome(error)
            raise
        finally:
            if recorder is not None:
                recorder.request(kind, model, outcome, waited)

    def _answer(
        self,
        kind: RequestKind,
        governor: Governor,
        response: aiohttp.ClientResponse,
        payload: bytes,
    ) -> bytes:
        """Return an answer's raw ``data``, or raise as _send says."""
        status = response.status
        try:
            envelope = decode_envelope(payload)
            code, message, data = envelope.code, envelope.message, envelope.data
        except msgspec.MsgspecError as exc:
            if status < 400:
                # Likely cut short on the way (a GET is safe to repeat); if every try
                # reads so, the service is answering nonsense.
                unreadable = ProtocolError(None, f"an unreadable body (HTTP {status})")
                unreadable.__cause__ = exc
                raise _Retry(unreadable) from exc
            code, message, data = status, f"HTTP {status} with an undecodable body", _NULL
        if not 200 <= code < 300 or status >= 400:
            retry_after = _retry_after(response.headers)
            error = error_from_response(
                status, code, message, _error_data(data), retry_after=retry_after
            )
            if isinstance(error, RateLimitError):
                governor.rate_limited(kind, error.retry_after)
                raise _Retry(error, wait=error.retry_after)
            if isinstance(error, ServerError):
                raise _Retry(error, wait=retry_after)
            if isinstance(error, AuthenticationError):
                self._key_refused = error
            raise error
        governor.request_succeeded(kind)
        return bytes(data)


def _outcome(error: BaseException) -> str:
    """Name a failed attempt's outcome for metrics: "rate_limited" or the error's class."""
    return "rate_limited" if isinstance(error, RateLimitError) else type(error).__name__
