"""A throwaway ``redis-server`` on a free loopback port, for tests of the shared governor."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "redis_server_binary"]


def redis_server_binary() -> str | None:
    """Return the ``redis-server`` to run (env ``SORA_ASYNC_REDIS_SERVER``, else PATH)."""
    return os.environ.get("SORA_ASYNC_REDIS_SERVER") or shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """Run a real ``redis-server`` on 127.0.0.1 as a user would, and restart it at will.

    ``persist=True`` saves the data on shutdown (``SAVE`` on ``stop``), so a restart
    keeps it; otherwise a restart starts empty, as a cache without persistence does.

    Example::

        with RedisServer() as server:
            governor = sa.RedisGovernor(server.url, api_key="...")
    """

    def __init__(self, *, persist: bool = False, port: int | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError(
                "redis-server not found: install it (Debian: apt-get install redis-server) "
                "or set SORA_ASYNC_REDIS_SERVER"
            )
        self.binary = binary
        self.persist = persist
        self.port = port or _free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="sora-async-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return the ``redis://`` URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers."""
        save = ["--save", "", "--appendonly", "no"]
        if self.persist:
            save = ["--save", "3600 1", "--dbfilename", "dump.rdb"]
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self._dir),
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                *save,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self._process.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, *, keep_data: bool = True) -> None:
        """Stop the server, saving its data first when ``persist`` (unless not ``keep_data``)."""
        if self._process is None:
            return
        if self.persist and keep_data:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
                    conn.sendall(b"SAVE\r\n")
                    conn.recv(64)
            except OSError:
                pass
        self._process.kill()
        self._process.wait()
        self._process = None
        if not keep_data:
            (self._dir / "dump.rdb").unlink(missing_ok=True)

    def restart(self, *, down_for: float = 0.0, keep_data: bool = True) -> None:
        """Stop the server, stay down ``down_for`` seconds, and start it on the same port.

        The data survives when ``persist`` and ``keep_data`` are both true.
        """
        self.stop(keep_data=keep_data)
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
