"""zstd:chunked, stargz-snapshotter's dialect, a whole blob.

Input: one flags byte, then the blob. The TOC digest annotation is always
there (it is what selects this dialect) and re-sealed from the blob's own
TOC frame, found through its footer. Flags: bit 0 also a manifest-position
annotation (from the footer; otherwise the driver reads the footer itself),
bit 1 its io.github. prefix, bit 2 a manifest-checksum annotation too, bit 3
a piece cache directory.
"""

from __future__ import annotations

from .common import sha256
from .lazy_common import (
    NO_DIGEST,
    PREFIXES,
    TOC_DIGEST,
    ZSTD_TYPE,
    Scratch,
    open_and_read,
    position,
    stargz_zstd_toc_json,
    zstd_footer,
)

NAME = "zstd-stargz-blob"
MAX_LEN = 256 << 10
DICT = [b"\x28\xb5\x2f\xfd", b"\x50\x2a\x4d\x18", b"GnUlInUx", b"GNUlInUx", b"ustar"]

_scratch: Scratch | None = None


def target(data: bytes) -> None:
    global _scratch
    if not data:
        return
    flags, blob = data[0], data[1:]
    annotations: dict[str, str] = {}
    digest = NO_DIGEST
    located = zstd_footer(blob)
    if located is not None:
        offset, length, ulength = located
        toc_json = stargz_zstd_toc_json(blob[offset : offset + length])
        if toc_json is not None:
            digest = sha256(toc_json)
        if flags & 1:
            annotations.update(position(offset, length, ulength, flags >> 1))
        if flags & 4:
            key = PREFIXES[(flags >> 1) % 2] + "manifest-checksum"
            annotations[key] = sha256(blob[offset : offset + length])
    annotations[TOC_DIGEST] = digest
    scratch = None
    if flags & 8:
        _scratch = _scratch or Scratch()
        scratch = _scratch
    open_and_read(ZSTD_TYPE, annotations, blob, scratch)
