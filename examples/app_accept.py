"""No busy loop at the open-file limit, for examples/fastapi_app.py.

When a process runs out of file descriptors, ``accept()`` fails with EMFILE and the
listening socket stays readable. asyncio's selector loop means to back off: it logs
the error, stops watching the socket and watches it again a second later
(``ACCEPT_RETRY_DELAY``). But up to Python 3.14 its accept loop does not stop at that
first failure (CPython issue 151615): it tries ``accept()`` again for every slot of
the listen backlog (2,048 under uvicorn), and each failure logs a traceback and
schedules one more retry. A second later those retries fire one by one, each
watching the socket again, and each readiness runs 2,048 failing attempts more: the
process spins on a core (23 CPU-s in 28 s were measured) and answers nobody.

:func:`back_off_accept` makes the running loop's accept loop end at the first such
failure, as it was meant to: one attempt, one log record and one retry a second.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["back_off_accept"]

# The errors asyncio backs off from: the process or the system is out of something.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _StopAtExhaustion:
    """A listening socket whose ``accept()`` reports the backlog empty once an attempt
    failed for lack of resources, so that asyncio's accept loop ends there."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._exhausted = False

    def accept(self) -> tuple[socket.socket, Any]:
        """Accept a connection, as the socket does, until one attempt is refused."""
        if self._exhausted:
            raise BlockingIOError(errno.EAGAIN, "the retry waits for the loop's back-off")
        try:
            return self.sock.accept()
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                self._exhausted = True
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def back_off_accept(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Make ``loop`` stop accepting at the first EMFILE (ENFILE, ENOBUFS, ENOMEM) until
    its back-off ends, instead of trying once per slot of the backlog.

    Call it before the server starts listening (in a lifespan's start-up: uvicorn
    runs it first). Only asyncio's selector loops are changed (uvloop handles EMFILE
    in libuv). Returns a function that puts the loop's own accept loop back.
    """
    original = getattr(loop, "_accept_connection", None)
    if not isinstance(loop, asyncio.SelectorEventLoop) or original is None:
        return lambda: None

    def accept_connection(protocol_factory: Any, sock: Any, *args: Any, **kwargs: Any) -> None:
        # The retry asyncio schedules gets our wrapper back: unwrap it each time.
        raw = sock.sock if isinstance(sock, _StopAtExhaustion) else sock
        original(protocol_factory, _StopAtExhaustion(raw), *args, **kwargs)

    # An attribute of this loop object shadows its class's method: the loop looks the
    # method up when it starts watching a listening socket.
    loop._accept_connection = accept_connection  # type: ignore[attr-defined]

    def restore() -> None:
        if loop.__dict__.get("_accept_connection") is accept_connection:
            del loop._accept_connection  # type: ignore[attr-defined]

    return restore
