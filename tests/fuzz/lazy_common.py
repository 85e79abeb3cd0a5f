"""Shared by the eStargz and zstd:chunked targets: blobs, re-sealing, reading what opens.

The driver trusts a lazy layer's TOC only when it hashes to an annotation of
the (verified) manifest. The image's author writes both, so an attacker
re-seals: these helpers compute the annotation from the fuzzed bytes the way
an attacker would, with code of their own (never the driver's parser, whose
mistakes are what the fuzzer looks for), so the input reaches the TOC parser
instead of stopping at the digest check.
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import zstandard

from csi_oci.errors import RegistryError
from csi_oci.lazy.fs import LazyTree
from csi_oci.lazy.prefetch import plan
from csi_oci.lazy.reader import LazyReader, open_toc
from csi_oci.lazy.toc import TocBudget

from .common import SEEDS_ROOT, ContainmentError, attempt, scratch_root

TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
PREFIXES = ("io.containers.zstd-chunked.", "io.github.containers.zstd-chunked.")
GZIP_TYPES = (
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
)
ZSTD_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_FOOTER_MAGIC = b"GnUlInUx"
TOC_LIMIT = (64 << 20) + 4096  # what the driver decompresses at most, to re-seal alike
NO_DIGEST = "sha256:" + "0" * 64

# What a FUSE reader asks for: windows of at most 128 KiB, never a whole file.
READ_WINDOW = 128 << 10
MAX_ENTRIES_READ = 24
CACHE_NAME = re.compile(r"layer-v1-[0-9a-f]{64}\.data")  # csi_oci.lazy.reader.layer_file_name

JSON_DICT = [
    b'"version"',
    b'"entries"',
    b'"name"',
    b'"type"',
    b'"size"',
    b'"mode"',
    b'"uid"',
    b'"gid"',
    b'"modtime"',
    b'"linkName"',
    b'"devMajor"',
    b'"devMinor"',
    b'"xattrs"',
    b'"digest"',
    b'"offset"',
    b'"endOffset"',
    b'"chunkOffset"',
    b'"chunkSize"',
    b'"chunkDigest"',
    b'"chunkType"',
    b'"innerOffset"',
    b'"zeros"',
    b'"reg"',
    b'"dir"',
    b'"chunk"',
    b'"symlink"',
    b'"hardlink"',
    b'"char"',
    b'"block"',
    b'"fifo"',
    b'".prefetch.landmark"',
    b'".no.prefetch.landmark"',
    b'"stargz.index.json"',
    b'"sha256:',
    b'"sha512:',
    b'".wh..wh..opq"',
    b'".wh.',
    b"../",
    b"./",
    b"18446744073709551615",
    b"-1",
    b"1e308",
    b"\\ud800",
    b"\\udc80",
    b"\\u0000",
    b"9999-12-31T23:59:59-23:59",
    b"0001-01-01T00:00:00",
]

# For the TOC member's own tar (the targets that fuzz it, not only the JSON in it).
TAR_DICT = [
    b"ustar\x0000",
    b"ustar  \x00",
    b"././@LongLink",
    b"path=",
    b"size=",
    b"GNU.sparse.map=",
    b"GNU.sparse.size=",
    b"GNU.sparse.realsize=",
    b"GNU.sparse.major=1",
    b"GNU.sparse.minor=0",
]


def fetcher(blob: bytes):
    """Ranges of ``blob`` as RegistryClient.fetch_range serves them (RegistryError outside)."""

    def fetch(offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(blob):
            raise RegistryError(f"range {offset}+{length} is outside the blob")
        return blob[offset : offset + length]

    return fetch


# -- re-sealing (the attacker's side) --------------------------------------------------


def tar_first_member(raw: bytes) -> bytes | None:
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            member = tf.next()
            # As bounded as the driver's own _toc_from_tar: a link would make
            # tarfile read the whole archive for its target, and a sparse
            # member's holes are materialised as zeros (the harness's own
            # hang and OOM, found by the 600 s runs).
            if member is None or not member.isfile() or member.issparse():
                return None
            if member.size > TOC_LIMIT:
                return None
            src = tf.extractfile(member)
            return src.read() if src is not None else None
    except Exception:
        return None


def estargz_toc_json(blob: bytes) -> bytes | None:
    """The TOC JSON of an eStargz blob, as an attacker finds it (51- or 47-byte footer)."""
    try:
        tail = blob[-51:]
        if len(tail) == 51 and tail[12:14] == b"SG" and tail[32:38] == b"STARGZ":
            offset, footer = int(tail[16:32].decode("ascii"), 16), 51
        else:
            tail = blob[-47:]
            offset, footer = int(tail[12:28].decode("ascii"), 16), 47
        member = blob[offset : len(blob) - footer]
        raw = zlib.decompressobj(wbits=31).decompress(member, TOC_LIMIT)
    except Exception:
        return None
    return tar_first_member(raw)


def zstd_footer(blob: bytes) -> tuple[int, int, int] | None:
    """(offset, length, uncompressed length) of the TOC frame from the zstd:chunked footer."""
    layouts = (
        (72, 64, b"GNUlInUx", 8),
        (64, 56, ZSTD_FOOTER_MAGIC, 24),
        (48, 40, ZSTD_FOOTER_MAGIC, 8),
    )
    for frame, payload, magic, magic_end in layouts:
        if len(blob) < frame or blob[-frame : -frame + 4] != SKIPPABLE_MAGIC:
            continue
        if blob[len(blob) - magic_end : len(blob) - magic_end + 8] != magic:
            continue
        p = blob[-payload:]
        return tuple(int.from_bytes(p[i : i + 8], "little") for i in (0, 8, 16))  # type: ignore[return-value]
    return None


def unzstd(data: bytes, limit: int = TOC_LIMIT) -> bytes | None:
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
        return dctx.stream_reader(io.BytesIO(data), read_across_frames=True).read(limit)
    except Exception:
        return None


def stargz_zstd_toc_json(compressed: bytes) -> bytes | None:
    raw = unzstd(compressed)
    if raw is None:
        return None
    return tar_first_member(raw) if raw[257:262] == b"ustar" else raw


def position(offset: int, length: int, ulength: int, prefix: int = 0) -> dict[str, str]:
    return {PREFIXES[prefix % 2] + "manifest-position": f"{offset}:{length}:{ulength}:1"}


# -- building blobs around a fuzzed TOC --------------------------------------------------


def estargz_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member whose extra field names the TOC."""
    extra = b"SG" + (22).to_bytes(2, "little") + b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + len(extra).to_bytes(2, "little")
    return header + extra + b"\x01\x00\x00\xff\xff" + b"\x00" * 8


