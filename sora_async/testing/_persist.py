"""The fake service's task table kept in a file, so that a restarted fake knows its tasks.

One JSON line per task made, appended as it is made (a killed process loses nothing it
answered), plus one line per start naming the port, so that the result URLs handed out
before a restart still work after it. A task's times are kept as wall-clock seconds:
a task that was due to end while no fake ran has ended when the next one starts.
Meant for fakes that run in real time (``sora-async batch --simulate``, ``simulate
--state``), not under ``looptime``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._state import TaskRecord
from ._timing import Clock

__all__ = ["StateFile"]

_FIELDS = (
    "task_id",
    "model",
    "prompt",
    "input",
    "request_type",
    "callback_url",
    "provider",
    "duration",
    "width",
    "height",
    "cost",
    "final_state",
    "fail_code",
    "fail_msg",
)
_TIMES = ("created_at", "pending_until", "complete_at")


@dataclass
class StateFile:
    """Append the tasks a fake makes to ``path``; read them back at the next start."""

    path: Path

    def port(self) -> int:
        """Return the port of the last start, or 0 (pick a free one)."""
        port = 0
        for line in self._lines():
            port = int(line.get("port", port))
        return port

    def started(self, port: int) -> None:
        """Record that a fake now listens on ``port``."""
        # First a line end: the last line of a killed process may lack its own.
        self._append({"port": port}, fresh_line=True)

    def load(self, clock: Clock) -> Iterator[TaskRecord]:
        """Yield the recorded tasks with their times moved onto ``clock``."""
        shift = clock.now() - time.time()  # wall-clock seconds to server seconds
        for line in self._lines():
            if "task_id" not in line:
                continue
            fields = {name: line[name] for name in _FIELDS}
            times = {name: line[name] + shift for name in _TIMES}
            yield TaskRecord(**fields, **times, _now=clock.now, _epoch_ms=clock.epoch_ms)

    def made(self, record: TaskRecord, now: Callable[[], float]) -> None:
        """Record a task just made (``now``: the server clock)."""
        shift = time.time() - now()  # server seconds to wall-clock seconds
        line = {name: getattr(record, name) for name in _FIELDS}
        line |= {name: getattr(record, name) + shift for name in _TIMES}
        self._append(line)

    def _lines(self) -> Iterator[dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        for raw in text.split("\n"):
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # the last line of a killed process may be cut short
            if isinstance(line, dict):
                yield line

    def _append(self, line: dict[str, Any], *, fresh_line: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(("\n" if fresh_line else "") + json.dumps(line) + "\n")
