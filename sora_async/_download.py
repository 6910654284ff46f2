"""Downloads of result files (videos, images): streamed, checked, resumed, renamed atomically.

Result URLs live on a CDN, not the API: downloads never carry the API key and do
not spend the API's request budget; they have a concurrency limit of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
import tempfile
import unicodedata
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import aiohttp

from ._errors import InputError, TransportError
from ._models import Result, Video, check_http_url

__all__ = ["DEFAULT_MAX_DOWNLOAD_BYTES", "Downloader", "check_folder", "file_stem", "targets"]

logger = logging.getLogger("sora_async")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: What a result file is, by Content-Type; the URL's suffix is the fallback.
_TYPE_SUFFIXES = {
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/webm": ".webm",
    "video/x-m4v": ".m4v",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
}
_MEDIA_SUFFIXES = frozenset({*_TYPE_SUFFIXES.values(), ".jpeg"})
_CHUNK = 1 << 16


#: The largest video a download accepts unless told otherwise: far above any Sora 2 Pro
#: result (a 15-s 1080p video is tens of MB), far below a disk filled by a runaway stream.
DEFAULT_MAX_DOWNLOAD_BYTES = 2 * 1024**3
_STEM_MAX = 180  # leaves room for "-<hash>+<n>.mp4" inside a 255-byte file name
_HASH_CHARS = 12  # 48 bits: a clash among a million unsafe ids is about 1 in 500


def file_stem(name: str) -> str:
    """Return a file stem for ``name`` (a batch id or a task id) that stays in its folder.

    A name made only of ``A-Z a-z 0-9 . _ -`` (not starting or ending with ``.`` or
    ``_``, at most 180 characters) is its own stem. Any other name gets a safe form
    (transliterated to ASCII, unsafe runs replaced by ``_``, cut short) followed by a
    short hash of the whole name, so that distinct names never share a file.

    Example: ``file_stem("été 2/3")`` is ``"ete_2_3-"`` plus 12 hex digits.
    """
    ascii_form = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    stem = _UNSAFE.sub("_", ascii_form).strip("._")[:_STEM_MAX].rstrip("._")
    if stem == name:
        return stem
    # surrogatepass: an id from a JSON file may hold a lone surrogate; it still hashes.
    whole = name.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(whole).hexdigest()[:_HASH_CHARS]
    return f"{stem}-{digest}" if stem else digest


def check_folder(folder: Path, field: str = "output") -> None:
    """Make ``folder`` if need be and check that a file can be written in it.

    Raises InputError naming ``field``, the folder and the reason. Run it before a
    create, so that a video is never paid for with nowhere to save it.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A probe of its own: shards of one batch may check one folder at once.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sora-async-write-test-"):
            pass
    except OSError as exc:
        raise InputError(field, f"cannot write to {folder}: {exc.strerror or exc}") from exc


def _suffix(url: str, fallback: str) -> str:
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    return suffix if suffix in _MEDIA_SUFFIXES else fallback


def targets(video: Result, dest: Path, stem: str | None = None) -> list[Path]:
    """Return where each result URL is first aimed: ``<stem>.mp4``, ``<stem>+2.png``...

    The stem is :func:`file_stem` of ``stem`` (default: the task id). ``+`` never
    occurs in a stem, so an extra file never takes the name of another id's file.
    The suffix comes from the URL (``.mp4`` for a video, ``.bin`` for another result,
    when the URL has none); the answer's Content-Type may correct it on download.
    """
    base = file_stem(stem if stem is not None else video.task_id)
    fallback = ".mp4" if isinstance(video, Video) else ".bin"
    paths = []
    for index, url in enumerate(video.urls):
        check_http_url(f"urls[{index}]", url)
        name = base if index == 0 else f"{base}+{index + 1}"
        path = dest / f"{name}{_suffix(url, fallback)}"
        if path.resolve().parent != dest.resolve():
            raise InputError("task_id", f"file name {name!r} would leave {dest}")
        paths.append(path)
    return paths


