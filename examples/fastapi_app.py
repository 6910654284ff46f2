"""Serve Sora 2 Pro generations from FastAPI: one SoraClient for the app's whole life.

    APIXO_API_KEY=... APIXO_CALLBACK_URL=https://my.host/apixo/callback \\
    APIXO_CALLBACK_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') \\
    SORA_APP_API_KEYS=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') \\
        uvicorn examples.fastapi_app:app --timeout-graceful-shutdown 10

Routes (all but the callback route require one of the app's API keys, sent as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; 401 without a right one,
checked before the body is read; every body is at most ``SORA_APP_MAX_BODY`` bytes, 413
above it: see :mod:`examples.app_guard`). Each API key is a tenant: its idempotency
keys and tasks are its own, and another tenant's task is 404, as an unknown one:

- ``POST /videos`` with a JSON body ``{"prompt": ..., "duration": 10, "size": "1280*720"}``
  starts a generation and answers ``{"task_id": ...}`` (422 names a bad field). With an
  ``Idempotency-Key`` header (1 to 255 characters) the same key answers the same task
  and never creates twice, across restarts with a store: a caller that gave up
  waiting sends the same request with the same key again and gets its task. The same
  key with another body is 422, as the IETF draft of the header says. A key whose
  create reached the service but whose answer was lost (a timeout, a reset, or the app
  killed while the create was on the wire) answers 409 ``{"error": "uncertain",
  "idempotency_key": ..., "release": "POST /videos/release", "message": ...}``: a task
  may exist and be billed, so it is not sent again.
- ``POST /videos/release`` with the ``Idempotency-Key`` header of an uncertain key
  releases it: the next ``POST /videos`` with that key creates a task, knowingly (it
  may pay twice). 404 ``not_uncertain`` for a key that is not uncertain.
- ``GET /videos/{task_id}?timeout=60`` waits up to ``timeout`` seconds and answers
  ``{"task_id", "url", "urls"}``; 504 if the video is not ready by then (ask again: the
  task goes on), 502 with the ``fail_code`` if the generation failed, 404 for an
  unknown task id.
- ``GET /status`` answers :meth:`SoraClient.snapshot` as JSON: slots in use and their
  limit, requests in the window and its limit, rate factor, 429s seen, creates waiting
  for a slot, tasks in flight, learned generation times, polls per finished task and
  callback loss (null without APIXO_CALLBACK_URL), for the default model and under
  ``models`` for each model used (with Redis: the key's figures, summed over every
  worker), and ``uncertain_keys``: the idempotency keys that answer 409 ``uncertain``.
- ``POST`` at the path of ``APIXO_CALLBACK_URL`` (when set) receives the provider's
  callbacks, so a finished task is known at once instead of at the next poll. It takes
  no API key: the provider sends none, and the callback secret in its URL
  authenticates it (403 without it).

Environment: ``APIXO_API_KEY`` (required), ``APIXO_BASE_URL`` (default: the public
service), ``APIXO_CALLBACK_URL`` (optional: without it the client polls),
``APIXO_CALLBACK_SECRET``, ``SORA_ASYNC_REDIS_URL`` and ``APIXO_WORKERS`` (see below),
``SORA_ASYNC_STORE`` (a SQLite file recording every task: a restarted app adopts the
tasks still running and keeps idempotency keys; with ``SORA_ASYNC_REDIS_URL`` the
records live in Redis instead, shared by every worker; a store that is damaged, or
that lost records (its ``-wal`` deleted after a kill, a new file at its path) stops the
start with one line: ``SORA_ASYNC_STORE_ACCEPT_LOSS=1`` starts on it knowingly),
``APIXO_SPEND_CAP`` (USD: a create that could take the estimated spend past it is not
sent, and the caller gets 503 ``spend_cap``; with Redis, one budget for every worker),
``APIXO_LIMITS`` (the key's limits as ``requests/period/concurrent_tasks``, default
``60/60/10``: set it if your plan differs, or to test against a time-compressed fake),
``SORA_ASYNC_SHARED_BUDGET=1`` (every model spends one budget, the default model's:
for a key whose limits span all its models; default: each model its own),
and the client's policies, each optional (a bad value stops the app at start with the
variable named):

=============================  ======================================================
``APIXO_POLL_INTERVAL``        fewest seconds between two polls of one task (2; with
                               callbacks on, polling is only a safety net)
``APIXO_POLL_PRIOR_MEAN``      expected generation seconds before any is seen (180)
``APIXO_WAIT_TIMEOUT``         default deadline of a wait, seconds (3600)
``APIXO_REQUEST_TIMEOUT``      one HTTP attempt's timeout, seconds (60)
``APIXO_RETRY_DEADLINE``       how long one call keeps retrying, seconds (300)
``APIXO_UNCERTAIN_HOLD``       seconds a slot stays taken after an uncertain create (600)
``APIXO_ON_UNCERTAIN``         ``raise`` (never pay twice) or ``resubmit`` (raise)
``APIXO_MAX_DOWNLOAD_BYTES``   largest result file accepted (2 GiB)
``APIXO_RESERVED_SLOTS``       slots kept from lower priorities (a batch on the same
                               key) for the app's requests, which are interactive
                               (1; ``0`` for none); lent to them after 600 s with
                               no request
=============================  ======================================================

The app's own settings, checked at start like the client's:

=============================  ======================================================
``SORA_APP_API_KEYS``          the keys callers must send, comma-separated, each at
                               least 16 characters (make them with
                               ``secrets.token_urlsafe(32)``)
``SORA_APP_AUTH``              ``on`` (default) or ``off``. Without keys the app
                               refuses to start unless ``SORA_APP_AUTH=off`` says
                               that the routes may be open (say, behind a proxy that
                               authenticates); ``off`` with keys set is refused too
``SORA_APP_LOG_REPEAT``        seconds between two log lines of one repeated warning
                               or error (10): the first goes through at once, later
                               ones are counted and summarised once per period
``SORA_APP_MAX_BODY``          the largest request body in bytes, on every route
                               (262144); a larger one is answered 413 unread
``SORA_APP_DOCS``              ``1`` serves ``/docs``, ``/redoc`` and ``/openapi.json``
                               (without a key); default ``0``: they do not exist
=============================  ======================================================

Shutdown: on SIGTERM or SIGINT (the app chains its own handler before uvicorn's),
every ``GET /videos/{id}`` still waiting answers at once 503 ``{"error":
"shutting_down", "task_id": ...}`` with ``Retry-After``, a ``POST /videos`` whose
create was not sent (it waits for a task slot, a request permit or a retry) answers 503
with ``Retry-After`` (no task was made for it; with a store its key stays ``queued`` and
creates once when sent again), and a create already sent runs to its end and answers
its task id. The tasks go on at the service; the app logs the ids of those still
running, then closes its client. With a store they stay recorded, and the next process
adopts them: it holds their slots and polls them. The store also keeps the times of
the requests sent in the last window, so the next process waits for the window its
predecessor spent (killed or stopped) instead of earning 429s. Run uvicorn with
``--timeout-graceful-shutdown`` so that no request can hold the exit up for long.

Logs: the callback secret never reaches a log. uvicorn's access log prints every
request's query string, the callback's ``?token=`` included: a filter on uvicorn's and
this app's loggers (and their handlers) replaces every ``token=`` value and the secret
itself with ``***``. A warning or error repeated many times a second (a traceback
per refused ``accept()`` when the process runs out of file descriptors) is logged
once, then summarised once per ``SORA_APP_LOG_REPEAT`` seconds with its count, and
the accept loop retries once a second, without spinning (:mod:`examples.app_accept`).

Running several workers (``uvicorn --workers N``, gunicorn, several pods): the key's
limits (60 requests a minute, 10 unfinished tasks) are per API key, not per process.
N workers each governing alone would together send N times too many requests, hold N
times too many tasks, and earn 429s. Set ``SORA_ASYNC_REDIS_URL=redis://host:6379/0``
(and install ``sora-async[redis]``): every worker then takes its requests and task
slots from one budget in Redis (``sa.RedisGovernor``; each model's own budget, every
one on Redis, or one for all with ``SORA_ASYNC_SHARED_BUDGET=1``), any worker may use
every slot, and the tasks of a worker that dies are adopted by another. Without Redis, run one
worker (one asyncio process serves thousands of waiting requests), or give each of N
workers 1/N of the limits (set ``APIXO_WORKERS=N``; ``10 // 4`` leaves 2 slots a
worker, 8 of 10 in all, and an idle worker's share is wasted).

Metrics for Prometheus: install ``sora-async[otel]``, ``opentelemetry-sdk`` and
``opentelemetry-exporter-prometheus``, then in ``lifespan`` after ``async with client``::

    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server
    import sora_async.otel

    start_http_server(9464)  # Prometheus scrapes http://host:9464/metrics
    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    sora_async.otel.instrument(client, meter_provider=provider)

Prometheus then shows ``sora_async_slots_usage``, ``sora_async_requests_rate_limited_total``,
``sora_async_generation_duration_seconds`` and the rest (see :mod:`sora_async.otel`).

Callbacks with several workers: a callback lands on whichever worker the load balancer
picks, and ``GET /videos/{id}`` may wait in another one than the worker that created
the task. The callback secret must be the same for every worker: set
``APIXO_CALLBACK_SECRET``, or each worker makes up its own and refuses (403) the
callbacks of tasks its siblings created (with Redis this app refuses to start without
it). With Redis, the worker that receives a callback publishes it, and the worker
whose caller waits wakes at once; without Redis a worker that does not track the task
answers 200 and ignores it, and the waiter's polling safety net finds the end later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from types import FrameType
from typing import Annotated, Any

import anyio
import msgspec
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import sora_async as sa
import sora_async.webhook
from examples.app_accept import back_off_accept
from examples.app_guard import TENANT, Guard, Tenants, matching_key
from examples.app_logs import RedactSecrets, SummariseRepeats, install_log_guards

__all__ = [
    "AppSettings",
    "ClientFactory",
    "RedactSecrets",
    "Shutdown",
    "SummariseRepeats",
    "VideoIn",
    "app_settings_from_env",
    "client_from_env",
    "create_app",
    "install_log_guards",
]

logger = logging.getLogger("sora_async.examples.fastapi_app")

ClientFactory = Callable[[], sa.SoraClient]

RETRY_AFTER = 5  # seconds a caller should wait after a 503 of a shutdown: a restart
MIN_KEY_LENGTH = 16


def _number(name: str, *, whole: bool = False) -> Any:
    """Return environment variable ``name`` as a positive number, or None when unset."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = -1
    if value <= 0:
        kind = "whole number" if whole else "number"
        raise sa.InputError(name, f"must be a positive {kind}, got {raw!r}")
    return value


