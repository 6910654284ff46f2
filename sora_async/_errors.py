"""The exception tree, the one place where service answers become exceptions, and
the one place where a task group's exception group becomes the SoraError it carries."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if sys.version_info < (3, 11):  # the backport anyio itself raises on 3.10
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "APIError",
    "AuthenticationError",
    "BudgetExceededError",
    "ClientClosedError",
    "ContentPolicyError",
    "IdempotencyConflictError",
    "InputError",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "RateLimitError",
    "RedisUnavailableError",
    "ServerError",
    "SoraError",
    "StoreLossError",
    "SubmitUncertainError",
    "TaskAbandonedError",
    "TaskFailedError",
    "TaskTimeoutError",
    "TransportError",
    "error_from_response",
    "sora_error_in",
    "unwrap_sora_errors",
]


class SoraError(Exception):
    """Base class of every error sora-async raises."""


class InputError(SoraError, ValueError):
    """Reject an input locally, before any request is spent.

    ``field`` names the offending field (dotted for nested ones) and ``rule`` says
    what it must satisfy.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class IdempotencyConflictError(InputError):
    """An idempotency key came back with another request than the one it was first
    used with (the IETF draft of the Idempotency-Key header answers this with 422)."""

    def __init__(self, key: str) -> None:
        super().__init__("idempotency_key", f"{key!r} was already used with a different request")
        self.key = key


class StoreLossError(InputError):
    """A task store lost records it held (its ``-wal`` file is gone, or another file
    stands at its path): its tasks and idempotency keys would be created, and paid
    for, again. ``.path`` is the store's file; ``.what`` says what happened.

    Put the missing file back, or open the store with ``accept_loss=True`` to go on
    without those records knowingly.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        super().__init__("store", self.describe("open the store with accept_loss=True"))

    def describe(self, accept: str) -> str:
        """Return the error's rule, saying ``accept`` as the way to accept the loss."""
        return (
            f"{self.path} {self.what}; the tasks and idempotency keys it held would be "
            f"created and paid for again. Put the missing file back, or {accept} to go "
            "on without them knowingly"
        )


class ClientClosedError(SoraError, RuntimeError):
    """Signal use of a :class:`SoraClient` outside its ``async with`` block."""


class APIError(SoraError):
    """Report an error answer from the service.

    ``code`` is the error code (the body's ``code``, else the HTTP status),
    ``message`` the service's message, ``http_status`` the HTTP status as sent and
    ``data`` the envelope's ``data`` (often ``None``).
    """

    def __init__(
        self, code: int, message: str, *, http_status: int | None = None, data: Any = None
    ) -> None:
        detail = f" ({data['error']})" if isinstance(data, dict) and "error" in data else ""
        super().__init__(f"[{code}] {message}{detail}")
        self.code = code
        self.message = message
        self.http_status = http_status
        self.data = data


class AuthenticationError(APIError):
    """The API key is invalid or missing (401): nothing using this key can succeed."""


class PermissionDeniedError(APIError):
    """The key may not do this (403)."""


class NotFoundError(APIError):
    """Unknown task id or model (404)."""


class InsufficientCreditsError(APIError):
    """The key's balance cannot pay for the task (402, or 400 "Insufficient credits")."""


class BudgetExceededError(SoraError):
    """A create was not sent: with it, the spend could pass the client's spend cap.

    ``cap`` is the cap, ``spent`` what was spent or is held by tasks in flight, and
    ``estimate`` this request's high estimate, all in USD. Nothing was sent."""

    def __init__(self, cap: float, spent: float, estimate: float) -> None:
        super().__init__(
            f"spend cap of ${cap:,.2f} reached: ${spent:,.2f} spent or held by tasks in "
            f"flight, and this create may cost up to ${estimate:,.2f}; nothing was sent "
            "(raise the cap to go on)"
        )
        self.cap = cap
        self.spent = spent
        self.estimate = estimate


class ContentPolicyError(APIError):
    """A create was refused because its content violates the provider's policy."""


class InvalidRequestError(APIError):
    """The service refused the parameters (400 and other 4xx)."""


