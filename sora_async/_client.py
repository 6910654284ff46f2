"""SoraClient: the one class most users touch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc

from ._download import DEFAULT_MAX_DOWNLOAD_BYTES, Downloader
from ._errors import (
    ClientClosedError,
    InputError,
    ProtocolError,
    SoraError,
    SubmitUncertainError,
    TaskFailedError,
)
from ._fanout import Outcome, fan_out
from ._governor import Governor, LocalGovernor
from ._models import (
    PROVIDERS,
    CreateRequest,
    ImageToVideo,
    Limits,
    TaskState,
    TaskStatus,
    TextToVideo,
    Video,
    VideoRequest,
    check_choice,
    check_http_url,
)
from ._scheduler import PollPolicy, PollScheduler
from ._transport import RetryPolicy, Transport

if TYPE_CHECKING:
    from ._batch import BatchReport

__all__ = ["Outcome", "SoraClient"]

logger = logging.getLogger("sora_async")

DEFAULT_BASE_URL = "https://api.apixo.ai/api/v1"
UncertainPolicy = Literal["raise", "resubmit"]


class SoraClient:
    """Generate Sora 2 Pro videos through the APIXO task API, inside the key's limits.

    Every request spends from the governor's budget, every create holds a task slot
    until its task is seen to end, and one scheduler polls all in-flight tasks.
    Raises :class:`InputError` for a bad configuration (no key, unknown provider).

    Example::

        async with sa.SoraClient() as client:  # key from APIXO_API_KEY
            video = await client.generate(sa.TextToVideo(prompt="a red kite", duration=10))
            print(video.url)
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str = "sora-2-pro",
        limits: Limits | None = None,
        governor: Governor | None = None,
        provider: str = "auto",
        retry: RetryPolicy | None = None,
        poll_policy: PollPolicy | None = None,
        on_uncertain: UncertainPolicy = "raise",
        uncertain_hold: float = 600.0,
        wait_timeout: float = 3600.0,
        download_concurrency: int = 4,
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        callback_url: str | None = None,
        callback_secret: str | None = None,
        confirm_callbacks: bool = True,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get("APIXO_API_KEY")
        if not key:
            raise InputError("api_key", "is required: pass api_key= or set APIXO_API_KEY")
        if not model or "/" in model:
            raise InputError("model", f"must be a model id such as 'sora-2-pro', got {model!r}")
        check_choice("provider", provider, PROVIDERS)
        check_choice("on_uncertain", on_uncertain, ("raise", "resubmit"))
        if wait_timeout <= 0:
            raise InputError("wait_timeout", "must be a positive number of seconds")
        if uncertain_hold < 0:
            raise InputError("uncertain_hold", "must be zero or more seconds")
        if isinstance(download_concurrency, bool) or download_concurrency < 1:
            raise InputError("download_concurrency", "must be a whole number of at least 1")
        if isinstance(max_download_bytes, bool) or max_download_bytes < 1:
            raise InputError("max_download_bytes", "must be a whole number of at least 1")
        if callback_url is not None:
            check_http_url("callback_url", callback_url)
        self.callback_url = callback_url
        # A per-client secret in the callback URL's query lets the receiver tell the
        # provider's callbacks from forged ones (the provider signs nothing).
        if callback_url is not None and callback_secret is None:
            callback_secret = secrets.token_urlsafe(32)
        self.callback_secret = callback_secret or None
        self.confirm_callbacks = confirm_callbacks
        self.base_url = base_url or os.environ.get("APIXO_BASE_URL") or DEFAULT_BASE_URL
        self.model = model
        self.limits = limits if limits is not None else Limits()
        self.governor: Governor = governor if governor is not None else LocalGovernor(self.limits)
        self.provider = provider
        self.on_uncertain: UncertainPolicy = on_uncertain
        self.uncertain_hold = uncertain_hold
        self.wait_timeout = wait_timeout
        self._transport = Transport(
            api_key=key,
            base_url=self.base_url,
            governor=self.governor,
            retry=retry if retry is not None else RetryPolicy(),
        )
        self.scheduler = PollScheduler(
            governor=self.governor,
            poll=lambda model, task_id: self._transport.status(model, task_id, prepaid=True),
            policy=poll_policy,
            callbacks=callback_url is not None,
            uncertain_hold=uncertain_hold,
        )
        self._state: Literal["new", "open", "closed"] = "new"
        self.download_concurrency = download_concurrency
        self.max_download_bytes = max_download_bytes
        self._downloader: Downloader | None = None
        self._host: asyncio.Task[None] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return f"SoraClient(base_url={self.base_url!r}, model={self.model!r}, api_key='***')"

    # --- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> SoraClient:
        if self._state != "new":
            raise ClientClosedError("a SoraClient can be entered once; create a new one")
        await self._transport.open()
        self._downloader = Downloader(
            self._transport.session,
            concurrency=self.download_concurrency,
            max_bytes=self.max_download_bytes,
        )
        ready = asyncio.Event()
        # The background work lives in a task group hosted by one task the client
        # owns, so the client may be entered and left from different tasks (pytest
        # fixtures, server lifespans) and is cancelled and awaited on exit.
        self._host = asyncio.get_running_loop().create_task(
            self._host_background(ready), name="sora-async background"
        )
        await ready.wait()
        self._state = "open"
        return self

    async def _host_background(self, ready: asyncio.Event) -> None:
        async with anyio.create_task_group() as group:
            self._task_group = group
            group.start_soon(self.scheduler.run)
            group.start_soon(self.governor.run, _SchedulerNews(self.scheduler))
            ready.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = "closed"
        if self._host is not None:
            self._host.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._host
        await self.governor.aclose()
        await self._transport.close()

    def _check_open(self) -> anyio.abc.TaskGroup:
        if self._state != "open" or self._task_group is None or self._host is None:
            raise ClientClosedError(
                "this SoraClient is not open: use it inside 'async with SoraClient(...)'"
            )
        if self._host.done():
            raise ClientClosedError("the client's background work stopped") from (
                self._host.exception() if not self._host.cancelled() else None
            )
        return self._task_group

    # --- single tasks ---------------------------------------------------------------------

    def create_request(self, request: VideoRequest) -> CreateRequest:
        """Return the create body for ``request`` (validated; no request is sent)."""
        if not isinstance(request, (TextToVideo, ImageToVideo)):
            raise InputError(
                "request",
                f"must be sa.TextToVideo or sa.ImageToVideo, got {type(request).__name__}",
            )
        if self.callback_url is None:
            return CreateRequest(
                input=request,
                request_type="async",
                provider=self.provider,  # type: ignore[arg-type]
            )
        return CreateRequest(
            input=request,
            request_type="callback",
            callback_url=self._callback_endpoint(),
            provider=self.provider,  # type: ignore[arg-type]
        )

    def _callback_endpoint(self) -> str:
        assert self.callback_url is not None
        if self.callback_secret is None:
            return self.callback_url
        parts = urlsplit(self.callback_url)
        query = urlencode([*parse_qsl(parts.query), ("token", self.callback_secret)])
        return urlunsplit(parts._replace(query=query))

    async def submit(
        self,
        request: VideoRequest,
        *,
        before_create: Callable[[], Awaitable[None]] | None = None,
    ) -> str:
        """Create a task for ``request`` and return its task id.

        Waits first come, first served for a task slot; the slot stays taken until
        the task is seen to end. Raises InputError before any request for a bad
        input, an APIError subclass when the service refuses, and
        SubmitUncertainError when a create may have made a task (``on_uncertain``).
        ``before_create`` is awaited once the slot is taken, just before the create
        is sent (a journal writes its row there).
        """
        self._check_open()
        body = self.create_request(request)
        await self.governor.acquire_slot()
        if before_create is not None:
            try:
                await before_create()
            except BaseException:
                self.governor.release_slot()
                raise
        return await self._create_with_slot(body)

    async def adopt(self, task_id: str) -> None:
        """Track a task made elsewhere (say, by a run that was killed) until it ends.

        Takes a task slot for it, since it holds one on the server, and polls it at
        once. ``wait(task_id)`` then returns its video.
        """
        self._check_open()
        _check_task_id(task_id)
        if self.scheduler.is_tracked(task_id):
            return
        await self.governor.acquire_slot()
        self.governor.bind_slot(task_id, self.model)
        self.scheduler.track(task_id, self.model, holds_slot=True, adopted=True)

    async def _create_with_slot(self, body: CreateRequest) -> str:
        """Create a task with a slot already taken; the slot is accounted for either way.

        The create runs in the client's own task group: a caller cancelled while it
        is in flight stops waiting, but the create runs to its end, so a task made
        for it is still tracked (its slot kept) and never made twice.
        """
        group = self._check_open()
        created: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        group.start_soon(self._create_detached, body, created)
        return await asyncio.shield(created)

    async def _create_detached(self, body: CreateRequest, created: asyncio.Future[str]) -> None:
        try:
            while True:
                try:
                    task_id = await self._transport.create(self.model, body)
                except SubmitUncertainError:
                    # The task may exist and hold a slot on the server for a while.
                    self.governor.release_slot_later(self.uncertain_hold)
                    if self.on_uncertain == "raise":
                        raise
                    logger.warning("create uncertain; resubmitting (on_uncertain='resubmit')")
                    await self.governor.acquire_slot()
                    continue
                except BaseException:
                    self.governor.release_slot()
                    raise
                self.governor.bind_slot(task_id, self.model)
                self.scheduler.track(task_id, self.model, holds_slot=True)
                created.set_result(task_id)
                return
        except SoraError as exc:
            created.set_exception(exc)
        except BaseException:
            created.cancel()
            raise

    async def status(self, task_id: str) -> TaskStatus:
        """Return the task's status as the service reports it now (one request)."""
        self._check_open()
        _check_task_id(task_id)
        status = await self._transport.status(self.model, task_id)
        self.scheduler.observe(status)
        return status

    async def wait(self, task_id: str, *, timeout: float | None = None) -> Video:
        """Wait for a task to end and return its Video.

        Raises TaskFailedError if it failed, TaskTimeoutError after ``timeout``
        seconds (default: the client's ``wait_timeout``; the task stays tracked).
        """
        self._check_open()
        _check_task_id(task_id)
        if not self.scheduler.is_tracked(task_id):
            try:
                status = await self.status(task_id)  # learn where an unknown task stands
            except ProtocolError:
                status = None  # the scheduler's patience decides, as for any task
            if status is not None and status.terminal:
                return _video_or_raise(status)
            self.scheduler.track(task_id, self.model, holds_slot=False)
        status = await self.scheduler.wait(
            task_id, self.wait_timeout if timeout is None else timeout
        )
        return _video_or_raise(status)

    async def generate(self, request: VideoRequest, *, timeout: float | None = None) -> Video:
        """Submit ``request``, wait for it and return its Video (see submit and wait)."""
        task_id = await self.submit(request)
        return await self.wait(task_id, timeout=timeout)

    async def balance(self) -> float:
        """Return the key's remaining balance in USD."""
        self._check_open()
        return await self._transport.balance()

    async def download(
        self, video: Video, dest: str | os.PathLike[str] = ".", *, name: str | None = None
    ) -> Path:
        """Save the video under folder ``dest`` as ``<task id>.mp4`` and return its path.

        Streams to a temporary file beside the target, checks the length, resumes a
        broken transfer with ``Range`` and renames atomically. Extra result URLs, if
        any, are saved as ``<name>+2.mp4`` and so on. ``name`` replaces the task id
        as the file stem; a name that is not a safe file name as it stands gets a safe
        form plus a short hash of the whole name (it cannot leave ``dest``, and distinct
        names never share a file). Raises TransportError when the file cannot be
        fetched whole, or is longer than ``max_download_bytes`` (the partial file is
        then removed).
        """
        return (await self.download_all(video, dest, name=name))[0]

    async def download_all(
        self, video: Video, dest: str | os.PathLike[str] = ".", *, name: str | None = None
    ) -> list[Path]:
        """Save every result URL of the video under ``dest`` (see download); return the paths."""
        self._check_open()
        assert self._downloader is not None
        return await self._downloader.download(video, dest, name)

    async def run_batch(
        self,
        source: str | os.PathLike[str],
        out: str | os.PathLike[str],
        **options: Any,
    ) -> BatchReport:
        """Run a durable batch from a file into folder ``out``: see :func:`sora_async.run_batch`."""
        from ._batch import run_batch  # the batch layer sits above the client

        return await run_batch(self, source, out, **options)

    # --- fan-out --------------------------------------------------------------------------

    def generate_many(
        self,
        requests: Iterable[VideoRequest] | AsyncIterable[VideoRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[Outcome]:
        """Generate every request, yielding an Outcome as each finishes.

        Requests are pulled lazily, one per free task slot. A refused or failed item
        never stops the rest, with two exceptions: AuthenticationError stops
        everything at once and is raised; InsufficientCreditsError stops new creates,
        lets in-flight tasks finish (their outcomes are yielded), then is raised.
        ``timeout`` bounds each wait, as in wait().
        """

        async def run(body: CreateRequest) -> Video:
            task_id = await self._create_with_slot(body)
            return await self.wait(task_id, timeout=timeout)

        return fan_out(
            self._check_open(),
            requests,
            governor=self.governor,
            prepare=self.create_request,
            run=run,
        )


class _SchedulerNews:
    """Hand what the governor learns from other processes to the scheduler."""

    def __init__(self, scheduler: PollScheduler) -> None:
        self._scheduler = scheduler

    def adopt(self, task_id: str, model: str) -> None:
        self._scheduler.track(task_id, model, holds_slot=True, adopted=True)

    def announce(self, status: TaskStatus, trusted: bool) -> None:
        self._scheduler.announce(status, trusted=trusted, relayed=True)


def _video_or_raise(status: TaskStatus) -> Video:
    if status.state is TaskState.SUCCESS:
        return Video.from_status(status)
    raise TaskFailedError(status.task_id, status.fail_code, status.fail_msg)


def _check_task_id(task_id: object) -> None:
    if not isinstance(task_id, str) or not task_id.strip():
        raise InputError("task_id", "must be a non-empty string")
