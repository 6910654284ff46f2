"""Logs without secrets and without floods, for examples/fastapi_app.py.

:class:`RedactSecrets` replaces ``token=`` values (uvicorn's access log prints every
request's query string, the callback's secret included) and given secrets with
``***``; :class:`SummariseRepeats` lets the first of a repeated warning or error
through and summarises the rest once per period; :func:`install_log_guards` puts
both on the loggers and handlers that matter.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

__all__ = ["GUARDED_LOGGERS", "RedactSecrets", "SummariseRepeats", "install_log_guards"]

# The loggers whose records this app guards: uvicorn's, asyncio's, the library's, ours
# (a logger's filters see only the records made on it, not its children's).
GUARDED_LOGGERS = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "asyncio",
    "sora_async",
    "sora_async.examples.fastapi_app",
)

# A token in a query string (uvicorn's access log prints every request's) or a form.
_TOKEN = re.compile(r"(token=)[^&\s\"']+")


class RedactSecrets(logging.Filter):
    """Replace ``token=`` values and the given secrets with ``***`` in every record.

    It edits the message, its string arguments and the text of its traceback, in
    place, and keeps the arguments a tuple of the same shape (uvicorn's access
    formatter unpacks them).
    """

    def __init__(self, secrets_: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({value for value in secrets_ if value}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """Return ``text`` with every token value and secret replaced by ``***``."""
        for value in self._secrets:
            text = text.replace(value, "***")
        return _TOKEN.sub(r"\1***", text)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(
                self.redact(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        if record.exc_info and not record.exc_text:
            # Formatters use exc_text when set: the traceback is redacted once, here.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


class SummariseRepeats(logging.Filter):
    """Let one warning or error through, then summarise its repeats once per ``period``.

    Records at WARNING and above with the same logger, level, message template and
    exception type are one kind. The first of a kind passes; later ones within
    ``period`` seconds of the last one passed are counted and dropped; the first one
    after that passes without its traceback, saying how many were dropped. INFO and
    below (the access log) always pass. Thread-safe; remembers at most ``kinds`` kinds.
    ``clock`` returns seconds (a test may pass its own).
    """

    def __init__(
        self,
        period: float = 10.0,
        *,
        kinds: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.period = period
        self._clock = clock
        self._kinds = kinds
        # kind -> (when one last passed, how many were dropped since)
        self._seen: OrderedDict[tuple[object, ...], tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc_type = record.exc_info[0] if record.exc_info else None
        kind = (record.name, record.levelno, str(record.msg), exc_type)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is None:
                self._seen[kind] = (now, 0)
                if len(self._seen) > self._kinds:
                    self._seen.popitem(last=False)
                return True
            self._seen.move_to_end(kind)
            passed, dropped = seen
            if now - passed < self.period:
                self._seen[kind] = (passed, dropped + 1)
                return False
            self._seen[kind] = (now, 0)
        if dropped:
            summary = f"{dropped} more like it in the last {now - passed:.0f} s, not logged"
            record.msg = f"{record.getMessage()} ({summary}; the first had the traceback)"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def install_log_guards(redact: RedactSecrets, repeats: SummariseRepeats) -> Callable[[], None]:
    """Add the filters to the guarded loggers and to every handler configured now
    (the last-resort one included).

    A logger's filter sees only the records made on it, a handler's sees every record
    it writes: the redaction goes on both. Returns a function that removes them.
    """
    loggers = [logging.getLogger(name) for name in GUARDED_LOGGERS]
    configured = [
        one for one in logging.Logger.manager.loggerDict.values() if isinstance(one, logging.Logger)
    ]
    every = [logging.getLogger(), *loggers, *configured]
    handlers = {id(h): h for one in every for h in one.handlers}
    if logging.lastResort is not None:  # prints WARNING+ of loggers without a handler
        handlers[id(logging.lastResort)] = logging.lastResort
    for one in loggers:
        one.addFilter(repeats)
        one.addFilter(redact)
    for handler in handlers.values():
        handler.addFilter(redact)

    def remove() -> None:
        for one in loggers:
            one.removeFilter(repeats)
            one.removeFilter(redact)
        for handler in handlers.values():
            handler.removeFilter(redact)

    return remove