class RateLimitError(APIError):
    """The key's rate or concurrency limit was exceeded (429).

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(
        self,
        code: int,
        message: str,
        *,
        http_status: int | None = None,
        data: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message, http_status=http_status, data=data)
        self.retry_after = retry_after


class ServerError(APIError):
    """The service failed or is unavailable (5xx)."""


class TransportError(SoraError):
    """The network failed, a call timed out, or a body could not be decoded."""


class RedisUnavailableError(SoraError):
    """Report that the shared governor's Redis could not be reached before the deadline.

    No request was sent without a permit: the work waited, then gave up.
    """


class ProtocolError(SoraError):
    """The service answered something that makes no sense for the question asked.

    A status whose ``taskId`` is not the one asked, a success without an absolute
    http(s) result URL, a status without a readable ``state``, a ``resultJson`` that
    is not JSON: none of these is ever turned into a result. ``task_id`` is the task
    asked about, ``problem`` what was wrong with the answer.
    """

    def __init__(self, task_id: str | None, problem: str) -> None:
        about = f"task {task_id}: " if task_id is not None else ""
        super().__init__(f"{about}the service answered nonsense: {problem}")
        self.task_id = task_id
        self.problem = problem


class SubmitUncertainError(SoraError):
    """A create may or may not have made a task, so it was not blindly repeated.

    Raised when the connection broke or timed out after the request was sent, or
    the answer could not be read. Retrying could pay twice; the client's
    ``on_uncertain`` policy decides.
    """


class TaskFailedError(SoraError):
    """The task ended in the ``failed`` state."""

    def __init__(self, task_id: str, fail_code: str | None, fail_msg: str | None) -> None:
        super().__init__(f"task {task_id} failed: {fail_code or 'unknown'}: {fail_msg or ''}")
        self.task_id = task_id
        self.fail_code = fail_code
        self.fail_msg = fail_msg


class TaskTimeoutError(SoraError, TimeoutError):
    """A deadline (``timeout`` seconds) passed before the answer came.

    For ``wait`` and ``generate``, the task had not ended (it is still tracked); for
    ``status``, the service had not answered (the wait for a request permit counts).
    ``task_id`` is None when ``generate``'s deadline passed before a task id existed:
    a create already sent still runs to its end, and a task it made is tracked (its
    slot held) and its id logged, so nothing is paid twice.
    """

    def __init__(self, task_id: str | None, timeout: float) -> None:
        if task_id is None:
            message = f"no task id within {timeout:g} s (a create already sent runs on)"
        else:
            message = f"task {task_id} did not finish within {timeout:g} s"
        super().__init__(message)
        self.task_id = task_id
        self.timeout = timeout


class TaskAbandonedError(TaskTimeoutError):
    """The task outlived ``max_task_age`` seconds of tracking and is no longer followed.

    The task may still run on the service: its slot stays taken for the client's
    ``uncertain_hold`` and is then freed. ``task_id`` names it for a later look.
    """

    def __init__(self, task_id: str, max_age: float) -> None:
        super().__init__(task_id, max_age)
        self.args = (
            f"task {task_id} did not finish within max_task_age ({max_age:g} s); "
            "it is no longer followed",
        )


_CONTENT_WORDS = ("violat", "policy", "nsfw", "sensitive", "moderation")


def _about_content(message: str) -> bool:
    lowered = message.lower()
    return any(word in lowered for word in _CONTENT_WORDS)


def error_from_response(
    http_status: int,
    code: int,
    message: str,
    data: Any = None,
    *,
    retry_after: float | None = None,
) -> APIError:
    """Map an error answer to its exception class.

    The body's ``code`` wins when it names an error (the service may send HTTP 200
    with ``code`` 400); otherwise the HTTP status does.
    """
    effective = code if code >= 400 else http_status
    kwargs: dict[str, Any] = {"http_status": http_status, "data": data}
    lowered = message.lower()
    cls: type[APIError]
    if effective == 429:
        return RateLimitError(effective, message, retry_after=retry_after, **kwargs)
    if effective == 401:
        cls = AuthenticationError
    elif effective == 402 or (effective == 400 and "insufficient" in lowered):
        cls = InsufficientCreditsError
    elif effective == 403:
        cls = ContentPolicyError if _about_content(message) else PermissionDeniedError
    elif effective == 404:
        cls = NotFoundError
    elif effective == 400 and _about_content(message):
        cls = ContentPolicyError
    elif 400 <= effective < 500:
        cls = InvalidRequestError
    elif effective >= 500:
        cls = ServerError
    else:
        cls = APIError
    return cls(effective, message, **kwargs)


def sora_error_in(group: BaseExceptionGroup[BaseException]) -> SoraError | None:
    """Return the SoraError that ``group`` stands for, or None if it stands for more.

    anyio's task groups wrap whatever a child raised in an exception group, even a
    single error. When every leaf of ``group`` (nested groups flattened) is a
    SoraError or a cancellation, and one at least is a SoraError, the first such
    leaf is returned: the leaves of one group share a cause (a Redis outage fails
    every waiting call at once), and the first is the one that stopped the rest.
    Anything else (a bug, the caller's own exception) returns None: the group
    stays, so that nothing is hidden.
    """
    found: SoraError | None = None
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = error.exceptions
        elif isinstance(error, SoraError):
            found = found or error
        elif not isinstance(error, asyncio.CancelledError):
            return None
    return found


@contextlib.contextmanager
def unwrap_sora_errors() -> Iterator[None]:
    """Raise the SoraError an exception group stands for, in place of the group.

    Wraps the task groups behind a public call, so that ``except sa.SoraError``
    subclasses match as documented. The error is raised itself, with its own
    traceback and cause; the group stays reachable as its ``__context__``. A group
    that holds anything else is raised unchanged (see :func:`sora_error_in`).
    """
    try:
        yield
    except BaseExceptionGroup as group:
        error = sora_error_in(group)
        if error is None:
            raise
        # Not "from group": the error keeps its own cause (the Redis error, say), and
        # the group stays reachable as its __context__.
        raise error  # noqa: B904
