"""The layer applier: a tar (raw, gzip or zstd) applied into a scratch root.

As csi_oci.puller._apply_tar does it, minus the threads: the blob through a
VerifyingReader (its digest re-sealed from the input), the decompressor, the
LayerApplier, then the rest of the stream drained (padding; the verifiers
check at the end). After each input the scratch directory must hold only the
root and an untouched canary: anything else is a containment finding.

Input: one flags byte, then the bytes.
  bits 0-1: 0 a tar; 1 a gzip stream (fuzzed as is); 2 a zstd stream (as is);
            3 a tar the harness gzips (the structure fuzzed through GzipReader)
  bit 2: artifact policy (plain file tree, duplicates refused, claims shared)
  bit 3: with bit 2, the entries must stay under "d" (an ORAS directory title)
  bit 4: a partial pull (include *.txt and keep/*)
  bit 5: the same layer applied twice (the second sees the first as lower:
         whiteouts and opaque directories act)
  bit 6: with mode 2, a tar the harness compresses with zstd
  bit 7: header checksums recomputed first (tests/fuzz/tarfix.py; modes 0, 3
         and 2 with bit 6), so mutated headers reach the parser
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tempfile
import threading
from pathlib import Path

import zstandard

from csi_oci.spec.attributes import include_matcher
from csi_oci.stream.inflate import Compression, decompressor
from csi_oci.stream.verify import VerifyingReader
from csi_oci.unpack.applier import IMAGE_POLICY, LayerApplier, Policy
from csi_oci.unpack.budget import Limits

from .common import ContainmentError, scratch_root, sha256
from .tarfix import fix_checksums

NAME = "tar"
MAX_LEN = 64 << 10
DICT = [
    b"ustar\x0000",
    b"ustar  \x00",
    b".wh.",
    b".wh..wh..opq",
    b"././@LongLink",
    b"path=",
    b"linkpath=",
    b"size=",
    b"GNU.sparse.map=",
    b"GNU.sparse.size=",
    b"GNU.sparse.major=1",
    b"GNU.sparse.minor=0",
    b"SCHILY.xattr.",
    b"../",
    b"/etc/",
    b"\x1f\x8b\x08\x00",
    b"\x28\xb5\x2f\xfd",
]

TRAILING_LIMIT = 1 << 20
LIMITS = Limits(max_bytes=32 << 20, max_entries=20_000)
CANARY = b"precious canary bytes\n"
_zstd = zstandard.ZstdCompressor(level=1)


class _Scratch:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="csi-oci-fuzz-tar-", dir=scratch_root()))
        self.root = self.base / "root"
        self.canary = self.base / "canary"
        self._make()

    def _make(self) -> None:
        self.canary.mkdir()
        (self.canary / "victim.txt").write_bytes(CANARY)
        self.root.mkdir()

    def check_and_clear(self) -> None:
        problems = []
        names = sorted(p.name for p in self.base.iterdir())
        if names != ["canary", "root"]:
            problems.append(f"scratch directory now holds {names}")
        victim = self.canary / "victim.txt"
        canary = sorted(p.name for p in self.canary.iterdir()) if self.canary.is_dir() else None
        if canary != ["victim.txt"] or victim.is_symlink() or victim.read_bytes() != CANARY:
            problems.append(f"canary directory changed: {canary}")
        for child in self.base.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        self._make()
        if problems:
            raise ContainmentError("; ".join(problems))


_scratch: _Scratch | None = None


def _policy(flags: int) -> Policy:
    select = include_matcher(("*.txt", "keep/*")) if flags & 16 else None
    if flags & 4:
        under = ("d",) if flags & 8 else ()
        return Policy(
            image=False, select=select, under=under, claimed={}, claim_lock=threading.Lock()
        )
    return Policy(select=select) if select is not None else IMAGE_POLICY


def _drain(stream: object) -> None:
    total = 0
    while chunk := stream.read(1 << 20):  # type: ignore[attr-defined]
        total += len(chunk)
        if total > TRAILING_LIMIT:
            break


def target(data: bytes) -> None:
    global _scratch
    if not data:
        return
    flags, body = data[0], data[1:]
    mode = flags & 3
    compression = (Compression.NONE, Compression.GZIP, Compression.ZSTD, Compression.GZIP)[mode]
    if flags & 128 and (mode in (0, 3) or flags & 64):
        body = fix_checksums(body)
    if mode == 3:
        body = gzip.compress(body, compresslevel=1, mtime=0)
    elif mode == 2 and flags & 64:
        body = _zstd.compress(body)
    _scratch = _scratch or _Scratch()
    fd = os.open(_scratch.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        applier = LayerApplier(fd, LIMITS, policy=_policy(flags))
        for layer in range(2 if flags & 32 else 1):
            what = f"layer {layer + 1}"
            blob = VerifyingReader(io.BytesIO(body), sha256(body), len(body), what)
            stream = decompressor(blob, compression, what)
            applier.apply(stream, what)
            _drain(stream)
            if stream is not blob:
                _drain(blob)
    finally:
        os.close(fd)
        _scratch.check_and_clear()
