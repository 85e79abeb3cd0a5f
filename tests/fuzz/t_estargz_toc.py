"""eStargz, the TOC JSON itself: wrapped into a valid blob, re-sealed, opened and read.

Input: a payload selector byte (0: no payload; k: the payload area of seed
blob k, so the TOC's offsets point at real gzip members), a flags byte
(bit 0 Docker media type, bit 1 a piece cache directory, bit 2 the rest is
the TOC member's tar rather than the JSON, header checksums re-sealed), then
the TOC JSON (or tar). The harness appends the TOC member (tar, gzip) and
the 51-byte footer, and re-seals the annotation from the JSON (with bit 2:
from the tar's first member).
"""

from __future__ import annotations

import gzip

from .common import sha256
from .lazy_common import (
    GZIP_TYPES,
    JSON_DICT,
    NO_DIGEST,
    TAR_DICT,
    TOC_DIGEST,
    Scratch,
    estargz_footer,
    estargz_toc_member,
    open_and_read,
    payloads,
    tar_first_member,
)
from .tarfix import fix_checksums

NAME = "estargz-toc"
MAX_LEN = 128 << 10
DICT = JSON_DICT + TAR_DICT

_payloads: list[bytes] | None = None
_scratch: Scratch | None = None


def target(data: bytes) -> None:
    global _payloads, _scratch
    if len(data) < 2:
        return
    if _payloads is None:
        _payloads = payloads("estargz")
    select, flags, toc_json = data[0], data[1], data[2:]
    payload = _payloads[select % len(_payloads)]
    if flags & 4:  # the tar itself, its header checksums re-sealed
        toc_json = fix_checksums(toc_json)
        member = gzip.compress(toc_json, compresslevel=1, mtime=0)
        inner = tar_first_member(toc_json)
        digest = sha256(inner) if inner is not None else NO_DIGEST
    else:
        member = estargz_toc_member(toc_json)
        digest = sha256(toc_json)
    blob = payload + member + estargz_footer(len(payload))
    scratch = None
    if flags & 2:
        _scratch = _scratch or Scratch()
        scratch = _scratch
    open_and_read(GZIP_TYPES[flags & 1], {TOC_DIGEST: digest}, blob, scratch)
