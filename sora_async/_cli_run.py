"""How a ``sora-async`` command runs: its client, its signals, and its one outcome.

Every command ends in one outcome: a line of text, or with ``--json`` one JSON object
on stdout, errors included::

    {"ok": true,  "exit_code": 0, ...the command's fields}
    {"ok": false, "exit_code": 1, "error": "TaskFailedError", "message": "...", ...context}

Exit codes: 0 all done, 1 the service or an item failed, or Redis (``--redis-url``)
stayed unreachable mid-run, 2 bad input or environment (before any request), 4 the spend
cap (``--max-spend``, ``--keep-balance``) stopped the creates (items left queued), 130 / 143
stopped by SIGINT / SIGTERM (journal and manifest written; run the same command again
to resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from typing import Any, NoReturn

from rich.console import Console

from ._catalog import MODELS, check_model_id
from ._client import SoraClient
from ._errors import (
    APIError,
    BudgetExceededError,
    InputError,
    NotFoundError,
    RedisUnavailableError,
    SoraError,
    TaskFailedError,
)
from ._governor import Governor, LocalGovernor
from ._models import Limits
from ._scheduler import PollPolicy
from ._transport import RetryPolicy

__all__ = ["Note", "Stop", "Work", "emit", "fail", "parse_limits", "run", "scaled_client_options"]

err = Console(stderr=True)
out = Console()

#: Context a command gathers as it goes, shown if it then fails: ``task_id`` once a task
#: is known to exist (made by this command, or found done), ``urls`` once known.
Note = dict[str, Any]
Work = Callable[[SoraClient, Note], Coroutine[Any, Any, int]]

_SIGNAL_EXIT: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stop:
    """A request to wind down, set by the first SIGINT / SIGTERM.

    ``cancel``: cancel the work when the signal comes, except while a create is in
    flight (between ``sending()`` and ``answered()`` or ``not_sent()``): then the
    work is cancelled once the create's answer is in, so that the task it made can
    be named. Without ``cancel`` the work watches ``event`` and winds down itself
    (a batch).
    """

    def __init__(self, *, cancel: bool = False) -> None:
        self.event = asyncio.Event()
        self.exit_code = 0  # 130 or 143 once set
        self._cancel = cancel
        self._in_flight = 0

    def set(self, signum: int, task: asyncio.Task[int]) -> bool:
        """Ask the work (``task``) to stop, on behalf of signal ``signum``; return
        whether it was cancelled at once."""
        self.exit_code = _SIGNAL_EXIT[signum]
        self.event.set()
        if self._cancel and not self._in_flight:
            task.cancel()
            return True
        return False

    async def sending(self) -> None:
        """Mark a create as sent (a ``before_create`` hook): a signal now waits for it."""
        if self.event.is_set():
            # Stopped while waiting for a slot, a permit or a retry: send nothing.
            raise asyncio.CancelledError
        self._in_flight += 1

    async def not_sent(self) -> None:
        """Mark a create as proved to have made no task (an ``after_no_task`` hook):
        its retry waits unsent, so a signal that came meanwhile stops it now."""
        self.answered()

    def answered(self) -> None:
        """Mark the create as answered; cancel the work if a signal came meanwhile."""
        self._in_flight -= 1
        if self._cancel and self.event.is_set() and not self._in_flight:
            raise asyncio.CancelledError


def emit(as_json: bool, text: str, **fields: Any) -> None:
    """Print a successful outcome: ``text``, or ``fields`` as one JSON object."""
    if as_json:
        print(json.dumps({"ok": True, "exit_code": 0, **fields}, ensure_ascii=False), flush=True)
    else:
        out.print(text, highlight=False, soft_wrap=True)


def fail(
    message: str,
    exit_code: int = 2,
    *,
    as_json: bool = False,
    error: str = "InputError",
    **context: Any,
) -> NoReturn:
    """Print one clear line (or one JSON object) for a failed outcome and exit."""
    if as_json:
        outcome = {"ok": False, "exit_code": exit_code, "error": error, "message": message}
        print(json.dumps(outcome | context, ensure_ascii=False), flush=True)
    else:
        err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(exit_code)


def parse_limits(values: Iterable[str]) -> dict[str, Limits]:
    """Return the limits ``--limits MODEL=REQUESTS/PERIOD/TASKS`` gives, by model.

    Raises InputError naming ``limits`` (or the figure) for a malformed value."""
    found: dict[str, Limits] = {}
    for value in values:
        model, sep, figures = value.partition("=")
        parts = figures.split("/")
        rule = "must be MODEL=REQUESTS/PERIOD/TASKS, like veo-3-1=120/60/20"
        if not sep or len(parts) != 3:
            raise InputError("limits", f"{rule}; got {value!r}")
        check_model_id(model, "limits")
        try:
            requests, period, tasks = int(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            message = f"{rule} (whole numbers but the period); got {value!r}"
            raise InputError("limits", message) from None
        found[model] = Limits(requests=requests, period=period, concurrent_tasks=tasks)
    return found


def scaled_client_options(
    scale: float,
    *,
    redis_url: str | None = None,
    api_key: str | None = None,
    model: str = "",
    limits_given: Mapping[str, Limits] | None = None,
) -> dict[str, Any]:
    """Return SoraClient options with every timing divided by ``scale``.

    With ``redis_url`` the governor is a RedisGovernor shared by every process using
    the key (the client makes each other model's from it, on the same Redis). Every
    model of the catalogue gets its limits with the period scaled too (a model outside
    it keeps the real 60-s window: slower, never over). The jitter margin is not cut
    below 0.1 s, the lease below 3 s and ``redis_timeout`` below 10 s: network delays
    and restarts do not scale.
    """
    # The catalogue's limits, and the key's own where --limits gives them.
    known = {name: info.limits for name, info in MODELS.items()} | dict(limits_given or {})
    model_limits = {
        name: Limits(
            requests=given.requests,
            period=given.period / scale,
            concurrent_tasks=given.concurrent_tasks,
        )
        for name, given in known.items()
    }
    limits = model_limits.get(model or "sora-2-pro") or Limits(period=60.0 / scale)
    timings: dict[str, Any] = {
        "jitter_margin": max(1.0 / scale, 0.1) if scale != 1.0 else 1.0,
        "backoff_base": 1.0 / scale,
        "backoff_cap": 60.0 / scale,
    }
    governor: Governor
    if redis_url:
        from .redis_governor import RedisGovernor

        governor = RedisGovernor(
            redis_url,
            api_key=api_key,
            model=model or "sora-2-pro",
            limits=limits,
            lease=max(15.0 / scale, 3.0),
            uncertain_hold=600.0 / scale,
            # A restart of Redis takes a second or so whatever the scale.
            redis_timeout=max(120.0 / scale, 10.0),
            **timings,
        )
    else:
        governor = LocalGovernor(limits, **timings)
    return {
        "limits": limits,
        "model_limits": model_limits,
        "governor": governor,
        "poll_policy": PollPolicy(prior_mean=180.0 / scale, min_interval=1.0 / scale),
        "retry": RetryPolicy(
            base=0.5 / scale, cap=30.0 / scale, deadline=300.0 / scale, timeout=60.0 / scale
        ),
        "uncertain_hold": 600.0 / scale,
        "wait_timeout": 3600.0 / scale,
    }


@contextlib.asynccontextmanager
async def _client(params: dict[str, Any]) -> AsyncIterator[SoraClient]:
    """Open a client on the real service, or on an in-process fake with ``--simulate``
    (which keeps its tasks in ``params["state_file"]`` when given, so that a rerun of a
    simulated batch finds the tasks of the run before). With ``--redis-url`` its tasks
    are recorded in the key's :class:`RedisStore`."""
    scale = params["time_scale"]
    options: dict[str, Any] = {}
    limits_given: dict[str, Limits] = params.get("limits") or {}
    if scale != 1.0 or params["redis_url"]:
        options = scaled_client_options(
            scale,
            redis_url=params["redis_url"],
            api_key=params["api_key"],
            model=params["model"],
            limits_given=limits_given,
        )
    elif limits_given:
        options["model_limits"] = limits_given
    options["shared_budget"] = params["shared_budget"]
    for money in ("prices", "spend_cap", "keep_balance", "spend_scope"):
        if params.get(money) is not None:
            options[money] = params[money]
    if params["redis_url"]:
        from .redis_store import RedisStore

        # One ledger on the key's Redis: a service and batches count their tasks there.
        options["store"] = RedisStore(
            params["redis_url"],
            api_key=params["api_key"],
            redis_timeout=options["governor"].redis_timeout,
        )
    if not params["simulate"]:
        async with SoraClient(
            api_key=params["api_key"], base_url=params["base_url"], model=params["model"], **options
        ) as client:
            yield client
        return
    from .testing import FakeApixo, lognormal

    async with (
        FakeApixo(
            period=60.0 / scale,
            generation_time=lognormal(180.0 / scale, 0.35),
            pending_time=2.0 / scale,
            balance=1e9,
            seed=int(time.time()),
            state_file=params.get("state_file"),
            # A key whose limits span its models, as --shared-budget says.
            limits_per="key" if params["shared_budget"] else "model",
            # The key --limits describes (its period is the fake's own).
            model_limits={
                name: (given.requests, given.concurrent_tasks)
                for name, given in limits_given.items()
            },
        ) as fake,
        SoraClient(api_key=fake.api_key, base_url=fake.url, **options) as client,
    ):
        yield client


def _context_line(note: Note, error: BaseException | None = None) -> str:
    """Return how to still get the video the command made, if it made one."""
    task_id = note.get("task_id")
    if task_id is None or isinstance(error, TaskFailedError):  # it names its task
        return ""
    if isinstance(error, NotFoundError):
        return f"; task {task_id}"  # nothing to fetch
    urls = " ".join(note.get("urls") or [])
    where = f" (result: {urls})" if urls else ""
    return f"; task {task_id}{where}: fetch it with `sora-async download {task_id}`"


def run(params: dict[str, Any], work: Work, stop: Stop | None = None) -> NoReturn:
    """Run ``work`` with a client and exit with its code, or with one clear line.

    The first SIGINT or SIGTERM sets ``stop`` when given (see Stop), else cancels the
    work; a second one exits at once (the journal, written one transaction at a time,
    stays whole).
    """
    as_json = params["as_json"]
    note: Note = {}
    received: list[int] = []

    def on_signal(signum: int, task: asyncio.Task[int]) -> None:
        if received:
            message = "stopped at once by a second signal; run the same command again to resume"
            with contextlib.suppress(SystemExit):
                fail(message, _SIGNAL_EXIT[signum], as_json=as_json, error="Interrupted", **note)
            # At once: no cleanup may hang. The journal commits one transaction at a
            # time, so it stays whole.
            os._exit(_SIGNAL_EXIT[signum])
        received.append(signum)
        if stop is None:
            task.cancel()
            return
        if not stop.set(signum, task):
            err.print("stopping: no new creates; waiting for those in flight...", highlight=False)

    async def go() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for signum in _SIGNAL_EXIT:
            loop.add_signal_handler(signum, on_signal, signum, task)
        async with _client(params) as client:
            return await work(client, note)

    try:
        code = asyncio.run(go())
    except InputError as exc:
        fail(str(exc), as_json=as_json, field=exc.field)
    except APIError as exc:
        detail = f"the service refused: {exc}{_context_line(note, exc)}"
        fail(detail, 1, as_json=as_json, error=type(exc).__name__, code=exc.code, **note)
    except BudgetExceededError as exc:
        detail = (
            f"spend cap of ${exc.cap:,.2f} reached: ${exc.spent:,.2f} spent or held by tasks"
            f" in flight, and the next create may cost up to ${exc.estimate:,.2f}; it was not sent"
        )
        if "journal" in note:  # a batch: its journal and manifest are written
            detail += "; run the same command with a higher --max-spend to go on"
        money = {"cap": exc.cap, "spent": exc.spent, "estimate": exc.estimate}
        fail(detail, 4, as_json=as_json, error="BudgetExceededError", **money, **note)
    except RedisUnavailableError as exc:
        # Exit 1, not 2: 2 promises that nothing was sent, but Redis may go away mid-run,
        # after tasks were made and paid for. A batch (its note names its journal) has
        # written its journal and manifest, and the same command resumes it. The
        # message names Redis by its URL without a password (see _safe_url).
        resume = "; run the same command again once Redis answers" if "journal" in note else ""
        detail = f"{str(exc).rstrip('.')}{resume}{_context_line(note, exc)}"
        fail(detail, 1, as_json=as_json, error=type(exc).__name__, **note)
    except SoraError as exc:
        detail = f"{exc}{_context_line(note, exc)}"
        fail(detail, 1, as_json=as_json, error=type(exc).__name__, **note)
    except (asyncio.CancelledError, KeyboardInterrupt):
        code = _SIGNAL_EXIT[received[0]] if received else 130
        detail = f"interrupted{_context_line(note)}" if note else "interrupted"
        fail(detail, code, as_json=as_json, error="Interrupted", **note)
    except Exception as exc:  # a bug or the machine (disk full): still one line, no traceback
        detail = f"unexpected {type(exc).__name__}: {exc}{_context_line(note)}"
        fail(detail, 1, as_json=as_json, error="InternalError", **note)
    sys.exit(code)
