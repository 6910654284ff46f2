"""FakeApixo: the APIXO task API on loopback, in the caller's event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import re
import types
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec
from aiohttp import web

from ._callbacks import CallbackSender, check_callback_knobs
from ._chaos import Chaos, check_rate
from ._faults import Fault, FaultKind, FaultPlan, FaultSpec, RequestKind, Target
from ._http import (
    API_PREFIX,
    Handler,
    apply_fault,
    envelope,
    invalid,
    json_errors,
    retry_headers,
    send_bytes,
)
from ._images import IMAGE_TYPES, cached_image
from ._media import cached_mp4
from ._persist import StateFile
from ._state import KeyLimits, Neighbour, RateWindow, Stats, TaskRecord
from ._timing import DEFAULT_EPOCH_MS, Clock, GenerationTime, lognormal
from ._validate import InvalidBody, parse_create

__all__ = ["DEFAULT_MODELS", "DEFAULT_MODEL_LIMITS", "FakeApixo"]

DEFAULT_MODELS = frozenset(
    {
        "sora-2-pro",
        "sora-2",
        "veo-3-1",
        "veo-3-1-extend",
        "kling-2-5-turbo-pro",
        "kling-2-6",
        "wan-2-5",
        "ltx-2-19b",
        "nano-banana",
        "nano-banana-2",
        "seedream-4-5",
    }
)
"""The model ids the fake serves unless told others (``FakeApixo(models=...)``)."""
DEFAULT_MODEL_LIMITS: Mapping[str, tuple[int, int]] = types.MappingProxyType(
    {"ltx-2-19b": (10000, 1000)}
)
"""``(requests a minute, unfinished tasks)`` of models whose pages state other figures
than Sora 2 Pro's 60 and 10."""
# Balance calls name no model: they count against this one's window.
_BALANCE_MODEL = "sora-2-pro"
_FAIL_MARK = re.compile(r"\[fail:([^\]\s]+)\]")
_VIOLATE_MARK = "[violate]"


