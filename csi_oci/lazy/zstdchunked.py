"""zstd:chunked, in both dialects.

A) stargz-snapshotter's: the eStargz TOC schema, each piece in its own zstd
   frame, the TOC JSON zstd-compressed in a skippable frame, a 40-byte
   footer. Trust: `containerd.io/snapshot/stargz/toc.digest` = sha256 of the
   uncompressed TOC JSON.
B) containers/storage's (podman, buildah, skopeo): its own TOC schema with
   content-defined chunks and `zeros` chunks, optional tar-split. Trust:
   `io.github.containers.zstd-chunked.manifest-checksum` (Debian 12's tools
   write the older `io.containers.` prefix) = sha256 of the *compressed* TOC
   frame payload, found at `manifest-position` (offset:length:ulength:type).

Annotations come first; the binary footer (40, 56 or 64 bytes in the last
skippable frame) is only a fallback for locating the TOC, never for trust.
"""

from __future__ import annotations

import hashlib
import io
import threading
from typing import Annotated, Any

import msgspec
import zstandard

from csi_oci.errors import IntegrityError, InvalidLayer
from csi_oci.lazy.estargz import (
    TOC_DIGEST_ANNOTATION,
    BlobBytes,
    Fetch,
    _toc_from_tar,
    check_toc_digest,
    entry_from_toc,
    parse_toc_json,
    toc_digest,
    verify_piece,
)
from csi_oci.lazy.toc import (
    MAX_TOC_COMPRESSED_BYTES,
    MAX_TOC_JSON_BYTES,
    TOC,
    Entry,
    Piece,
    TocBudget,
    check_coverage,
    normalize_name,
)
from csi_oci.spec.digest import Digest, parse_digest
from csi_oci.stream.inflate import MAX_ZSTD_WINDOW

PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
OLD_MAGIC = b"GnUlInUx"  # footers of c/storage <= 1.49 and of stargz-snapshotter
NEW_MAGIC = b"GNUlInUx"  # 64-byte footers of c/storage >= 1.50


def annotation(annotations: dict[str, str], key: str) -> str | None:
    for prefix in PREFIXES:
        if prefix + key in annotations:
            return annotations[prefix + key]
    return None


def parse_position(value: str) -> tuple[int, int, int]:
    """`offset:compressedLength:uncompressedLength[:type]` -> the three numbers."""
    parts = value.split(":")
    try:
        offset, length, ulength = (int(p) for p in parts[:3])
    except ValueError:
        raise InvalidLayer(f"zstd:chunked manifest-position {value!r} is malformed") from None
    if len(parts) < 3 or min(offset, length, ulength) < 0:
        raise InvalidLayer(f"zstd:chunked manifest-position {value!r} is malformed")
    return offset, length, ulength


def parse_footer(tail: bytes) -> tuple[int, int, int]:
    """(TOC offset, compressed length, uncompressed length) from a binary footer."""
    if len(tail) >= 72 and tail[-72:-68] == SKIPPABLE_MAGIC and tail[-8:] == NEW_MAGIC:
        p = tail[-64:]
        return _u64(p, 0), _u64(p, 8), _u64(p, 16)
    if len(tail) >= 64 and tail[-64:-60] == SKIPPABLE_MAGIC and tail[-24:-16] == OLD_MAGIC:
        p = tail[-56:]  # the 1.47-1.49 layout: 40 bytes, then 16 of zeros
        return _u64(p, 0), _u64(p, 8), _u64(p, 16)
    if len(tail) >= 48 and tail[-48:-44] == SKIPPABLE_MAGIC and tail[-8:] == OLD_MAGIC:
        p = tail[-40:]
        return _u64(p, 0), _u64(p, 8), _u64(p, 16)
    raise InvalidLayer("not a zstd:chunked blob: no zstd:chunked footer at its end")


def _u64(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at : at + 8], "little")


def _unzstd(data: BlobBytes, limit: int, what: str) -> bytes:
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    try:
        reader = dctx.stream_reader(io.BytesIO(data), read_across_frames=True)
        out = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise InvalidLayer(f"{what}: corrupt zstd data: {exc}") from None
    if len(out) > limit:
        raise InvalidLayer(f"{what}: decompresses to more than {limit} bytes")
    return out


_LOCAL = threading.local()


def _unzstd_piece(data: BlobBytes, needed: int, what: str) -> bytes:
    """A piece's frame(s), decompressed to at least `needed` bytes.

    The common case is one frame per piece (containers/storage writes each
    chunk as its own frame): one call on this thread's decompressor, with
    the output bounded. Creating a decompressor and a stream per piece cost
    about ten times the decompression of a 64 KiB chunk. Several frames, or
    a frame that claims more than the piece, take the bounded streaming path.
    """
    dctx = getattr(_LOCAL, "dctx", None)
    if dctx is None:
        dctx = _LOCAL.dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    try:
        # A size in the frame header overrides max_output_size: a frame that
        # claims more than the piece takes the bounded streaming path instead.
        declared = zstandard.frame_content_size(data)
        out = b""
        if declared <= needed + 1:
            out = dctx.decompress(data, max_output_size=needed + 1)
    except zstandard.ZstdError:
        out = b""
    if needed <= len(out) <= needed + 1:
        return out
    return _unzstd(data, needed + (1 << 20), what)


