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
- ``POST`` at the path of ``APIXO_CALLBACK_URL`` (when set) receives the provider's
  callbacks, so a finished task is known at once instead of at the next poll.

Environment: ``APIXO_API_KEY`` (required), ``APIXO_BASE_URL`` (default: the public
service), ``APIXO_CALLBACK_URL`` (optional: without it the client polls),
``APIXO_CALLBACK_SECRET`` and ``APIXO_WORKERS`` (see below).

Running several workers (``uvicorn --workers N``, gunicorn, several pods): the key's
limits (60 requests a minute, 10 unfinished tasks) are per API key, not per
process. N workers each with its own LocalGovernor would together send N times too
many requests and hold N times too many tasks, and earn 429s. Run one worker (one
asyncio process serves thousands of waiting requests), or give each worker 1/N of
the limits, ``sa.Limits(requests=60 // N, concurrent_tasks=10 // N)`` (set
``APIXO_WORKERS=N`` and this app does so), until the Redis governor shares one
budget between them. The callback secret must then be the same for every worker:
set ``APIXO_CALLBACK_SECRET``, or each worker makes up its own and refuses (403) the
callbacks of tasks its siblings created. A callback lands on whichever worker the
load balancer picks; a worker that does not track the task answers 200 and ignores
it, and the owning worker's polling safety net finds the end a little later.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

import sora_async as sa
import sora_async.webhook

__all__ = ["ClientFactory", "VideoIn", "client_from_env", "create_app"]

logger = logging.getLogger("sora_async.examples.fastapi_app")

ClientFactory = Callable[[], sa.SoraClient]


def client_from_env() -> sa.SoraClient:
    """Build the client from the environment (see the module docstring)."""
    workers = int(os.environ.get("APIXO_WORKERS") or "1")
    if workers < 1:
        raise ValueError("APIXO_WORKERS must be at least 1")
    defaults = sa.Limits()
    limits = sa.Limits(
        requests=max(2, defaults.requests // workers),
        period=defaults.period,
        concurrent_tasks=max(1, defaults.concurrent_tasks // workers),
    )
    callback_url = os.environ.get("APIXO_CALLBACK_URL") or None
    secret = os.environ.get("APIXO_CALLBACK_SECRET") or None
    if callback_url is not None and secret is None and workers > 1:
        logger.warning("APIXO_CALLBACK_SECRET is unset: each worker will refuse the others'")
    return sa.SoraClient(limits=limits, callback_url=callback_url, callback_secret=secret)


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
