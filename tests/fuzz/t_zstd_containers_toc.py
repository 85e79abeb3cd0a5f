"""zstd:chunked, containers/storage's dialect, the TOC JSON itself.

Input: a payload selector byte (0: none; k: the payload area of seed blob
k), a flags byte, then the TOC JSON (containers/storage's ``minimal.TOC``).
The harness compresses it into a zstd frame in a skippable frame, adds the
40-byte footer and re-seals manifest-checksum. Flags: bit 0 no
manifest-position annotation (the driver reads the footer), bit 1 the
io.github. prefix, bit 2 a piece cache directory, bit 3 an uncompressed
length of 0 in the position (the driver must not trust it).
"""

from __future__ import annotations

import zstandard

from .common import sha256
from .lazy_common import (
    JSON_DICT,
    PREFIXES,
    ZSTD_TYPE,
    Scratch,
    open_and_read,
    payloads,
    position,
    zstd_toc_blob,
)

NAME = "zstd-containers-toc"
MAX_LEN = 128 << 10
DICT = JSON_DICT

_payloads: list[bytes] | None = None
_scratch: Scratch | None = None
_cctx = zstandard.ZstdCompressor(level=1)


def target(data: bytes) -> None:
    global _payloads, _scratch
    if len(data) < 2:
        return
    if _payloads is None:
        _payloads = payloads("zstd-containers")
    select, flags, toc_json = data[0], data[1], data[2:]
    payload = _payloads[select % len(_payloads)]
    frame = _cctx.compress(toc_json)
    ulength = 0 if flags & 8 else len(toc_json)
    blob, offset = zstd_toc_blob(payload, frame, ulength)
    prefix = (flags >> 1) % 2
    annotations = {PREFIXES[prefix] + "manifest-checksum": sha256(frame)}
    if not flags & 1:
        annotations.update(position(offset, len(frame), ulength, prefix))
    scratch = None
    if flags & 4:
        _scratch = _scratch or Scratch()
        scratch = _scratch
    open_and_read(ZSTD_TYPE, annotations, blob, scratch)
