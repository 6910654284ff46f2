"""Small, valid, deterministic PNG and JPEG files for the fake's image results."""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib

__all__ = ["IMAGE_TYPES", "cached_image"]

#: File extension -> Content-Type of the image files the fake serves.
IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg"}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def build_png(key: str, side: int = 8) -> bytes:
    """Build an RGB PNG of ``side`` x ``side`` noise seeded by ``key``."""
    noise = hashlib.sha256(key.encode()).digest()
    rows = b"".join(
        b"\x00" + bytes(noise[(x + y) % len(noise)] for x in range(side * 3)) for y in range(side)
    )
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def build_jpeg(key: str) -> bytes:
    """Build a baseline 8x8 grey JPEG (one block: DC 0, end of block), tagged with ``key``."""
    one_code = bytes([1]) + bytes(15) + b"\x00"  # a single 1-bit code for symbol 0
    return b"".join(
        (
            b"\xff\xd8",
            _segment(0xFE, key.encode()[:200]),  # a comment makes each task's file its own
            _segment(0xDB, b"\x00" + bytes([1]) * 64),
            _segment(0xC0, struct.pack(">BHHB", 8, 8, 8, 1) + b"\x01\x11\x00"),
            _segment(0xC4, b"\x00" + one_code),
            _segment(0xC4, b"\x10" + one_code),
            _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"),
            b"\x3f",  # DC category 0 ("0"), end of block ("0"), padded with ones
            b"\xff\xd9",
        )
    )


@functools.lru_cache(maxsize=256)
def cached_image(key: str, extension: str) -> bytes:
    """Return the image file for ``key`` in format ``extension`` (``png`` or ``jpg``)."""
    return build_jpeg(key) if extension == "jpg" else build_png(key)