def _count(name: str, *, default: int) -> int:
    """Return environment variable ``name`` as a whole number, 0 or more (unset: default)."""
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise sa.InputError(name, f"must be a whole number, 0 or more, got {raw!r}")
    return int(raw)


def _flag(name: str) -> bool:
    """Return environment variable ``name`` as a yes / no (unset: no)."""
    raw = (os.environ.get(name) or "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise sa.InputError(name, f"must be 1 or 0 (true or false), got {raw!r}")


def _given(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def client_from_env() -> sa.SoraClient:
    """Build the client from the environment (see the module docstring).

    Raises ValueError (sa.InputError for the client's policies) naming the variable
    when one is set to a bad value.
    """
    limits = _limits_from_env()
    callback_url = os.environ.get("APIXO_CALLBACK_URL") or None
    secret = os.environ.get("APIXO_CALLBACK_SECRET") or None
    redis_url = os.environ.get("SORA_ASYNC_REDIS_URL") or None
    store_path = os.environ.get("SORA_ASYNC_STORE") or None
    governor: sa.Governor | None = None
    # The app's requests are interactive: a batch on the same key leaves them a slot.
    reserved = _count("APIXO_RESERVED_SLOTS", default=1)
    accept_loss = _flag("SORA_ASYNC_STORE_ACCEPT_LOSS")
    store: sa.TaskStore | None = (
        sa.SQLiteStore(store_path, accept_loss=accept_loss) if store_path else None
    )
    if store is None and redis_url is None:
        logger.warning(
            "SORA_ASYNC_STORE is unset: a restart forgets the tasks in flight (their slots "
            "too) and the idempotency keys"
        )
    if redis_url is not None:
        if callback_url is not None and secret is None:
            raise ValueError("APIXO_CALLBACK_SECRET is required with SORA_ASYNC_REDIS_URL")
        # One budget for every worker: each may use all of the key's limits, and one
        # record of every task, so that an idempotency key holds on any worker.
        governor = sa.RedisGovernor(
            redis_url, limits=limits, reserved=min(reserved, limits.concurrent_tasks - 1)
        )
        store = sa.RedisStore(redis_url)
    else:
        workers = _number("APIXO_WORKERS", whole=True) or 1
        limits = sa.Limits(
            requests=max(2, limits.requests // workers),
            period=limits.period,
            concurrent_tasks=max(1, limits.concurrent_tasks // workers),
        )
        if callback_url is not None and secret is None and workers > 1:
            logger.warning("APIXO_CALLBACK_SECRET is unset: each worker will refuse the others'")
        governor = sa.LocalGovernor(limits, reserved=min(reserved, limits.concurrent_tasks - 1))
    retry = sa.RetryPolicy(
        **_given(timeout=_number("APIXO_REQUEST_TIMEOUT"), deadline=_number("APIXO_RETRY_DEADLINE"))
    )
    poll = sa.PollPolicy(
        **_given(
            prior_mean=_number("APIXO_POLL_PRIOR_MEAN"),
            min_interval=_number("APIXO_POLL_INTERVAL"),
        )
    )
    on_uncertain = os.environ.get("APIXO_ON_UNCERTAIN") or None
    if on_uncertain not in (None, "raise", "resubmit"):
        rule = f"must be raise or resubmit, got {on_uncertain!r}"
        raise sa.InputError("APIXO_ON_UNCERTAIN", rule)
    return sa.SoraClient(
        limits=limits,
        governor=governor,
        # Each other model's governor is made by this one: on Redis too when it is.
        shared_budget=_flag("SORA_ASYNC_SHARED_BUDGET"),
        store=store,
        callback_url=callback_url,
        callback_secret=secret,
        retry=retry,
        poll_policy=poll,
        **_given(
            wait_timeout=_number("APIXO_WAIT_TIMEOUT"),
            uncertain_hold=_number("APIXO_UNCERTAIN_HOLD"),
            on_uncertain=on_uncertain,
            max_download_bytes=_number("APIXO_MAX_DOWNLOAD_BYTES", whole=True),
            spend_cap=_number("APIXO_SPEND_CAP"),
        ),
        # With Redis the cap is one budget for every worker and host of the key.
        spend_scope="service",
    )


def _limits_from_env() -> sa.Limits:
    """Read ``APIXO_LIMITS`` (``requests/period/concurrent_tasks``), default sa.Limits()."""
    text = os.environ.get("APIXO_LIMITS")
    if not text:
        return sa.Limits()
    try:
        requests, period, slots = text.split("/")
        return sa.Limits(requests=int(requests), period=float(period), concurrent_tasks=int(slots))
    except ValueError as exc:
        raise ValueError(
            f"APIXO_LIMITS must be requests/period/concurrent_tasks, like 60/60/10: {exc}"
        ) from exc


@dataclasses.dataclass(frozen=True, kw_only=True)
class AppSettings:
    """The app's own settings (the client's come from :func:`client_from_env`).

    ``api_keys``: the keys a caller must send; empty only when ``auth`` is False.
    ``log_repeat``: seconds between two log lines of one repeated warning or error.
    ``max_body``: the largest request body in bytes (413 above it, unread).
    ``docs``: serve ``/docs``, ``/redoc`` and ``/openapi.json`` (without a key).
    """

    api_keys: tuple[str, ...] = ()
    auth: bool = True
    log_repeat: float = 10.0
    max_body: int = 256 * 1024
    docs: bool = False

    def __post_init__(self) -> None:
        if self.auth and not self.api_keys:
            raise ValueError(
                "SORA_APP_API_KEYS is unset: give the app's API keys (comma-separated), "
                "or set SORA_APP_AUTH=off to serve the routes without authentication"
            )
        if not self.auth and self.api_keys:
            raise ValueError("SORA_APP_AUTH=off contradicts SORA_APP_API_KEYS: unset one")
        for key in self.api_keys:
            if len(key) < MIN_KEY_LENGTH or not key.isascii() or not key.isprintable():
                raise ValueError(
                    f"SORA_APP_API_KEYS: each key must be at least {MIN_KEY_LENGTH} printable "
                    f"ASCII characters (one is {len(key)} long)"
                )
        if not self.log_repeat > 0:
            raise ValueError(f"SORA_APP_LOG_REPEAT must be a positive number: {self.log_repeat}")
        if not self.max_body > 0:
            raise ValueError(f"SORA_APP_MAX_BODY must be a positive number: {self.max_body}")


def app_settings_from_env() -> AppSettings:
    """Read the app's settings from the environment (see the module docstring).

    Raises ValueError naming the variable when one is set to a bad value, or when no
    API key is set and ``SORA_APP_AUTH=off`` does not say the routes may be open.
    """
    auth = (os.environ.get("SORA_APP_AUTH") or "on").strip().lower()
    if auth not in ("on", "off"):
        raise ValueError(f"SORA_APP_AUTH must be on or off, got {auth!r}")
    keys = os.environ.get("SORA_APP_API_KEYS") or ""
    return AppSettings(
        api_keys=tuple(key.strip() for key in keys.split(",") if key.strip()),
        auth=auth == "on",
        docs=_flag("SORA_APP_DOCS"),
        **_given(
            log_repeat=_number("SORA_APP_LOG_REPEAT"),
            max_body=_number("SORA_APP_MAX_BODY", whole=True),
        ),
    )


# --- shutdown --------------------------------------------------------------------------------


class _Refused(Exception):
    """A create not sent: the app began to shut down while it waited for a slot, a
    request permit or a retry."""


@dataclasses.dataclass(eq=False)
class _Post:
    """A ``POST /videos`` in progress: cancellable until its create is sent."""

    scope: anyio.CancelScope
    sending: bool = False


class Shutdown:
    """Know that the server was told to stop, before it waits for open requests.

    uvicorn waits for every open request to end before the lifespan's shutdown, so a
    waiter with a long timeout would hold the exit for minutes. :meth:`watch_signals`
    puts a handler of SIGTERM and SIGINT in front of the server's own: it ends the
    waiting requests at once, then calls the server's handler.
    """

    def __init__(self) -> None:
        self.stopping = False
        self.waiters: set[anyio.CancelScope] = set()
        self.posts: set[_Post] = set()
        self._restore: dict[int, Any] = {}

    def begin(self) -> None:
        """Stop waiters and the creates not yet sent (in the event loop's thread)."""
        if self.stopping:
            return
        self.stopping = True
        unsent = [post for post in self.posts if not post.sending]
        if self.waiters or unsent:
            logger.warning(
                "shutting down: %d waiting GETs and %d POSTs not sent (waiting for a slot or a "
                "request permit) answer 503",
                len(self.waiters),
                len(unsent),
            )
        for scope in [*self.waiters, *(post.scope for post in unsent)]:
            scope.cancel()

    def watch_signals(self) -> None:
        """Chain a handler of SIGTERM and SIGINT before the one the server installed.

        Only where a Python handler is installed (uvicorn installs its own with
        ``signal.signal``), and only in the main thread (elsewhere signals cannot be
        watched; shutdown then begins at the lifespan's end).
        """
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(number)
            if not callable(previous):
                continue

            def chained(
                signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous
            ) -> None:
                loop.call_soon_threadsafe(self.begin)
                previous(signum, frame)

            signal.signal(number, chained)
            self._restore[number] = (chained, previous)

    def restore_signals(self) -> None:
        """Put back the server's handlers, unless someone replaced ours meanwhile."""
        for number, (chained, previous) in self._restore.items():
            if signal.getsignal(number) is chained:
                signal.signal(number, previous)
        self._restore.clear()


# --- the routes --------------------------------------------------------------------------------


class VideoIn(BaseModel):
    """The body of ``POST /videos``: a text-to-video request (checked by sa.TextToVideo)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    duration: int | None = None
    size: str | None = None


def _invalid(where: str, exc: sa.InputError, *, field: str | None = None) -> RequestValidationError:
    """Return a 422 in FastAPI's own shape, naming the offending field (``field``, else
    the error's own)."""
    return RequestValidationError(
        [{"loc": (where, field or exc.field), "msg": exc.rule, "type": "value_error"}]
    )


def _error(status: int, headers: dict[str, str] | None = None, **detail: Any) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _shutting_down(**detail: Any) -> JSONResponse:
    return _error(503, {"Retry-After": str(RETRY_AFTER)}, error="shutting_down", **detail)


RELEASE_ROUTE = "/videos/release"


def _uncertain(exc: sa.SubmitUncertainError, key: str | None) -> JSONResponse:
    """Answer a create that may have made a task nobody can name: never a 5xx that
    invites a retry (a retry may pay twice)."""
    if key is None:
        message = (
            "the create reached the service but its answer was lost: a task may exist and "
            "be billed, and its id is unknown. Sending this POST again may pay twice; send "
            "an Idempotency-Key to be safe"
        )
        return _error(502, error="uncertain", message=message)
    message = (
        "the create for this Idempotency-Key reached the service but its answer was lost "
        "(a timeout, a reset, or the app stopped while it was on the wire): a task may "
        "exist and be billed, and its id is unknown, so it is not sent again. To create "
        f"it anyway (it may pay twice): POST {RELEASE_ROUTE} with this Idempotency-Key, "
        "then send this POST again. GET /status lists these keys under uncertain_keys"
    )
    return _error(
        409,
        error="uncertain",
        idempotency_key=key,
        state="uncertain",
        release=f"POST {RELEASE_ROUTE}",
        message=message,
    )


def _service_error(exc: sa.SoraError) -> JSONResponse:
    """Map an error of the video service to an answer for our own caller."""
    if isinstance(exc, sa.TaskTimeoutError):
        return _error(504, error="not_ready", task_id=exc.task_id, timeout=exc.timeout)
    if isinstance(exc, sa.TaskFailedError):
        return _error(
            502, error="failed", task_id=exc.task_id, fail_code=exc.fail_code, fail_msg=exc.fail_msg
        )
    if isinstance(exc, sa.ContentPolicyError):
        return _error(400, error="content_policy", message=exc.message)
    if isinstance(exc, sa.InsufficientCreditsError):
        return _error(503, error="insufficient_credits")
    if isinstance(exc, sa.BudgetExceededError):
        return _error(503, error="spend_cap", cap=exc.cap, spent=exc.spent, estimate=exc.estimate)
    # The service refused, failed or could not be reached: a bad gateway for us.
    logger.warning("video service error: %s", exc)
    return _error(502, error="upstream", message=str(exc))


# At module level: FastAPI reads the (postponed) annotations in the module's globals.
_BEARER = HTTPBearer(auto_error=False, description="one of the app's API keys")
_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="or in this header")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
KeyHeader = Annotated[str | None, Depends(_KEY_HEADER)]


def _tenant(request: Request) -> str | None:
    """Return the caller's tenant (the Guard found its key), None without keys."""
    tenant: str | None = request.scope.get(TENANT)
    return tenant


Tenant = Annotated[str | None, Depends(_tenant)]


def _key_checker(keys: Collection[str]) -> Callable[..., Any]:
    """Return a FastAPI dependency that answers 401 unless one of ``keys`` is sent."""
    known = [key.encode() for key in keys]

    async def require_key(credentials: Bearer, api_key: KeyHeader) -> None:
        # The Guard middleware checked it before the body was read; this states the
        # routes' security in the OpenAPI schema, and checks again.
        offered = [credentials.credentials if credentials else None, api_key]
        if matching_key(offered, known) is None:
            raise HTTPException(
                401, {"error": "unauthorized"}, headers={"WWW-Authenticate": "Bearer"}
            )

    return require_key


def create_app(
    client_factory: ClientFactory | None = None,
    *,
    api_keys: Collection[str] | None = None,
    settings: AppSettings | None = None,
) -> FastAPI:
    """Return the app; ``client_factory`` builds its one SoraClient (default: from env).

    ``api_keys``: the keys callers must send (default: ``settings``, else from the
    environment, see :func:`app_settings_from_env`). The client is built now (the
    callback route needs its URL) and opened, once, for the app's life by the
    lifespan. Raises ValueError naming the variable for a bad setting.
    """
    if isinstance(api_keys, str):
        raise ValueError("api_keys must be a collection of keys, not one string")
    if api_keys is not None:
        base = settings or AppSettings(auth=False)
        settings = dataclasses.replace(base, api_keys=tuple(api_keys), auth=True)
    elif settings is None:
        settings = app_settings_from_env()
    client = (client_factory or client_from_env)()
    shutdown = Shutdown()
    created: set[str] = set()  # task ids made here, to name those still running at exit
    failed_start: list[str] = []  # the one line a failed start-up logs

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redact = RedactSecrets([client.callback_secret or "", *settings.api_keys])
        remove_log_guards = install_log_guards(redact, SummariseRepeats(settings.log_repeat))
        restore_accept = back_off_accept(asyncio.get_running_loop())  # before uvicorn listens
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(remove_log_guards)
            stack.callback(restore_accept)
            try:
                await stack.enter_async_context(client)
            except sa.SoraError as exc:  # a damaged store, Redis unreachable, ...
                failed_start.append(_start_error(exc))
                raise
            shutdown.watch_signals()
            try:
                yield
            finally:
                shutdown.restore_signals()
                shutdown.begin()
                running = sorted(task_id for task_id in created if _running(client, task_id))
                if running:
                    # They go on at the service, and are billed: say which they are.
                    logger.warning(
                        "%d tasks still running at exit%s: %s",
                        len(running),
                        " (recorded: the next process adopts them)" if client.store else "",
                        running,
                    )

    docs = settings.docs  # off unless asked for: no schema for strangers
    app = FastAPI(
        title="Sora 2 Pro videos",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_middleware(_StartupInOneLine, lines=failed_start)
    app.state.client = client
    app.state.shutdown = shutdown
    open_paths = {path for path in (app.docs_url, app.redoc_url, app.openapi_url) if path}
    if client.callback_url is not None:
        app.include_router(sora_async.webhook.fastapi_router(client))
        open_paths.add(sora_async.webhook.callback_path(client))
    # Keys before bodies: checked from the headers before anything reads the body.
    app.add_middleware(
        Guard,
        keys=settings.api_keys if settings.auth else (),
        open_paths=open_paths,
        max_body=settings.max_body,
    )
    guarded = [Depends(_key_checker(settings.api_keys))] if settings.auth else []
    tenants = Tenants(client)

    @app.exception_handler(sa.SoraError)
    async def on_sora_error(request: Request, exc: sa.SoraError) -> JSONResponse:
        return _service_error(exc)

    @app.post("/videos", dependencies=guarded, response_model=None)
    async def start_video(
        body: VideoIn,
        tenant: Tenant,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> dict[str, str] | JSONResponse:
        """Start a generation and return its task id (waits for a free task slot);
        a repeated ``Idempotency-Key`` of the same caller answers the task made for it."""
        try:
            request = sa.TextToVideo(**body.model_dump(exclude_none=True))
        except sa.InputError as exc:
            raise _invalid("body", exc) from exc
        given_key = idempotency_key  # as the caller sent it, for the caller's eyes
        if tenant is not None:  # its keys, not another caller's
            try:
                idempotency_key = tenants.key_for(tenant, idempotency_key)
            except sa.InputError as exc:
                raise _invalid("header", exc, field="Idempotency-Key") from exc
        if shutdown.stopping:
            return _shutting_down()
        post = _Post(anyio.CancelScope())

        async def sending() -> None:
            # Awaited once the permit is granted, just before each send of the create.
            if shutdown.stopping:
                raise _Refused  # the slot goes back; nothing was sent
            post.sending = True  # from here on, shutdown lets the create finish

        async def no_task() -> None:
            # The send made no task (a 429, a 503): its retry waits, unsent.
            post.sending = False
            if shutdown.stopping:
                post.scope.cancel()

        shutdown.posts.add(post)
        task_id = None
        try:
            with post.scope:
                task_id = await client.submit(
                    request,
                    idempotency_key=idempotency_key,
                    # A user waits at a screen: before any batch's creates on the key.
                    priority="interactive",
                    before_create=sending,
                    after_no_task=no_task,
                )
        except _Refused:
            pass
        except sa.SubmitUncertainError as exc:
            return _uncertain(exc, given_key)
        except sa.IdempotencyConflictError as exc:  # named as the caller sent it
            conflict = sa.InputError("idempotency_key", "was already used with another body")
            raise _invalid("header", conflict, field="Idempotency-Key") from exc
        except sa.InputError as exc:  # the key: malformed
            raise _invalid("header", exc, field="Idempotency-Key") from exc
        finally:
            shutdown.posts.discard(post)
        if task_id is None:
            return _shutting_down()
        if tenant is not None:
            tenants.remember(tenant, task_id)
        created.add(task_id)
        if len(created) > 1000:  # forget the ended ones now and then
            created.intersection_update([t for t in created if _running(client, t)])
        return {"task_id": task_id}

    @app.post(RELEASE_ROUTE, dependencies=guarded, response_model=None)
    async def release_key(
        tenant: Tenant,
        idempotency_key: Annotated[str, Header(alias="Idempotency-Key")],
    ) -> dict[str, str] | JSONResponse:
        """Release an uncertain key of the caller's: the next ``POST /videos`` with it
        creates a task, although its earlier create may have made one (it may pay
        twice). Another caller's key is not found."""
        try:
            stored = idempotency_key
            if tenant is not None:
                stored = tenants.key_for(tenant, idempotency_key) or idempotency_key
            released = await client.release_key(stored)
        except sa.InputError as exc:
            raise _invalid("header", exc, field="Idempotency-Key") from exc
        if not released:
            return _error(404, error="not_uncertain", idempotency_key=idempotency_key)
        return {
            "released": idempotency_key,
            "message": "the next POST /videos with this key creates a task (it may pay twice)",
        }

    @app.get("/status", dependencies=guarded)
    async def status(tenant: Tenant) -> Response:
        """Return the client's snapshot (its governors' and schedulers' figures now) and
        the caller's idempotency keys whose create is uncertain (``uncertain_keys``)."""
        figures = msgspec.to_builtins(client.snapshot())
        try:
            keys = await client.uncertain_keys()
            figures["uncertain_keys"] = keys if tenant is None else tenants.own_keys(tenant, keys)
        except sa.SoraError as exc:  # the store cannot be read (or the client is closed)
            logger.warning("status: cannot list the uncertain keys: %s", exc)
            figures["uncertain_keys"] = None
        return Response(msgspec.json.encode(figures), media_type="application/json")

    @app.get("/videos/{task_id}", dependencies=guarded, response_model=None)
    async def get_video(
        task_id: str, tenant: Tenant, timeout: Annotated[float, Query(gt=0, le=3600)] = 60.0
    ) -> dict[str, Any] | JSONResponse:
        """Wait up to ``timeout`` seconds for the video; 504 if it is not ready by then,
        503 at once when the app shuts down (ask again: the task goes on). Another
        caller's task is 404, as an unknown one."""
        if tenant is not None and not await tenants.owns(tenant, task_id):
            raise HTTPException(404, {"error": "unknown_task", "task_id": task_id})
        if shutdown.stopping:
            return _shutting_down(task_id=task_id)
        scope = anyio.CancelScope()  # cancelled by the shutdown: a 503 at once
        shutdown.waiters.add(scope)
        video = None
        try:
            with scope:
                video = await client.wait(task_id, timeout=timeout)
        except sa.InputError as exc:
            raise _invalid("path", exc) from exc
        except sa.NotFoundError as exc:
            raise HTTPException(404, {"error": "unknown_task", "task_id": task_id}) from exc
        finally:
            shutdown.waiters.discard(scope)
        if video is None:
            return _shutting_down(task_id=task_id)
        return {"task_id": video.task_id, "url": video.url, "urls": list(video.urls)}

    return app


def _start_error(exc: sa.SoraError) -> str:
    """Return the one line that says why the app cannot start."""
    if isinstance(exc, sa.StoreLossError):
        return f"error: store: {exc.describe('set SORA_ASYNC_STORE_ACCEPT_LOSS=1')}"
    return f"error: {exc}"


class _StartupInOneLine:
    """ASGI middleware: a start-up that failed with a known error (``lines``) logs that
    one line instead of the traceback Starlette hands the server."""

    def __init__(self, app: ASGIApp, lines: list[str]) -> None:
        self.app = app
        self.lines = lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_one_line(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.lines:
                message = {**message, "message": self.lines[-1]}
            await send(message)

        await self.app(scope, receive, send_one_line)


def _running(client: sa.SoraClient, task_id: str) -> bool:
    """Return whether the client tracks ``task_id`` and has not seen it end."""
    scheduler = client.scheduler
    return (
        scheduler.is_tracked(task_id)
        and scheduler.result(task_id) is None
        and scheduler.given_up(task_id) is None
    )


@functools.cache
def _default_app() -> FastAPI:
    try:
        return create_app()
    except ValueError as exc:  # sa.InputError too: one line naming the variable, no traceback
        sys.exit(f"error: {exc}")


def __getattr__(name: str) -> Any:
    """Build ``app`` on first use, so that importing this module needs no API key."""
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