class FakeApixo:
    """Serve a faithful fake of the APIXO task API, for tests and simulations.

    It runs in the running event loop (so ``looptime`` can fast-forward it),
    enforces the key's limits on the server clock, and counts what it sees in
    :attr:`stats` (also served as JSON at ``GET /fake/stats``, for tests of other
    processes).

    Example::

        async with FakeApixo(generation_time=fixed(30)) as fake:
            client = SoraClient(api_key=fake.api_key, base_url=fake.url)
            ...
            assert fake.stats.max_requests_in_window <= 60
    """

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        requests: int = 60,
        period: float = 60.0,
        concurrent_tasks: int = 10,
        generation_time: GenerationTime | None = None,
        generation_times: Mapping[str, GenerationTime] | None = None,
        pending_time: float = 2.0,
        failure_rate: float = 0.0,
        fail_code: str = "GENERATION_FAILED",
        seed: int = 0,
        balance: float = 100.0,
        price_per_second: float = 0.3,
        host: str = "127.0.0.1",
        port: int = 0,
        epoch_ms: int = DEFAULT_EPOCH_MS,
        models: Collection[str] = DEFAULT_MODELS,
        model_limits: Mapping[str, tuple[int, int]] | None = None,
        limits_per: Literal["model", "key"] = "model",
        credits_error_code: int = 400,
        violation_error_code: int = 400,
        retry_after: float | None = None,
        callback_timeout: float = 30.0,
        callback_retry_delays: Sequence[float] = (5.0, 15.0, 45.0),
        callback_loss: float = 0.0,
        callback_delay: float = 0.0,
        callback_jitter: float = 0.0,
        callback_duplicates: float = 0.0,
        state_file: str | os.PathLike[str] | None = None,
        chaos: float = 0.0,
        chaos_delay: float = 75.0,
        chaos_faults: Collection[FaultKind] | None = None,
        network_delay: float = 0.0,
        prices: Mapping[str, float] | None = None,
    ) -> None:
        """Configure the fake; nothing listens until :meth:`start`.

        Args:
            requests, period: at most ``requests`` admitted API calls in any trailing
                ``period`` seconds; more get 429 (and are not admitted).
            concurrent_tasks: creates beyond this many unfinished tasks get 429.
            generation_time: seconds from create to end, drawn per task
                (:func:`lognormal`, :func:`uniform`, :func:`fixed`, :func:`heavy_tailed`).
            generation_times: per model, overriding ``generation_time`` for that model.
            pending_time: seconds a task stays ``pending`` before ``processing``.
            failure_rate, fail_code: share of tasks that end ``failed``, and their code.
            seed: seeds generation times, failures and task ids.
            balance, price_per_second: USD; a create costs price x seconds (12 official).
            prices: USD per task by model: a task of a model named here is billed
                that price if it succeeds, nothing if it fails (the provider bills
                failed tasks nothing), and a create is refused for credits when the
                balance is short of it.
            epoch_ms: wire time (ms) at start; later times add loop-time elapsed.
            model_limits: ``{model: (requests, concurrent_tasks)}`` for models whose limits
                differ from ``requests`` / ``concurrent_tasks`` (added to
                :data:`DEFAULT_MODEL_LIMITS`, the figures the models' pages state).
            limits_per: ``"model"`` (default): each model has its own rate window and task
                slots on the key (balance calls count in ``sora-2-pro``'s); ``"key"``: all
                models share one. Neighbours play on every model's limits.
            credits_error_code, violation_error_code: HTTP/envelope code of those 400s.
            retry_after: if set, 429 answers carry ``Retry-After`` (seconds).
            callback_timeout, callback_retry_delays: a callback POST not answered 200 in
                time is retried after each delay, then given up (the task is lost).
            callback_loss, callback_duplicates: probability a task's callback is never
                sent; that a delivered one is sent again 1-10 s later.
            callback_delay, callback_jitter: the first POST waits delay + U(0, jitter) s.
                The ``callback_*`` knobs are attributes too, read when a task ends.
            state_file: keep the tasks made in this file (JSON lines, appended as each
                is made) and take them back at start, on the port of the last start
                when free, so that a fake restarted after its process died still
                answers for its tasks and serves their files; they count in
                :attr:`stats` as if made by this fake. For fakes in real time.
            chaos: share of requests (API and files) that get a fault drawn at random
                from every kind the fake knows (seeded by ``seed``; see
                :mod:`sora_async.testing._chaos`); above 0 it also makes at least
                ``chaos / 3`` of callbacks lost, as many duplicated, and delays them
                up to 60 s. ``chaos_delay``: seconds a slow answer takes (past a
                client's 60-s timeout). ``chaos_faults``: draw only these kinds (default:
                every kind). ``fake.chaos`` may be changed at run time.
            network_delay: each API request reaches the fake (is counted against the
                window) U(0, network_delay) s after it was sent, and its answer takes
                another U(0, network_delay) s back: a network path whose delays vary,
                seeded by ``seed``.
        """
        if period <= 0 or requests < 0 or concurrent_tasks < 0:
            raise ValueError("limits must be positive")
        if callback_delay < 0 or callback_jitter < 0 or network_delay < 0:
            raise ValueError("callback_delay, callback_jitter and network_delay must be >= 0")
        self.network_delay = network_delay
        self._network = random.Random(f"network-{seed}")
        self.api_key = api_key
        self.requests = requests
        self.concurrent_tasks = concurrent_tasks
        self.generation_time: GenerationTime = generation_time or lognormal(180.0, 0.4)
        self.generation_times = dict(generation_times or {})
        self.pending_time = pending_time
        self.failure_rate = failure_rate
        self.fail_code = fail_code
        self.price_per_second = price_per_second
        self.host = host
        self.port = port
        self.models = set(models)
        self.model_limits = {**DEFAULT_MODEL_LIMITS, **(model_limits or {})}
        if limits_per not in ("model", "key"):
            raise ValueError("limits_per must be 'model' or 'key'")
        self.limits_per = limits_per
        self.credits_error_code = credits_error_code
        self.violation_error_code = violation_error_code
        self.retry_after = retry_after
        self.callback_retry_delays = check_callback_knobs(
            callback_timeout, callback_retry_delays, callback_loss, callback_duplicates
        )
        self.callback_timeout = callback_timeout
        self.callback_loss = callback_loss
        self.callback_delay = callback_delay
        self.callback_jitter = callback_jitter
        self.callback_duplicates = callback_duplicates
        kinds = None if chaos_faults is None else [Fault(kind) for kind in chaos_faults]
        self._chaos = Chaos(chaos, seed, chaos_delay, kinds)
        if chaos > 0:
            self.callback_loss = max(callback_loss, chaos / 3)
            self.callback_duplicates = max(callback_duplicates, chaos / 3)
            self.callback_jitter = max(callback_jitter, 60.0)
        self.stats = Stats()
        self._period = period
        self._balance = float(balance)
        self.prices: dict[str, float] = dict(prices or {})
        self._rng = random.Random(seed)
        self._ids = random.Random(f"task-ids-{seed}")
        self._clock = Clock(epoch_ms)
        self._neighbours: list[Neighbour] = []
        self._windows: dict[str, KeyLimits] = {}
        self._all_models = RateWindow(period)  # counted only, never limiting
        self._faults = FaultPlan()
        self._tasks: dict[str, TaskRecord] = {}
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._callbacks = CallbackSender(self, seed)
        self._state_file = StateFile(Path(state_file)) if state_file is not None else None

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``host:port`` (port 0 picks a free one) in the running loop."""
        if self._runner is not None:
            raise RuntimeError("FakeApixo is already started")
        self._clock.start()
        app = web.Application(middlewares=[json_errors, self._track])
        app.router.add_post(API_PREFIX + "/generateTask/{model}", self._on_create)
        app.router.add_get(API_PREFIX + "/statusTask/{model}", self._on_status)
        app.router.add_get(API_PREFIX + "/apikeys/current-balance", self._on_balance)
        app.router.add_get("/files/{name}", self._on_file)
        app.router.add_get("/fake/stats", self._on_stats)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        state = self._state_file
        try:
            if state is not None and self.port == 0 and state.port():
                try:  # the port of the last start, so that its result URLs still work
                    await web.TCPSite(runner, self.host, state.port()).start()
                except OSError:
                    await web.TCPSite(runner, self.host, 0).start()
            else:
                await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        await self._callbacks.start()
        if state is not None:
            for record in state.load(self._clock):
                self._restore(record)
            state.started(self.port)

    def _restore(self, record: TaskRecord) -> None:
        self._tasks[record.task_id] = record
        if not record.finished:
            self._window(record.model).track(record)
            self._callbacks.schedule(record)
        self.stats.creates += 1
        self.stats.creates_per_prompt[record.prompt] += 1

    async def close(self) -> None:
        """Stop listening, cancel pending callbacks, drop connections; safe to call twice."""
        await self._callbacks.close()
        runner, self._runner = self._runner, None
        # Answers still being worked on (a slow fault sleeps) end with the server.
        handlers = [task for task in self._handlers if task is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Keep the tasks answering requests, so that close() can end them."""
        task = asyncio.current_task()
        if task is None:
            return await handler(request)
        self._handlers.add(task)
        try:
            return await handler(request)
        finally:
            self._handlers.discard(task)

    async def __aenter__(self) -> FakeApixo:
        """Start the server."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the server."""
        await self.close()

    @property
    def origin(self) -> str:
        """Return ``http://host:port``."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """Return the API base URL, ``http://host:port/api/v1``."""
        return self.origin + API_PREFIX

    @property
    def chaos(self) -> float:
        """Return the share of requests that get a random fault (0: none)."""
        return self._chaos.rate

    @chaos.setter
    def chaos(self, rate: float) -> None:
        self._chaos.rate = check_rate(rate)

    @property
    def period(self) -> float:
        """Return the rate window's length in seconds."""
        return self._period

    # -- control and inspection ---------------------------------------------------------

    def now(self) -> float:
        """Return server seconds since start (loop time)."""
        return self._clock.now()

    @property
    def tasks(self) -> Mapping[str, TaskRecord]:
        """Return every task made, by task id (read-only)."""
        return types.MappingProxyType(self._tasks)

    @property
    def balance(self) -> float:
        """Return the key's remaining balance in USD."""
        return self._balance

    def set_balance(self, usd: float) -> None:
        """Set the key's remaining balance in USD."""
        self._balance = float(usd)

    def unfinished_tasks(self) -> int:
        """Return our pending or processing tasks now, of every model (neighbours' slots
        not included)."""
        now = self._clock.now()
        return sum(limits.unfinished(now) for limits in self._windows.values())

    def unfinished_tasks_of(self, model: str) -> int:
        """Return our pending or processing tasks of ``model`` now."""
        now = self._clock.now()
        if self.limits_per == "model":
            return self._window(model).unfinished(now)
        return sum(1 for t in self._tasks.values() if t.model == model and not t.ended_by(now))

    def limits_of(self, model: str) -> tuple[int, int]:
        """Return ``(requests, concurrent_tasks)`` that bind ``model`` on this key."""
        if self.limits_per == "model" and model in self.model_limits:
            return self.model_limits[model]
        return self.requests, self.concurrent_tasks

    def _window(self, model: str) -> KeyLimits:
        key = model if self.limits_per == "model" else ""
        limits = self._windows.get(key)
        if limits is None:
            limits = self._windows[key] = KeyLimits(self._period)
            limits.neighbours = self._neighbours  # one list: neighbours play everywhere
        return limits

    def finish(
        self,
        task_id: str,
        state: Literal["success", "failed"] = "success",
        fail_code: str | None = None,
    ) -> TaskRecord:
        """End an unfinished task now, in ``state``.

        Raises:
            KeyError: no such task.
            ValueError: the task is already terminal, or ``state`` is not terminal.
        """
        record = self._tasks[task_id]
        record.end(self._clock.now(), state, fail_code or record.fail_code or self.fail_code)
        self._callbacks.schedule(record)  # its callback is due now
        return record

    async def forge_callback(self, url: str, body: bytes) -> int:
        """POST ``body`` as JSON to ``url`` once, as anyone could (not counted in :attr:`stats`).

        Return the HTTP status; raise what the request raises (``asyncio.TimeoutError``
        after ``callback_timeout``)."""
        return await self._callbacks.post(url, body, self.callback_timeout)

    def inject(
        self,
        kind: FaultKind,
        *,
        on: Target = "any",
        times: int = 1,
        status: int = 503,
        delay: float = 0.0,
        retry_after: float | None = None,
    ) -> None:
        """Queue a fault for the next ``times`` requests matching ``on``.

        ``on="any"`` matches API calls (create, status, balance), not file downloads.
        Faults are used in the order queued. A fault only hits requests that pass
        the rate check, except ``rate_limit``, which answers 429 at once.
        """
        self._faults.add(
            kind, on=on, times=times, status=status, delay=delay, retry_after=retry_after
        )

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self._faults.clear()

    def pending_faults(self) -> list[FaultSpec]:
        """Return the faults still queued, in order."""
        return self._faults.pending()

    def add_neighbour(self, requests_per_minute: int, tasks: int) -> None:
        """Play another program on this key from now on: hold ``tasks`` slots and
        spend ``requests_per_minute`` requests evenly in the rate window."""
        if requests_per_minute < 0 or tasks < 0:
            raise ValueError("requests_per_minute and tasks must be >= 0")
        neighbour = Neighbour(requests_per_minute, tasks, self._clock.now_us())
        self._neighbours.append(neighbour)

    def remove_neighbours(self) -> None:
        """Stop every neighbour: their slots free and their requests stop now."""
        self._neighbours.clear()

    # -- limits ------------------------------------------------------------------------

    def _too_many(self, kind: RequestKind, message: str, retry_after: float | None) -> web.Response:
        self.stats.rate_limited += 1
        self.stats.rate_limited_by_kind[kind] += 1
        return envelope(429, message, headers=retry_headers(retry_after))

    async def _api(
        self, request: web.Request, kind: RequestKind, work: Handler
    ) -> web.StreamResponse:
        """Authenticate, count, rate-limit and fault one API request around ``work``."""
        if self.network_delay <= 0:
            return await self._arrived(request, kind, work)
        await asyncio.sleep(self._network.uniform(0.0, self.network_delay))  # on its way
        response = await self._arrived(request, kind, work)
        await asyncio.sleep(self._network.uniform(0.0, self.network_delay))  # and back
        return response

    async def _arrived(
        self, request: web.Request, kind: RequestKind, work: Handler
    ) -> web.StreamResponse:
        scheme, _, key = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or key.strip() != self.api_key:
            self.stats.unauthorized += 1
            return envelope(401, "Invalid or missing API key")
        self.stats.requests += 1
        self.stats.requests_by_kind[kind] += 1
        first = self._faults.peek(kind)
        queued = first is not None
        if first is None:
            first = self._chaos.draw(kind)
        if first is not None and first.kind is Fault.RATE_LIMIT:
            if queued:
                self._faults.take(kind)
            self._count_fault(kind, first)
            retry_after = first.retry_after if first.retry_after is not None else self.retry_after
            return self._too_many(kind, "Rate limit exceeded", retry_after)
        model = request.match_info.get("model", _BALANCE_MODEL)
        in_window = self._window(model).admit(self._clock.now_us(), self.limits_of(model)[0])
        if in_window is None:
            return self._too_many(kind, "Rate limit exceeded", self.retry_after)
        self.stats.max_requests_in_window = max(self.stats.max_requests_in_window, in_window)
        by_model = self.stats.max_requests_in_window_by_model
        by_model[model] = max(by_model[model], in_window)
        together = self._all_models.admit(self._clock.now_us())
        self.stats.max_requests_in_window_all_models = max(
            self.stats.max_requests_in_window_all_models, together
        )
        fault = self._faults.take(kind) if queued else first
        if fault is None:
            return await work(request)
        self._count_fault(kind, fault)
        return await apply_fault(request, fault, work)

    def _count_fault(self, kind: RequestKind, fault: FaultSpec) -> None:
        self.stats.faults[fault.kind.value] += 1
        if kind == "create":
            self.stats.create_faults[fault.kind.value] += 1

    # -- API handlers ------------------------------------------------------------------

    async def _on_create(self, request: web.Request) -> web.StreamResponse:
        return await self._api(request, "create", self._create)

    async def _on_status(self, request: web.Request) -> web.StreamResponse:
        return await self._api(request, "status", self._status)

    async def _on_balance(self, request: web.Request) -> web.StreamResponse:
        return await self._api(request, "balance", self._balance_of)

    async def _create(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.models:
            return envelope(404, f"Model not found: {model}")
        try:
            body = msgspec.json.decode(await request.read())
        except msgspec.DecodeError:
            return invalid("Request body is not valid JSON")
        try:
            spec = parse_create(body, model)
        except InvalidBody as exc:
            return invalid(str(exc))
        if _VIOLATE_MARK in spec.prompt:
            message = "Content violates provider policy, please adjust the prompt"
            return envelope(self.violation_error_code, message)
        # An image costs as one second of video: the fake's prices are only relative.
        cost = self.price_per_second * (spec.images if spec.kind == "image" else spec.duration)
        if model in self.prices:
            cost = self.prices[model]
        if self._balance + 1e-9 < cost:
            return envelope(self.credits_error_code, "Insufficient credits")
        if self._window(model).slots_taken(self._clock.now()) >= self.limits_of(model)[1]:
            self.stats.concurrency_limited += 1
            return self._too_many("create", "Concurrent task limit exceeded", self.retry_after)
        now = self._clock.now()
        draw = self.generation_times.get(model, self.generation_time)
        generation = max(0.0, float(draw(self._rng)))
        # Always draw, so a marked prompt does not shift the random sequence.
        unlucky = self._rng.random() < self.failure_rate
        marked = _FAIL_MARK.search(spec.prompt)
        fail_code = marked.group(1) if marked else (self.fail_code if unlucky else None)
        if model == "veo-3-1-extend" and not self._extends_veo(spec.input.get("taskId")):
            fail_code = "TASKID_ERROR"  # the page: an unknown or non-veo-3-1 taskId fails
        if model in self.prices and fail_code is not None:
            cost = 0.0  # billed on success only: its end is decided now
        task_id = self._new_task_id()
        record = TaskRecord.plan(
            task_id, model, spec, now, cost, generation, self.pending_time, fail_code, self._clock
        )
        self._tasks[task_id] = record
        if self._state_file is not None:
            self._state_file.made(record, self._clock.now)
        self._window(model).track(record)
        self._callbacks.schedule(record)
        self._balance = round(self._balance - cost, 9)
        self.stats.creates += 1
        self.stats.creates_per_prompt[spec.prompt] += 1
        self.stats.creates_by_model[model] += 1
        self.stats.max_concurrent_tasks = max(
            self.stats.max_concurrent_tasks, self.unfinished_tasks()
        )
        by_model = self.stats.max_concurrent_tasks_by_model
        by_model[model] = max(by_model[model], self.unfinished_tasks_of(model))
        return envelope(200, "success", {"taskId": task_id})

    async def _on_stats(self, request: web.Request) -> web.Response:
        """Answer :attr:`stats` as JSON (not an API call: no key, not counted)."""
        stats = self.stats
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, wrongly.
        counters = {
            f.name: dict(value) if isinstance(value := getattr(stats, f.name), dict) else value
            for f in dataclasses.fields(stats)
        }
        counters["unfinished_tasks"] = self.unfinished_tasks()
        return web.json_response(counters)

    def _extends_veo(self, task_id: object) -> bool:
        source = self._tasks.get(task_id) if isinstance(task_id, str) else None
        return source is not None and source.model == "veo-3-1"

    def _new_task_id(self) -> str:
        while True:
            task_id = f"task_{self._ids.getrandbits(64):016x}"
            if task_id not in self._tasks:
                return task_id

    async def _status(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.models:
            return envelope(404, f"Model not found: {model}")
        task_id = request.query.get("taskId")
        if not task_id:
            return invalid("Missing required query parameter: taskId")
        record = self._tasks.get(task_id)
        if record is None or record.model != model:
            return envelope(404, "Task not found")
        record.polls += 1
        now = self._clock.now()
        data = record.status_data(now, f"{request.url.origin()}/files")
        if record.first_seen_done_at is None and data["state"] in ("success", "failed"):
            record.first_seen_done_at = now
        return envelope(200, "success", data)

    async def _balance_of(self, request: web.Request) -> web.Response:
        return envelope(200, "success", round(self._balance, 6))

    # -- files ---------------------------------------------------------------------------

    async def _on_file(self, request: web.Request) -> web.StreamResponse:
        """Serve a result video; no auth and no rate limit, like a CDN."""
        self.stats.downloads += 1
        fault = self._faults.take("file") or self._chaos.draw("file")
        if fault is None:
            return await self._file(request)
        self.stats.faults[fault.kind.value] += 1
        if fault.kind is Fault.RATE_LIMIT:
            retry_after = fault.retry_after if fault.retry_after is not None else self.retry_after
            return self._too_many("file", "Rate limit exceeded", retry_after)
        if fault.kind is Fault.BROKEN_JSON:
            return await self._file(request, truncate=True)
        return await apply_fault(request, fault, self._file, is_file=True)

    async def _file(self, request: web.Request, *, truncate: bool = False) -> web.StreamResponse:
        name = request.match_info["name"]
        stem, _, extension = name.rpartition(".")
        task_id = stem.rpartition("-")[0] if extension in IMAGE_TYPES else stem
        record = self._tasks.get(task_id)
        if record is None or record.state != "success" or name not in record.result_files():
            return envelope(404, "File not found")
        if record.kind == "image":
            data = cached_image(stem, extension)
            return await send_bytes(request, data, IMAGE_TYPES[extension], truncate=truncate)
        data = cached_mp4(task_id, record.duration, record.width, record.height)
        return await send_bytes(request, data, "video/mp4", truncate=truncate)