class Downloader:
    """Fetch result URLs into a folder, at most ``concurrency`` at a time, each file at
    most ``max_bytes`` long."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        concurrency: int = 4,
        attempts: int = 5,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
    ) -> None:
        self._session = session
        self._slots = asyncio.Semaphore(concurrency)
        self._attempts = attempts
        self._max_bytes = max_bytes
        self._random = random.Random()

    async def download(
        self, video: Result, dest: str | os.PathLike[str], stem: str | None = None
    ) -> list[Path]:
        """Save every URL of ``video`` under ``dest``; return the paths in URL order.

        A file is named for what it is: the suffix of its Content-Type, else its URL's."""
        if not video.urls:
            raise InputError("video.urls", "has no result URL to download")
        folder = _make_folder(Path(dest))
        paths = targets(video, folder, stem)
        saved = []
        for url, path in zip(video.urls, paths, strict=True):
            async with self._slots:
                saved.append(await self._fetch_with_retries(url, path))
        return saved

    async def _fetch_with_retries(self, url: str, path: Path) -> Path:
        partial = path.with_name(f".{path.name}.part")
        for attempt in range(1, self._attempts + 1):
            try:
                kind = await self._fetch(url, partial)
            except _Retryable as exc:
                if attempt == self._attempts:
                    raise TransportError(f"download of {path.name} failed: {exc}") from exc
                wait = self._random.uniform(0, min(30.0, 0.5 * 2**attempt))
                logger.info("download of %s: %s; resuming in %.1f s", path.name, exc, wait)
                await asyncio.sleep(wait)
            except TransportError:
                _size(partial, remove=True)  # refused for good: leave nothing half-written
                raise
            else:
                suffix = _TYPE_SUFFIXES.get(kind)
                if (
                    suffix is not None
                    and path.suffix != suffix
                    and not (suffix == ".jpg" and path.suffix == ".jpeg")
                ):
                    path = path.with_suffix(suffix)
                os.replace(partial, path)  # atomic: the target is whole or absent
                return path
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _fetch(self, url: str, partial: Path) -> str:
        """Fetch into ``partial`` (resuming it); return the answer's media type."""
        have = _size(partial)
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            async with self._session.get(url, headers=headers) as response:
                if response.status == 416 and have:
                    _size(partial, remove=True)  # longer than the video: start over
                    raise _Retryable("range not satisfiable")
                if response.status >= 500 or response.status == 429:
                    raise _Retryable(f"HTTP {response.status}")
                if response.status not in (200, 206):
                    raise TransportError(f"download refused: HTTP {response.status} for {url}")
                kind = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
                if kind and not kind.startswith(("video/", "image/", "application/octet-stream")):
                    # A CDN's error page: often passing, so tried again (a few times).
                    raise _Retryable(f"got {kind!r}, not a video or image")
                if response.status == 200:
                    have = 0  # the server ignored Range: start over
                length = response.content_length
                expected = None if length is None else have + length
                if expected is not None and expected > self._max_bytes:
                    raise TransportError(self._too_large(url, f"announces {expected} bytes"))
                # Plain file writes: chunks are small and local disks fast enough that
                # a thread hop per chunk would cost more than it saves.
                with partial.open("ab" if have else "wb") as out:
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        have += len(chunk)
                        if have > self._max_bytes:
                            raise TransportError(self._too_large(url, "streams on"))
                        out.write(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        size = _size(partial)
        if expected is not None and size != expected:
            raise _Retryable(f"got {size} of {expected} bytes")
        return kind

    def _too_large(self, url: str, what: str) -> str:
        return (
            f"download of {url} refused: it {what} past the cap of {self._max_bytes} bytes"
            " (SoraClient(max_download_bytes=...))"
        )


# Metadata calls take microseconds on a local disk: not worth a thread hop.
def _size(path: Path, *, remove: bool = False) -> int:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if remove:
        path.unlink()
    return size


def _make_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError("dest", f"cannot create folder {folder}: {exc.strerror}") from exc
    return folder


class _Retryable(Exception):
    """A download attempt failed in a way that resuming may mend."""
