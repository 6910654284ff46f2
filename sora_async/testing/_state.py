"""Task table, limits and counters of the fake APIXO service (no HTTP here)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from ._timing import Clock
from ._validate import CreateSpec

__all__ = [
    "KeyLimits",
    "Neighbour",
    "RateWindow",
    "Stats",
    "TaskRecord",
    "TaskState",
    "fail_message",
]

# The clock counts whole microseconds: a task whose end is due within one tick has
# ended, so that a status answer agrees with the callback its end just fired.
_TICK = 1e-6

TaskState = Literal["pending", "processing", "success", "failed"]

_US = 1_000_000
_FAIL_MESSAGES = {
    "CONTENT_VIOLATION": "Content does not meet safety guidelines",
    "GENERATION_FAILED": "Video generation failed, please try again",
    "INVALID_IMAGE_URL": "Cannot access provided image URL",
    "PROCESSING_TIMEOUT": "Processing timed out",
    "TASKID_ERROR": "taskId is invalid, expired or not from veo-3-1",
    "SensitiveContent": "The prompt or output was flagged as sensitive content",
}


def fail_message(code: str) -> str:
    """Return the ``failMsg`` sent with ``failCode`` ``code``."""
    return _FAIL_MESSAGES.get(code, f"Task failed: {code}")


def _kinds() -> collections.Counter[str]:
    return collections.Counter({"create": 0, "status": 0, "balance": 0})


@dataclass
class Stats:
    """Count what the fake service saw, from the server's side of the wire.

    Every field is cumulative since the server started and can be read at any
    time. "Admitted" requests are those that passed the rate check; phantom
    requests and tasks of :meth:`FakeApixo.add_neighbour` are never counted here.
    """

    #: Authenticated API requests that arrived (create, status, balance), 429s and faults included.
    requests: int = 0
    #: ``requests`` split by kind: ``create``, ``status``, ``balance``.
    requests_by_kind: collections.Counter[str] = field(default_factory=_kinds)
    #: Largest number of our admitted requests in any trailing ``period`` window.
    max_requests_in_window: int = 0
    #: 429 responses sent, for any reason (window, concurrency or injected).
    rate_limited: int = 0
    #: ``rate_limited`` split by kind.
    rate_limited_by_kind: collections.Counter[str] = field(default_factory=_kinds)
    #: Creates refused with 429 because the key held ``concurrent_tasks`` unfinished tasks.
    concurrency_limited: int = 0
    #: Largest number of our unfinished (pending or processing) tasks at any instant.
    max_concurrent_tasks: int = 0
    #: Largest number of our admitted requests of every model together in any trailing
    #: ``period`` window, whatever ``limits_per`` (with ``"key"`` it is
    #: ``max_requests_in_window``).
    max_requests_in_window_all_models: int = 0
    #: ``max_requests_in_window`` per model's window (balance calls count in sora-2-pro's).
    max_requests_in_window_by_model: collections.Counter[str] = field(
        default_factory=collections.Counter
    )
    #: Largest number of one model's unfinished tasks at any instant, per model.
    max_concurrent_tasks_by_model: collections.Counter[str] = field(
        default_factory=collections.Counter
    )
    #: Tasks made, per model.
    creates_by_model: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Tasks made.
    creates: int = 0
    #: Tasks made per prompt: more than 1 means a prompt was paid for more than once.
    creates_per_prompt: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Requests refused with 401 (counted nowhere else).
    unauthorized: int = 0
    #: File GET (or HEAD) requests, whatever their outcome.
    downloads: int = 0
    #: Injected faults served, by fault name.
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    #: The part of ``faults`` served on creates, by fault name.
    create_faults: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Callback POSTs tried (first tries, retries and duplicates); = delivered + failed attempts.
    callbacks_attempted: int = 0
    #: Callback POSTs the receiver answered with HTTP 200 (duplicates included).
    callbacks_delivered: int = 0
    #: Callback POSTs that failed: not 200, connection error or ``callback_timeout``.
    callbacks_failed_attempts: int = 0
    #: Callback tasks whose callback never arrived: dropped by ``callback_loss`` or given
    #: up after every retry failed.
    callbacks_lost: int = 0
    #: Extra copies of an already delivered callback sent (``callback_duplicates``).
    callbacks_duplicated: int = 0


@dataclass(eq=False)
class TaskRecord:
    """Hold one task as the server knows it: its input, its timeline and its fate.

    Times (``created_at``, ``pending_until``, ``complete_at``, ``first_seen_done_at``)
    are server seconds since the fake started. ``complete_at`` is planned at
    create time and moved by :meth:`FakeApixo.finish`.
    """

    task_id: str
    model: str
    prompt: str
    input: dict[str, Any]
    request_type: str
    callback_url: str | None
    provider: str
    #: Seconds of video made and billed (12 with provider ``official``).
    duration: int
    width: int
    height: int
    cost: float
    created_at: float
    pending_until: float
    complete_at: float
    #: State the task ends in: ``success`` or ``failed``.
    final_state: Literal["success", "failed"]
    fail_code: str | None = None
    fail_msg: str | None = None
    #: Status requests that asked about this task.
    polls: int = 0
    #: When a status answer first showed this task terminal, or a callback about it was
    #: answered 200, whichever came first (detection time).
    first_seen_done_at: float | None = None
    #: ``video`` or ``image``; image tasks make ``images`` files of ``image_format``.
    kind: str = "video"
    images: int = 0
    image_format: str = "png"
    _now: Callable[[], float] = field(default=lambda: 0.0, repr=False)
    _epoch_ms: int = field(default=0, repr=False)

    @classmethod
    def plan(
        cls,
        task_id: str,
        model: str,
        spec: CreateSpec,
        now: float,
        cost: float,
        generation: float,
        pending_time: float,
        fail_code: str | None,
        clock: Clock,
    ) -> TaskRecord:
        """Make the record of a task accepted at ``now`` that will end ``generation`` s later."""
        return cls(
            task_id=task_id,
            model=model,
            prompt=spec.prompt,
            input=spec.input,
            request_type=spec.request_type,
            callback_url=spec.callback_url,
            provider=spec.provider,
            duration=spec.duration,
            width=spec.width,
            height=spec.height,
            cost=cost,
            created_at=now,
            pending_until=now + min(pending_time, generation),
            complete_at=now + generation,
            final_state="failed" if fail_code else "success",
            fail_code=fail_code,
            fail_msg=fail_message(fail_code) if fail_code else None,
            kind=spec.kind,
            images=spec.images,
            image_format=spec.image_format,
            _now=clock.now,
            _epoch_ms=clock.epoch_ms,
        )

    def end(self, now: float, state: str, fail_code: str) -> None:
        """End the task at server time ``now`` in ``state`` (failed with ``fail_code``).

        Raises:
            ValueError: the task is already terminal, or ``state`` is not terminal.
        """
        if state not in ("success", "failed"):
            raise ValueError(f"state must be success or failed, not {state!r}")
        if self.ended_by(now):
            raise ValueError(f"{self.task_id} is already {self.state_at(now)}")
        self.complete_at = now
        self.pending_until = min(self.pending_until, now)
        self.final_state = "failed" if state == "failed" else "success"
        self.fail_code = fail_code if state == "failed" else None
        self.fail_msg = fail_message(fail_code) if state == "failed" else None

    def ended_by(self, t: float) -> bool:
        """Tell whether the task has ended by server time ``t`` (to the clock's tick)."""
        return t >= self.complete_at - _TICK

    def state_at(self, t: float) -> TaskState:
        """Return the state at server time ``t``."""
        if self.ended_by(t):
            return self.final_state
        if t < self.pending_until:
            return "pending"
        return "processing"

    @property
    def state(self) -> TaskState:
        """Return the state now."""
        return self.state_at(self._now())

    @property
    def finished(self) -> bool:
        """Tell whether the task is terminal now."""
        return self.ended_by(self._now())

    @property
    def create_time(self) -> int:
        """Return ``createTime`` as sent on the wire (ms)."""
        return self._epoch_ms + round(self.created_at * _US) // 1000

    @property
    def complete_time(self) -> int:
        """Return ``completeTime`` as sent on the wire (ms), planned if not yet done."""
        return self._epoch_ms + round(self.complete_at * _US) // 1000

    def progress_at(self, t: float) -> int:
        """Return a 0-99 progress percentage at server time ``t`` (an undocumented field)."""
        span = self.complete_at - self.created_at
        if span <= 0:
            return 99
        return max(0, min(99, int(100 * (t - self.created_at) / span)))

    def result_files(self) -> list[str]:
        """Return the names of the task's result files under ``/files/``."""
        if self.kind == "image":
            return [f"{self.task_id}-{n}.{self.image_format}" for n in range(1, self.images + 1)]
        return [f"{self.task_id}.mp4"]

    def status_data(self, t: float, files_url: str) -> dict[str, Any]:
        """Return the status endpoint's ``data`` at server time ``t``, shaped as the seed.

        ``files_url`` is where result files are served (``.../files``)."""
        state = self.state_at(t)
        data: dict[str, Any] = {"taskId": self.task_id, "state": state}
        if state == "success":
            urls = [f"{files_url}/{name}" for name in self.result_files()]
            data["resultJson"] = msgspec.json.encode({"resultUrls": urls}).decode()
        elif state == "failed":
            data["failCode"] = self.fail_code
            data["failMsg"] = self.fail_msg
        data["createTime"] = self.create_time
        if state in ("success", "failed"):
            data["completeTime"] = self.complete_time
        if state == "success":
            data["costTime"] = self.complete_time - self.create_time
        if state == "processing":
            # Not in the docs: clients must accept fields they do not know.
            data["progress"] = self.progress_at(t)
        return data


class RateWindow:
    """Keep the admitted request times of the trailing window, in integer microseconds."""

    def __init__(self, period: float) -> None:
        """Make an empty window ``period`` seconds long."""
        self.period_us = round(period * _US)
        self._times: collections.deque[int] = collections.deque()

    def count(self, now_us: int) -> int:
        """Return admitted requests in ``(now - period, now]``."""
        edge = now_us - self.period_us
        while self._times and self._times[0] <= edge:
            self._times.popleft()
        return len(self._times)

    def admit(self, now_us: int) -> int:
        """Record one admitted request now and return the window's new count."""
        self._times.append(now_us)
        return self.count(now_us)


@dataclass(frozen=True)
class Neighbour:
    """Play another program on the same key: held task slots and an even request stream."""

    requests_per_minute: int
    tasks: int
    start_us: int

    def requests_in_window(self, now_us: int, period_us: int) -> int:
        """Return the phantom requests in ``(now - period, now]``: one at start, then evenly."""
        if self.requests_per_minute <= 0 or now_us < self.start_us:
            return 0
        interval = max(1, round(60 * _US / self.requests_per_minute))
        last = (now_us - self.start_us) // interval
        lower = now_us - period_us - self.start_us
        first = 0 if lower < 0 else lower // interval + 1
        return max(0, last - first + 1)


class KeyLimits:
    """Hold one key's rate window and task slots, the neighbours' share included."""

    def __init__(self, period: float) -> None:
        """Make empty limits with a ``period``-second rate window."""
        self.window = RateWindow(period)
        self.neighbours: list[Neighbour] = []
        self._live: dict[str, TaskRecord] = {}  # maybe unfinished; pruned on the clock

    def admit(self, now_us: int, limit: int) -> int | None:
        """Admit a request now if the window has room; return our count, or None for 429."""
        period_us = self.window.period_us
        phantom = sum(n.requests_in_window(now_us, period_us) for n in self.neighbours)
        if self.window.count(now_us) + phantom >= limit:
            return None
        return self.window.admit(now_us)

    def track(self, record: TaskRecord) -> None:
        """Count ``record`` as holding a slot until its ``complete_at``."""
        self._live[record.task_id] = record

    def unfinished(self, now: float) -> int:
        """Return our tasks still pending or processing at ``now``."""
        for task_id in [tid for tid, rec in self._live.items() if rec.ended_by(now)]:
            del self._live[task_id]
        return len(self._live)

    def slots_taken(self, now: float) -> int:
        """Return the slots held at ``now``: our unfinished tasks plus the neighbours'."""
        return self.unfinished(now) + sum(n.tasks for n in self.neighbours)
