"""SoraClient: the one class most users touch."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal, overload

import anyio

from ._budget import Budget
from ._catalog import Request, VideoInput, check_model_id, limits_for
from ._download import DEFAULT_MAX_DOWNLOAD_BYTES
from ._engine import Engine, Wiring
from ._errors import InputError, TaskTimeoutError
from ._fanout import Outcome
from ._governor import Governor, LocalGovernor
from ._ledger import Hooks
from ._models import CreateRequest, Limits, Result, TaskStatus, Video
from ._prices import Price
from ._priority import Priority
from ._recorder import Recorder
from ._scheduler import PollPolicy, PollScheduler
from ._settings import check_settings
from ._snapshot import Snapshot
from ._spending import Spending
from ._store import TaskStore, check_idempotency_key
from ._transport import RetryPolicy
from ._waits import check_task_id, check_timeout

__all__ = ["Outcome", "SoraClient"]

DEFAULT_BASE_URL = "https://api.apixo.ai/api/v1"
UncertainPolicy = Literal["raise", "resubmit"]


class SoraClient:
    """Generate videos and images on any APIXO model, inside the key's limits.

    Every request spends from its model's governor's budget, every create holds a
    task slot until its task is seen to end, and one scheduler per model polls its
    in-flight tasks. The request decides the model: Sora 2 Pro's TextToVideo /
    ImageToVideo go to ``model``; ``limits`` and ``governor`` are that model's. Other
    models get their limits from :data:`sa.MODELS` unless ``model_limits`` names them,
    and a governor of their own unless ``governors`` names one (the same governor
    for several models shares it) or ``shared_budget`` is set (every model then spends
    the default model's governor). A governor of their own is made by ``governor``
    (``Governor.for_model``): of the same kind and settings, so that when ``governor``
    is a :class:`RedisGovernor` every model's budget is shared through Redis.
    ``store`` (a :class:`SQLiteStore`) records every task before its create is sent
    and after every transition; a client opened on a store adopts the unfinished
    tasks of the process that used it before (it holds their slots and polls them to
    the end), and idempotency keys hold across restarts.
    ``spend_cap`` (USD): before each create, the spend so far (the estimates of tasks
    that succeeded), the estimates held by tasks in flight and this request's high
    estimate (:func:`sa.estimate`, from the catalogue's prices or ``prices``) must
    stay within it, else the create is not sent and BudgetExceededError is raised;
    a model without a known price is then refused (InputError naming ``prices``).
    Failed tasks and refused creates give their estimate back (neither is billed).
    With a :class:`RedisGovernor` the cap is one budget for every process and host
    of the key that names the same ``spend_scope``. ``keep_balance`` (USD) reads
    the balance when the client is entered (one request) and lowers the cap so
    that the balance stays above it. ``client.spending`` holds the cap's budget, the
    prices and ``price_factor`` (the measured over the estimated spend).
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
        model_limits: Mapping[str, Limits] | None = None,
        governors: Mapping[str, Governor] | None = None,
        shared_budget: bool = False,
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
        store: TaskStore | None = None,
        prices: Mapping[str, Price] | None = None,
        spend_cap: float | None = None,
        spend_scope: str = "",
        keep_balance: float | None = None,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get("APIXO_API_KEY")
        if not key:
            raise InputError("api_key", "is required: pass api_key= or set APIXO_API_KEY")
        check_settings(
            model=model,
            provider=provider,
            on_uncertain=on_uncertain,
            wait_timeout=wait_timeout,
            uncertain_hold=uncertain_hold,
            download_concurrency=download_concurrency,
            max_download_bytes=max_download_bytes,
            callback_url=callback_url,
            store=store,
            model_limits=tuple(model_limits or ()),
            governors=tuple(governors or ()),
        )
        self.store = store
        self.callback_url = callback_url
        self.confirm_callbacks = confirm_callbacks
        self.base_url = base_url or os.environ.get("APIXO_BASE_URL") or DEFAULT_BASE_URL
        self.model = model
        self.model_limits: dict[str, Limits] = dict(model_limits or {})
        self.limits = limits if limits is not None else limits_for(model, self.model_limits)
        default_governor = governor if governor is not None else LocalGovernor(self.limits)
        self.provider = provider
        self.on_uncertain: UncertainPolicy = on_uncertain
        self.uncertain_hold = uncertain_hold
        self.wait_timeout = wait_timeout
        self.download_concurrency = download_concurrency
        self.max_download_bytes = max_download_bytes
        self.spending = Spending(default_governor, prices, spend_cap, spend_scope, keep_balance)
        self._engine = Engine(
            Wiring(
                api_key=key,
                base_url=self.base_url,
                model=model,
                provider=provider,
                default_governor=default_governor,
                governors=dict(governors or {}),
                model_limits=self.model_limits,
                shared_budget=shared_budget,
                retry=retry if retry is not None else RetryPolicy(),
                poll_policy=poll_policy,
                callback_url=callback_url,
                callback_secret=callback_secret,
                store=store,
                on_uncertain=on_uncertain,
                uncertain_hold=uncertain_hold,
                download_concurrency=download_concurrency,
                max_download_bytes=max_download_bytes,
                spending=self.spending,
            )
        )
        self.callback_secret = self._engine.bodies.callback_secret

    @property
    def governor(self) -> Governor:
        """Return the governor of the client's default ``model``."""
        return self._engine.lanes.default.governor

    @property
    def scheduler(self) -> PollScheduler:
        """Return the scheduler of the client's default ``model``."""
        return self._engine.lanes.default.scheduler

    def governor_for(self, model: str) -> Governor:
        """Return the governor that holds ``model``'s budget on this key.

        Each model has its own, built from its limits (:data:`sa.MODELS`, overridden by
        ``model_limits``) by the default governor's ``for_model`` (a RedisGovernor for
        each model when the default is one), unless ``governors`` names one for it or
        ``shared_budget`` gives every model the default model's."""
        return self._engine.lanes.governor_for(check_model_id(model))

    def scheduler_for(self, model: str) -> PollScheduler:
        """Return the scheduler that polls ``model``'s tasks (it learns their times)."""
        return self._engine.lanes.get(check_model_id(model)).scheduler

    def snapshot(self) -> Snapshot:
        """Return the figures an operator watches, at this instant (cheap: no request).

        Slots, window use, rate factor and 429s come from each model's governor (for a
        :class:`RedisGovernor`, the key's, summed over every process, as last read);
        tasks in flight, learned generation times, polls per finished task and
        callback loss from each model's scheduler; with a ``spend_cap``, the spend,
        the estimates held by tasks in flight and the cap.
        """
        return self._engine.snapshot()

    def _record(self, recorder: Recorder | None) -> None:
        """Send request and task events to ``recorder`` (see :mod:`sora_async.otel`)."""
        self._engine.record(recorder)

    def announce(self, status: TaskStatus, *, trusted: bool, nonce: str | None = None) -> bool:
        """Take a callback's news of a task, whatever its model; return whether it is ours.

        ``nonce``: the one in the callback URL's verified token (see
        :mod:`sora_async.webhook`); a claim with another nonce than its task's create
        sent is refused at no cost."""
        return self._engine.lanes.announce(status, trusted=trusted, nonce=nonce)

    def __repr__(self) -> str:
        return f"SoraClient(base_url={self.base_url!r}, model={self.model!r}, api_key='***')"

    # --- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> SoraClient:
        await self._engine.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._engine.close()

    # --- money ----------------------------------------------------------------------------

    @property
    def budget(self) -> Budget | None:
        """Return the spend cap's budget (None without ``spend_cap``/``keep_balance``)."""
        return self._engine.creator.budget

    async def spend(self) -> tuple[float, float, float | None]:
        """Return the estimated spend so far, the estimates held by tasks in flight,
        and the cap, in USD (zeros and None without a ``spend_cap``)."""
        return await self._engine.spend()

    # --- single tasks ---------------------------------------------------------------------

    def model_for(self, request: Request) -> str:
        """Return the model ``request`` goes to: its own, or the client's ``model`` for
        Sora 2 Pro's TextToVideo / ImageToVideo. Raises InputError for anything else."""
        return self._engine.bodies.model_for(request)

    def create_request(self, request: Request) -> CreateRequest:
        """Return the create body for ``request`` (validated; no request is sent)."""
        return self._engine.bodies.body(request)

    async def submit(
        self,
        request: Request,
        *,
        idempotency_key: str | None = None,
        batch: str = "",
        priority: Priority = "normal",
        before_create: Callable[[], Awaitable[None]] | None = None,
        after_no_task: Callable[[], Awaitable[None]] | None = None,
    ) -> str:
        """Create a task for ``request`` on its model and return its task id.

        Waits first come, first served for a task slot; the slot stays taken until
        the task is seen to end. Raises InputError before any request for a bad
        input, an APIError subclass when the service refuses,
        SubmitUncertainError when a create may have made a task (``on_uncertain``),
        and RedisUnavailableError when a RedisGovernor's Redis stayed unreachable for
        its ``redis_timeout`` (a create still waiting for its permit is not sent).

        ``idempotency_key``: a submit with a key already used returns the task made
        for it and never creates twice: while the first create is in flight, after it,
        and, with a ``store``, across restarts (without one, for the process's life).
        The same key with another request raises IdempotencyConflictError; a key
        whose create may have made a task nobody can name raises SubmitUncertainError.
        ``batch``: the batch the task belongs to, as the ``store`` records it (its
        ``counts`` and ``sora-async top`` count tasks by batch; "" is the rest).
        ``priority`` ("interactive", "normal" or "batch"): waiting creates are served
        highest first, first come first served within one (see :data:`sa.Priority`).
        ``before_create`` is awaited once the request permit is granted, just before
        the create is sent, again before each retry's send (a journal writes its row
        ``submitting`` there); an error it raises stops the create unsent, frees the
        slot and is raised here. ``after_no_task`` is awaited when an answer proved
        that a send made no task (429, 503, a refused connection), before the wait
        for the retry (the journal writes its row back to ``queued``). Both run in
        the create's own task: a caller who stopped waiting may still hear of them.
        """
        engine = self._engine
        prepared, governor, records = engine.check_submit(request, idempotency_key, batch, priority)
        hooks = None
        if before_create is not None or after_no_task is not None:
            hooks = Hooks(before_create, after_no_task)
        if records is not None:
            return await engine.submit_once(
                records, idempotency_key, batch, prepared, hooks, governor, priority
            )
        # The slot is awaited here, in the caller's frame: a waiting submit costs no more.
        await governor.acquire_slot(priority)
        return await engine.create(prepared, hooks, priority=priority)

    async def uncertain_keys(self) -> list[str]:
        """Return the idempotency keys whose create may have made a task whose id was
        never learned (a timeout or reset after the send, or a process that stopped
        while it was on the wire), sorted. A submit with one raises
        SubmitUncertainError until :meth:`release_key` releases it."""
        self._engine.check_open()
        return await self._engine.ledger.uncertain_keys()

    async def release_key(self, idempotency_key: str) -> bool:
        """Let the next submit with ``idempotency_key`` create again, although its
        uncertain create may have made a task (billed, its id unknown): that submit
        may pay twice. Return False when the key names no uncertain create (unknown,
        made, refused, or a create still in flight here). The slot held for the
        uncertain create stays held for the rest of ``uncertain_hold``: its task may
        still run on the service.
        """
        self._engine.check_open()
        return await self._engine.ledger.release_key(check_idempotency_key(idempotency_key))

    async def adopt(self, task_id: str, *, model: str | None = None) -> None:
        """Track a task made elsewhere (say, by a run that was killed) until it ends.

        Takes a task slot for it, since it holds one on the server, and polls it at
        once. ``wait(task_id)`` then returns its result. ``model`` is the task's
        model (default: the client's ``model``).
        """
        self._engine.check_open()
        check_task_id(task_id)
        await self._engine.waits.adopt(
            task_id, self.model if model is None else check_model_id(model)
        )

    async def status(
        self, task_id: str, *, model: str | None = None, timeout: float | None = None
    ) -> TaskStatus:
        """Return the task's status as the service reports it now (one request).

        ``model``: the task's model, for a task this client did not create
        (default: the model it was created on, else the client's ``model``).
        ``timeout`` bounds the whole call in seconds, the wait for a request permit
        included, and raises TaskTimeoutError when it passes (default: no bound beyond
        the retry policy). An unknown id raises NotFoundError after one request.
        """
        self._engine.check_open()
        return await self._engine.waits.status(task_id, model, timeout)

    async def wait(
        self, task_id: str, *, timeout: float | None = None, model: str | None = None
    ) -> Result:
        """Wait for a task to end and return its result: a :class:`Video` for a video
        model, else a :class:`Result`.

        Raises TaskFailedError if it failed, TaskTimeoutError after ``timeout``
        seconds (default: the client's ``wait_timeout``; the task stays tracked), and
        RedisUnavailableError when a RedisGovernor's Redis stayed unreachable for its
        ``redis_timeout`` (no poll could be sent; the task stays tracked).
        The deadline covers everything, the first status request of a task this
        client does not track (and its wait for a permit) included; an unknown id
        raises NotFoundError after that one request. ``model`` is as in :meth:`status`;
        with a ``store``, a task an earlier process recorded needs no ``model``, and one
        recorded as succeeded costs no request.
        """
        self._engine.check_open()
        return await self._engine.waits.wait(task_id, timeout, model, self.wait_timeout)

    @overload
    async def generate(
        self,
        request: VideoInput,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        priority: Priority = "normal",
    ) -> Video: ...

    @overload
    async def generate(
        self,
        request: Request,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        priority: Priority = "normal",
    ) -> Result: ...

    async def generate(
        self,
        request: Request,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        priority: Priority = "normal",
    ) -> Result:
        """Submit ``request`` to its model, wait for it and return its result: a
        :class:`Video` for a video model (see submit and wait).

        ``timeout`` bounds the whole call in seconds: the wait for a task slot and
        request permits, the create and the wait for the end. When it passes,
        TaskTimeoutError is raised: with the task's id once the task exists (it stays
        tracked), else with ``task_id`` None (a create already sent still runs to its
        end, and a task it makes is tracked and its id logged: never made twice; with
        an ``idempotency_key``, a later call with the same key finds it). Without
        ``timeout``, the create is unbounded and the wait takes the client's
        ``wait_timeout``. ``priority`` is as in :meth:`submit`.
        """
        if timeout is None:
            task_id = await self.submit(request, idempotency_key=idempotency_key, priority=priority)
            return await self.wait(task_id)
        check_timeout(timeout)
        model = self.model_for(request)
        deadline = asyncio.get_running_loop().time() + timeout
        with anyio.move_on_after(timeout) as scope:
            task_id = await self.submit(request, idempotency_key=idempotency_key, priority=priority)
        if scope.cancelled_caught:
            raise TaskTimeoutError(None, timeout)
        return await self._engine.waits.wait_until(task_id, model, deadline, timeout)

    async def balance(self) -> float:
        """Return the key's remaining balance in USD."""
        self._engine.check_open()
        return await self._engine.transport.balance(self.model)

    async def download(
        self, video: Result, dest: str | os.PathLike[str] = ".", *, name: str | None = None
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
        self, video: Result, dest: str | os.PathLike[str] = ".", *, name: str | None = None
    ) -> list[Path]:
        """Save every result URL of the video under ``dest`` (see download); return the paths."""
        self._engine.check_open()
        assert self._engine.downloader is not None
        return await self._engine.downloader.download(video, dest, name)

    # --- fan-out --------------------------------------------------------------------------

    def generate_many(
        self,
        requests: Iterable[Request] | AsyncIterable[Request],
        *,
        timeout: float | None = None,
        priority: Priority = "normal",
    ) -> AsyncIterator[Outcome]:
        """Generate every request, yielding an Outcome as each finishes.

        Requests are pulled lazily, one per free task slot. A refused or failed item
        never stops the rest, with three exceptions: AuthenticationError and
        RedisUnavailableError (a RedisGovernor's Redis stayed unreachable for its
        ``redis_timeout``) stop everything at once and are raised (tasks already made
        stay tracked); InsufficientCreditsError stops new creates, lets in-flight
        tasks finish (their outcomes are yielded), then is raised.
        ``timeout`` bounds each wait, as in wait(); ``priority`` is as in submit().
        """
        return self._engine.generate_many(requests, timeout, priority, self.wait_timeout)