def _locate(annotations: dict[str, str], fetch: Fetch, blob_size: int) -> tuple[int, int, int]:
    position = annotation(annotations, "manifest-position")
    if position is not None:
        offset, length, ulength = parse_position(position)
    else:
        tail = bytes(fetch(max(0, blob_size - 72), min(72, blob_size)))
        offset, length, ulength = parse_footer(tail)
    if offset + length > blob_size or length > MAX_TOC_COMPRESSED_BYTES:
        raise InvalidLayer(
            f"zstd:chunked TOC at {offset}+{length} is outside the blob or too large"
        )
    return offset, length, ulength


def read_toc(
    media_annotations: dict[str, str],
    fetch: Fetch,
    blob_size: int,
    budget: TocBudget | None = None,
) -> TOC:
    """Locate, verify and parse either dialect's TOC."""
    offset, length, ulength = _locate(media_annotations, fetch, blob_size)
    compressed = fetch(offset, length)
    # Payloads start after an 8-byte skippable-frame header: pieces end there.
    frame_start = offset - 8 if offset >= 8 else offset
    if TOC_DIGEST_ANNOTATION in media_annotations:
        raw = _unzstd(compressed, MAX_TOC_JSON_BYTES + 4096, "zstd:chunked TOC")
        toc_json = _toc_from_tar(raw) if raw[257:262] == b"ustar" else raw
        check_toc_digest(toc_json, media_annotations[TOC_DIGEST_ANNOTATION])
        return parse_toc_json(toc_json, frame_start, "zstd:chunked/stargz", "zstd", budget)
    checksum = annotation(media_annotations, "manifest-checksum")
    if checksum is None:
        raise InvalidLayer("zstd:chunked layer without a manifest-checksum annotation")
    want = parse_digest(checksum, "zstd:chunked manifest-checksum annotation", InvalidLayer)
    if not want.matches(compressed):
        raise IntegrityError(
            f"zstd:chunked TOC checksum mismatch: the annotation says {checksum}, the TOC at "
            f"{offset} hashes to {want.algorithm}:{want.of(compressed)}"
        )
    toc_json = _unzstd(compressed, min(max(ulength, 1), MAX_TOC_JSON_BYTES), "zstd:chunked TOC")
    return parse_containers_toc(toc_json, frame_start, budget)


# A chunk as read from the TOC, before its compressed range is closed:
# (blob offset, file offset, size, digest, zeros).
_RawChunk = tuple[int, int, int, Digest | None, bool]

_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
MAX_XATTRS_PER_ENTRY = 256


class _ContainersEntry(msgspec.Struct, rename="camel", gc=False):
    """One entry of containers/storage's `minimal.TOC`, typed as it is decoded.

    Why msgspec and not json: this dialect has one entry per content-defined
    chunk (92,000 for a 4 GiB model), and decoding them one by one with the
    json module and then checking each field in Python took 0.55 s of the
    first byte. Here the decoder checks types and bounds in C while it reads
    (a negative or non-integer offset, a bool for a number, a too-large xattr
    map are refused, with the JSON path in the message), and skips fields we
    do not use without building them.
    """

    type: str = ""
    name: str = ""
    link_name: str = ""
    mode: _NonNegative = 0
    uid: _NonNegative = 0
    gid: _NonNegative = 0
    size: _NonNegative = 0
    modtime: str = ""
    dev_major: _NonNegative = 0
    dev_minor: _NonNegative = 0
    xattrs: Annotated[dict[str, str], msgspec.Meta(max_length=MAX_XATTRS_PER_ENTRY)] | None = None
    digest: str = ""
    offset: _NonNegative = 0
    end_offset: _NonNegative = 0
    chunk_size: _NonNegative = 0
    chunk_offset: _NonNegative = 0
    chunk_digest: str = ""
    chunk_type: str = ""


class _ContainersTOC(msgspec.Struct):
    version: int
    entries: list[_ContainersEntry]


_DECODER = msgspec.json.Decoder(_ContainersTOC)


