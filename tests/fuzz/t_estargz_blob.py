"""eStargz, a whole blob: footer, TOC member, TOC JSON, then reads of what opens.

Input: one flags byte, then the blob. Flags: bit 0 the Docker gzip media
type instead of OCI's, bit 1 a piece cache directory (checked after each
input for files outside it or not named by a digest). The TOC digest
annotation is computed from the blob's own TOC (re-sealed).
"""

from __future__ import annotations

from .common import sha256
from .lazy_common import (
    GZIP_TYPES,
    NO_DIGEST,
    TOC_DIGEST,
    Scratch,
    estargz_toc_json,
    open_and_read,
)

NAME = "estargz-blob"
MAX_LEN = 256 << 10
DICT = [b"\x1f\x8b\x08\x04", b"\x1f\x8b\x08\x00", b"STARGZ", b"SG", b"stargz.index.json", b"ustar"]

_scratch: Scratch | None = None


def target(data: bytes) -> None:
    global _scratch
    if not data:
        return
    flags, blob = data[0], data[1:]
    toc_json = estargz_toc_json(blob)
    annotations = {TOC_DIGEST: sha256(toc_json) if toc_json is not None else NO_DIGEST}
    scratch = None
    if flags & 2:
        _scratch = _scratch or Scratch()
        scratch = _scratch
    open_and_read(GZIP_TYPES[flags & 1], annotations, blob, scratch)
