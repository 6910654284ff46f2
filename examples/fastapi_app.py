"""Serve Sora 2 Pro generations from FastAPI: one SoraClient for the app's whole life.

    APIXO_API_KEY=... APIXO_CALLBACK_URL=https://my.host/apixo/callback \\
    APIXO_CALLBACK_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') \\
        uvicorn examples.fastapi_app:app

Routes:

- ``POST /videos`` with a JSON body ``{"prompt": ..., "duration": 10, "size": "1280*720"}``
  starts a generation and answers ``{"task_id": ...}`` (422 names a bad field).
- ``GET /videos/{task_id}?timeout=60`` waits up to ``timeout`` seconds and answers
  ``{"task_id", "url", "urls"}``; 504 if the video is not ready by then (ask again: the
  task goes on), 502 with the ``fail_code`` if the generation failed, 404 for an
  unknown task id.
- ``GET /status`` answers :meth:`SoraClient.snapshot` as JSON: slots in use and their
  limit, requests in the window and its limit, rate factor, 429s seen, creates waiting
  for a slot, tasks in flight, learned generation times, polls per finished task and
  callback loss, for the default model and under ``models`` for each model used (with
  Redis: the key's figures, summed over every worker).
- ``POST`` at the path of ``APIXO_CALLBACK_URL`` (when set) receives the provider's
  callbacks, so a finished task is known at once instead of at the next poll.

Environment: ``APIXO_API_KEY`` (required), ``APIXO_BASE_URL`` (default: the public
service), ``APIXO_CALLBACK_URL`` (optional: without it the client polls),
``APIXO_CALLBACK_SECRET``, ``SORA_ASYNC_REDIS_URL`` and ``APIXO_WORKERS`` (see below),
``APIXO_LIMITS`` (the key's limits as ``requests/period/concurrent_tasks``, default
``60/60/10``: set it if your plan differs, or to test against a time-compressed fake),
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
=============================  ======================================================

Running several workers (``uvicorn --workers N``, gunicorn, several pods): the key's
limits (60 requests a minute, 10 unfinished tasks) are per API key, not per process.
N workers each governing alone would together send N times too many requests, hold N
times too many tasks, and earn 429s. Set ``SORA_ASYNC_REDIS_URL=redis://host:6379/0``
(and install ``sora-async[redis]``): every worker then takes its requests and task
slots from one budget in Redis (``sa.RedisGovernor``), any worker may use every slot,
and the tasks of a worker that dies are adopted by another. Without Redis, run one
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

import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgspec
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

import sora_async as sa
import sora_async.webhook

__all__ = ["ClientFactory", "VideoIn", "client_from_env", "create_app"]

logger = logging.getLogger("sora_async.examples.fastapi_app")

ClientFactory = Callable[[], sa.SoraClient]


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
    governor: sa.Governor | None = None
    if redis_url is not None:
        if callback_url is not None and secret is None:
            raise ValueError("APIXO_CALLBACK_SECRET is required with SORA_ASYNC_REDIS_URL")
        # One budget for every worker: each may use all of the key's limits.
        governor = sa.RedisGovernor(redis_url, limits=limits)
    else:
        workers = _number("APIXO_WORKERS", whole=True) or 1
        limits = sa.Limits(
            requests=max(2, limits.requests // workers),
            period=limits.period,
            concurrent_tasks=max(1, limits.concurrent_tasks // workers),
        )
        if callback_url is not None and secret is None and workers > 1:
            logger.warning("APIXO_CALLBACK_SECRET is unset: each worker will refuse the others'")
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
        callback_url=callback_url,
        callback_secret=secret,
        retry=retry,
        poll_policy=poll,
        **_given(
            wait_timeout=_number("APIXO_WAIT_TIMEOUT"),
            uncertain_hold=_number("APIXO_UNCERTAIN_HOLD"),
            on_uncertain=on_uncertain,
            max_download_bytes=_number("APIXO_MAX_DOWNLOAD_BYTES", whole=True),
        ),
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


class VideoIn(BaseModel):
    """The body of ``POST /videos``: a text-to-video request (checked by sa.TextToVideo)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    duration: int | None = None
    size: str | None = None


def _invalid(where: str, exc: sa.InputError) -> RequestValidationError:
    """Return a 422 in FastAPI's own shape, naming the offending field."""
    return RequestValidationError(
        [{"loc": (where, exc.field), "msg": exc.rule, "type": "value_error"}]
    )


def _error(status: int, **detail: Any) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


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
    # The service refused, failed or could not be reached: a bad gateway for us.
    logger.warning("video service error: %s", exc)
    return _error(502, error="upstream", message=str(exc))


def create_app(client_factory: ClientFactory | None = None) -> FastAPI:
    """Return the app; ``client_factory`` builds its one SoraClient (default: from env).

    The client is built now (the callback route needs its URL) and opened, once, for
    the app's life by the lifespan.
    """
    client = (client_factory or client_from_env)()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client:
            yield

    app = FastAPI(title="Sora 2 Pro videos", lifespan=lifespan)
    app.state.client = client
    if client.callback_url is not None:
        app.include_router(sora_async.webhook.fastapi_router(client))

    @app.exception_handler(sa.SoraError)
    async def on_sora_error(request: Request, exc: sa.SoraError) -> JSONResponse:
        return _service_error(exc)

    @app.post("/videos")
    async def start_video(body: VideoIn) -> dict[str, str]:
        """Start a generation and return its task id (waits for a free task slot)."""
        try:
            request = sa.TextToVideo(**body.model_dump(exclude_none=True))
        except sa.InputError as exc:
            raise _invalid("body", exc) from exc
        return {"task_id": await client.submit(request)}

    @app.get("/status")
    async def status() -> Response:
        """Return the client's snapshot: its governors' and schedulers' figures now."""
        return Response(msgspec.json.encode(client.snapshot()), media_type="application/json")

    @app.get("/videos/{task_id}")
    async def get_video(
        task_id: str, timeout: Annotated[float, Query(gt=0, le=3600)] = 60.0
    ) -> dict[str, Any]:
        """Wait up to ``timeout`` seconds for the video; 504 if it is not ready by then."""
        try:
            video = await client.wait(task_id, timeout=timeout)
        except sa.InputError as exc:
            raise _invalid("path", exc) from exc
        except sa.NotFoundError as exc:
            raise HTTPException(404, {"error": "unknown_task", "task_id": task_id}) from exc
        return {"task_id": video.task_id, "url": video.url, "urls": list(video.urls)}

    return app


@functools.cache
def _default_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> Any:
    """Build ``app`` on first use, so that importing this module needs no API key."""
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