def estargz_toc_member(toc_json: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc_json)
        tf.addfile(info, io.BytesIO(toc_json))
    return gzip.compress(buf.getvalue(), compresslevel=1, mtime=0)


def zstd_toc_blob(payload: bytes, toc_frame: bytes, ulength: int) -> tuple[bytes, int]:
    """payload + skippable frame holding ``toc_frame`` + the 40-byte footer; (blob, offset)."""
    offset = len(payload) + 8
    frame = SKIPPABLE_MAGIC + len(toc_frame).to_bytes(4, "little") + toc_frame
    footer_payload = b"".join(n.to_bytes(8, "little") for n in (offset, len(toc_frame), ulength, 1))
    footer = SKIPPABLE_MAGIC + (40).to_bytes(4, "little") + footer_payload + ZSTD_FOOTER_MAGIC
    return payload + frame + footer, offset


def payloads(group: str) -> list[bytes]:
    """The payload areas (blob bytes before the TOC) of the seed blobs of ``group``.

    Selector byte 0 of a TOC target's input means "no payload" (a blob that
    is only TOC and footer), so reproducers need none of these files.
    """
    folder = SEEDS_ROOT / "payloads" / group
    files = sorted(folder.glob("*.bin")) if folder.is_dir() else []
    return [b""] + [f.read_bytes() for f in files]


# -- using what opens ------------------------------------------------------------------------


class Scratch:
    """A per-process directory for the piece cache, checked and emptied after each input."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="csi-oci-fuzz-lazy-", dir=scratch_root()))
        self.cache = self.base / "cache"

    def check_and_clear(self) -> None:
        try:
            outside = sorted(p.name for p in self.base.iterdir() if p.name != "cache")
            if outside:
                raise ContainmentError(f"piece cache wrote beside its directory: {outside}")
            if self.cache.is_dir():
                for child in self.cache.iterdir():
                    if not CACHE_NAME.fullmatch(child.name) or child.is_symlink():
                        raise ContainmentError(f"piece cache holds {child.name!r}")
        finally:
            shutil.rmtree(self.cache, ignore_errors=True)
            for child in self.base.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink()


def open_and_read(
    media_type: str,
    annotations: dict[str, str],
    blob: bytes,
    scratch: Scratch | None = None,
) -> None:
    """open_toc, then what the lazy server does with a TOC: tree, prefetch plan, reads."""
    fetch = fetcher(blob)
    toc = open_toc(media_type, annotations, len(blob), fetch, TocBudget())
    cache_dir = scratch.cache if scratch is not None else None
    reader = LazyReader(toc, fetch, cache_dir=cache_dir)
    try:
        toc.files()
        LazyTree([reader])
        plan(reader, "all")
        read = 0
        for entry in list(toc.entries.values()):
            if read >= MAX_ENTRIES_READ:
                break
            if entry.type != "reg" or entry.size <= 0:
                continue
            read += 1
            for offset in (0, entry.size // 2, entry.size - 1):
                attempt(reader.read, entry.name, offset, READ_WINDOW)
            attempt(reader.read, entry.name, 0, READ_WINDOW)  # again: from the caches
    finally:
        reader.close()
        if scratch is not None:
            scratch.check_and_clear()