def _decode_containers_toc(toc_json: bytes, budget: TocBudget) -> list[_ContainersEntry]:
    """The entries, decoded under the image's TOC budget."""
    what = "zstd:chunked TOC"
    budget.charge_json(len(toc_json), what)
    # Every entry is an object, so a TOC holds at most as many entries as it
    # has "{" (an xattrs map or a brace in a name adds one; half of them is a
    # safe floor): a TOC of millions of tiny entries is refused before any is
    # built. The exact count is charged after decoding.
    budget.ensure_room(toc_json.count(b"{") // 2, what)
    try:
        toc = _DECODER.decode(toc_json)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidLayer(f"{what} is not a valid containers/storage TOC: {exc}") from None
    except RecursionError:
        raise InvalidLayer(f"{what} is not valid JSON: nested too deeply") from None
    if toc.version != 1:
        raise InvalidLayer(f"{what} is not a version 1 TOC with entries")
    budget.charge_entries(len(toc.entries), what)
    return toc.entries


def _metadata(raw: _ContainersEntry) -> dict[str, Any]:
    """A file or directory entry in the shape entry_from_toc reads (both schemas share it)."""
    return {
        "name": raw.name,
        "linkName": raw.link_name,
        "mode": raw.mode,
        "uid": raw.uid,
        "gid": raw.gid,
        "size": raw.size,
        "modtime": raw.modtime,
        "devMajor": raw.dev_major,
        "devMinor": raw.dev_minor,
        "xattrs": raw.xattrs,
        "digest": raw.digest or None,
    }


def parse_containers_toc(toc_json: bytes, toc_offset: int, budget: TocBudget | None = None) -> TOC:
    """containers/storage's TOC schema (`minimal.TOC`).

    One entry per content-defined chunk, so this loop is the dialect's
    start-up time: each chunk becomes a tuple, and a Piece once the next
    chunk's offset closes its range.
    """
    entries: dict[str, Entry] = {}
    chunks: dict[str, list[_RawChunk]] = {}
    ends: dict[str, int] = {}
    last_raw_name, last_name = "", ""
    for raw in _decode_containers_toc(toc_json, budget or TocBudget()):
        kind = raw.type
        if raw.name != last_raw_name:  # a file's chunks repeat its name: checked once
            last_raw_name, last_name = raw.name, normalize_name(raw.name, "TOC entry")
        name = last_name
        if kind == "chunk":
            file_chunks = chunks.get(name)
            if file_chunks is None:
                raise InvalidLayer(f"TOC chunk for {name!r} has no file before it")
            file_chunks.append(_containers_chunk(raw, name))
            continue
        if not name:
            continue
        entry = entry_from_toc(_metadata(raw), name, kind)
        chunks.pop(name, None)
        if kind == "reg" and entry.size > 0:
            if raw.chunk_digest:
                chunks[name] = [_containers_chunk(raw, name)]
            else:
                chunks[name] = [(raw.offset, 0, entry.size, entry.digest, False)]
            ends[name] = raw.end_offset
        entries[name] = entry
    for name, file_chunks in chunks.items():
        entry = entries[name]
        entry.pieces = _close_ranges(entry, file_chunks, ends.get(name, 0), toc_offset)
        check_coverage(entry, toc_offset)
    toc_sha256 = hashlib.sha256(toc_json).hexdigest()
    return TOC("zstd:chunked/containers", "zstd", entries, toc_offset, None, toc_sha256)


def _containers_chunk(raw: _ContainersEntry, name: str) -> _RawChunk:
    digest = toc_digest(raw.chunk_digest, "chunkDigest", name)
    return (raw.offset, raw.chunk_offset, raw.chunk_size, digest, raw.chunk_type == "zeros")


def _close_ranges(
    entry: Entry, chunks: list[_RawChunk], end_offset: int, toc_offset: int
) -> list[Piece]:
    """A chunk ends where the next one starts; the last at the file's endOffset."""
    pieces = []
    last = len(chunks) - 1
    for index, (offset, chunk_offset, size, digest, zeros) in enumerate(chunks):
        end = chunks[index + 1][0] if index < last else (end_offset or toc_offset)
        if digest is None:
            raise InvalidLayer(f"TOC entry {entry.name!r}: a chunk has no digest; cannot verify it")
        if end <= offset and not zeros:
            raise InvalidLayer(f"TOC entry {entry.name!r}: chunk at {offset} has no extent")
        pieces.append(Piece(offset, end, 0, chunk_offset, size, digest, zeros))
    return pieces


def read_piece_zstd(compressed: BlobBytes, piece: Piece, name: str) -> bytes:
    """Decompress the frame(s) of a piece, cut it out, verify it."""
    if piece.zeros:
        return verify_piece(bytes(piece.size), piece, name)
    raw = _unzstd_piece(compressed, piece.inner_offset + piece.size, name)
    wanted = slice(piece.inner_offset, piece.inner_offset + piece.size)
    data = raw if piece.inner_offset == 0 and len(raw) == piece.size else raw[wanted]
    if len(data) != piece.size:
        raise InvalidLayer(f"{name}: the zstd frames hold fewer bytes than the TOC says")
    return verify_piece(data, piece, name)
