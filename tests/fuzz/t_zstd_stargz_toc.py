"""zstd:chunked, stargz-snapshotter's dialect, the TOC JSON itself.

Input: a payload selector byte (0: none; k: the payload area of seed blob
k), a flags byte, then the TOC JSON. The harness compresses it into a zstd
frame inside a skippable frame (bit 0: as a tar holding stargz.index.json,
as older writers did), adds the 40-byte footer and the annotations:
TOC digest (re-sealed), manifest-position unless bit 1 (then the driver
reads the footer), bit 2 a piece cache directory. Bit 3: the rest is a tar
to compress as it is (header checksums re-sealed) (the annotation re-sealed from its first member).
"""

from __future__ import annotations

import zstandard

from .common import sha256
from .lazy_common import (
    JSON_DICT,
    NO_DIGEST,
    TAR_DICT,
    TOC_DIGEST,
    ZSTD_TYPE,
    Scratch,
    estargz_toc_member,
    open_and_read,
    payloads,
    position,
    tar_first_member,
    zstd_toc_blob,
)
from .tarfix import fix_checksums

NAME = "zstd-stargz-toc"
MAX_LEN = 128 << 10
DICT = JSON_DICT + TAR_DICT

_payloads: list[bytes] | None = None
_scratch: Scratch | None = None
_cctx = zstandard.ZstdCompressor(level=1)


def _tar(toc_json: bytes) -> bytes:
    import gzip

    return gzip.decompress(estargz_toc_member(toc_json))


def target(data: bytes) -> None:
    global _payloads, _scratch
    if len(data) < 2:
        return
    if _payloads is None:
        _payloads = payloads("zstd-stargz")
    select, flags, toc_json = data[0], data[1], data[2:]
    payload = _payloads[select % len(_payloads)]
    if flags & 8:  # the tar itself, its header checksums re-sealed
        inner = toc_json = fix_checksums(toc_json)
        member = tar_first_member(toc_json)
        digest = sha256(member) if member is not None else NO_DIGEST
    else:
        inner = _tar(toc_json) if flags & 1 else toc_json
        digest = sha256(toc_json)
    frame = _cctx.compress(inner)
    blob, offset = zstd_toc_blob(payload, frame, len(inner))
    annotations = {TOC_DIGEST: digest}
    if not flags & 2:
        annotations.update(position(offset, len(frame), len(inner)))
    scratch = None
    if flags & 4:
        _scratch = _scratch or Scratch()
        scratch = _scratch
    open_and_read(ZSTD_TYPE, annotations, blob, scratch)
