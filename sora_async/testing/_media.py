"""Small, valid, deterministic MP4 files for the fake service's result URLs.

The file is ``ftyp`` + ``moov`` (one H.264 video track) + ``mdat``, built box by
box as ISO/IEC 14496-12 lays it out, so that tools which inspect the structure
(``file``, ``ffprobe``, ``MP4Box -info``) accept it. The samples are
pseudo-random NAL units: the structure is right, the picture is noise.
"""

from __future__ import annotations

import functools
import hashlib
import struct

__all__ = ["build_mp4", "cached_mp4", "frame_size"]

_TIMESCALE = 1000
_SAMPLE_BYTES = 240
# A baseline-profile SPS and PPS: enough for a well-formed avcC.
_SPS = bytes.fromhex("6742c01e95a0501ed0")
_PPS = bytes.fromhex("68ce3c80")
_UNITY_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def _box(kind: bytes, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *parts)


def _noise(seed: bytes, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:size])


def frame_size(size: str | None, resolution: str | None) -> tuple[int, int]:
    """Return (width, height) for a Sora ``size`` (``"1280*720"``) or ``resolution``."""
    if size and "*" in size:
        width, _, height = size.partition("*")
        if width.isdigit() and height.isdigit():
            return int(width), int(height)
    if resolution == "1080p":
        return 1920, 1080
    return 1280, 720


def _samples(seed: bytes, count: int) -> list[bytes]:
    samples = []
    for index in range(count):
        # One length-prefixed NAL per sample: an IDR first, then non-IDR slices.
        nal_type = 0x65 if index == 0 else 0x41
        body = bytes([nal_type]) + _noise(seed + index.to_bytes(4, "big"), _SAMPLE_BYTES - 5)
        samples.append(struct.pack(">I", len(body)) + body)
    return samples


def _sample_entry(width: int, height: int) -> bytes:
    avcc = _box(
        b"avcC",
        bytes([1, _SPS[1], _SPS[2], _SPS[3], 0xFF, 0xE1]),
        struct.pack(">H", len(_SPS)),
        _SPS,
        b"\x01",
        struct.pack(">H", len(_PPS)),
        _PPS,
    )
    return _box(
        b"avc1",
        bytes(6),  # reserved
        struct.pack(">H", 1),  # data_reference_index
        bytes(16),  # pre_defined + reserved
        struct.pack(">HH", width, height),
        struct.pack(">II", 0x00480000, 0x00480000),  # 72 dpi
        bytes(4),  # reserved
        struct.pack(">H", 1),  # frame_count
        bytes(32),  # compressorname
        struct.pack(">Hh", 0x0018, -1),  # depth, pre_defined
        avcc,
    )


def _moov(width: int, height: int, sizes: list[int], first_offset: int) -> bytes:
    count = len(sizes)
    duration = count * _TIMESCALE  # one sample per second
    mvhd = _full_box(
        b"mvhd",
        0,
        0,
        struct.pack(">IIII", 0, 0, _TIMESCALE, duration),
        struct.pack(">IH", 0x00010000, 0x0100),  # rate 1.0, volume 1.0
        bytes(10),
        _UNITY_MATRIX,
        bytes(24),
        struct.pack(">I", 2),  # next_track_ID
    )
    tkhd = _full_box(
        b"tkhd",
        0,
        0x3,  # enabled, in movie
        struct.pack(">IIIII", 0, 0, 1, 0, duration),
        bytes(8),
        struct.pack(">hhhH", 0, 0, 0, 0),  # layer, alternate_group, volume, reserved
        _UNITY_MATRIX,
        struct.pack(">II", width << 16, height << 16),
    )
    mdhd = _full_box(
        b"mdhd",
        0,
        0,
        struct.pack(">IIII", 0, 0, _TIMESCALE, duration),
        struct.pack(">HH", 0x55C4, 0),  # language "und"
    )
    hdlr = _full_box(b"hdlr", 0, 0, bytes(4), b"vide", bytes(12), b"VideoHandler\x00")
    vmhd = _full_box(b"vmhd", 0, 1, bytes(8))
    dinf = _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1)))
    stbl = _box(
        b"stbl",
        _full_box(b"stsd", 0, 0, struct.pack(">I", 1), _sample_entry(width, height)),
        _full_box(b"stts", 0, 0, struct.pack(">III", 1, count, _TIMESCALE)),
        _full_box(b"stss", 0, 0, struct.pack(">II", 1, 1)),
        _full_box(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, count, 1)),
        _full_box(b"stsz", 0, 0, struct.pack(">II", 0, count), struct.pack(f">{count}I", *sizes)),
        _full_box(b"stco", 0, 0, struct.pack(">II", 1, first_offset)),
    )
    minf = _box(b"minf", vmhd, dinf, stbl)
    trak = _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, minf))
    return _box(b"moov", mvhd, trak)


def build_mp4(key: str, seconds: int = 10, width: int = 1280, height: int = 720) -> bytes:
    """Build the MP4 bytes for ``key`` (a task id): same key and shape, same bytes.

    >>> build_mp4("task_1")[4:8]
    b'ftyp'
    """
    seed = hashlib.sha256(key.encode()).digest()
    samples = _samples(seed, max(1, seconds))
    sizes = [len(sample) for sample in samples]
    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isom", b"iso2", b"avc1", b"mp41")
    # moov's size does not depend on the offset value, so measure it with a dummy first.
    moov_len = len(_moov(width, height, sizes, 0))
    first_offset = len(ftyp) + moov_len + 8  # the sample data starts after mdat's header
    moov = _moov(width, height, sizes, first_offset)
    mdat = _box(b"mdat", *samples)
    return ftyp + moov + mdat


@functools.lru_cache(maxsize=256)
def cached_mp4(task_id: str, duration: int, width: int, height: int) -> bytes:
    """Return :func:`build_mp4` for a task, keeping only the recently served files
    (a resumed download asks for the same bytes again; a long run must not keep all)."""
    return build_mp4(task_id, duration, width, height)
