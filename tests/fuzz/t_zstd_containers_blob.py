"""zstd:chunked, containers/storage's dialect (skopeo, podman), a whole blob.

Input: one flags byte, then the blob. The manifest-checksum annotation is
re-sealed: the sha256 of the compressed TOC frame the blob's footer points
at. Flags: bit 0 also a manifest-position annotation (from the footer;
otherwise the driver reads the footer itself), bit 1 the io.github. prefix,
bit 2 a piece cache directory.
"""

from __future__ import annotations

from .common import sha256
from .lazy_common import (
    NO_DIGEST,
    PREFIXES,
    ZSTD_TYPE,
    Scratch,
    open_and_read,
    position,
    zstd_footer,
)

NAME = "zstd-containers-blob"
MAX_LEN = 256 << 10
DICT = [b"\x28\xb5\x2f\xfd", b"\x50\x2a\x4d\x18", b"GnUlInUx", b"GNUlInUx"]

_scratch: Scratch | None = None


def target(data: bytes) -> None:
    global _scratch
    if not data:
        return
    flags, blob = data[0], data[1:]
    prefix = (flags >> 1) % 2
    annotations: dict[str, str] = {}
    checksum = NO_DIGEST
    located = zstd_footer(blob)
    if located is not None:
        offset, length, ulength = located
        checksum = sha256(blob[offset : offset + length])
        if flags & 1:
            annotations.update(position(offset, length, ulength, prefix))
    annotations[PREFIXES[prefix] + "manifest-checksum"] = checksum
    scratch = None
    if flags & 4:
        _scratch = _scratch or Scratch()
        scratch = _scratch
    open_and_read(ZSTD_TYPE, annotations, blob, scratch)
