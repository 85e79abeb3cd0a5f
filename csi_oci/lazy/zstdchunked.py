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
from typing import Any

import zstandard

from csi_oci.errors import IntegrityError, InvalidLayer
from csi_oci.lazy.estargz import (
    TOC_DIGEST_ANNOTATION,
    BlobBytes,
    Fetch,
    _int,
    _toc_from_tar,
    check_toc_digest,
    entry_from_toc,
    parse_toc_json,
    toc_digest_field,
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
    iter_toc_entries,
    normalize_name,
)
from csi_oci.spec.digest import parse_digest
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


def parse_containers_toc(toc_json: bytes, toc_offset: int, budget: TocBudget | None = None) -> TOC:
    """containers/storage's TOC schema (`minimal.TOC`)."""
    entries: dict[str, Entry] = {}
    ends: dict[str, int] = {}
    last_raw_name, last_name = "", ""
    for raw in iter_toc_entries(toc_json, "zstd:chunked TOC", budget):
        kind = raw.get("type")
        raw_name = str(raw.get("name", ""))
        if raw_name != last_raw_name:  # a file's chunks repeat its name: checked once
            last_raw_name, last_name = raw_name, normalize_name(raw_name, "TOC entry")
        name = last_name
        if kind == "chunk":
            entry = entries.get(name)
            if entry is None or entry.type != "reg":
                raise InvalidLayer(f"TOC chunk for {name!r} has no file before it")
            entry.pieces.append(_containers_piece(raw, name))
            continue
        if not name:
            continue
        entry = entry_from_toc(raw, name, kind)
        if kind == "reg" and entry.size > 0:
            if raw.get("chunkDigest"):
                entry.pieces.append(_containers_piece(raw, name))
            else:
                entry.pieces.append(Piece(_int(raw, "offset"), 0, 0, 0, entry.size, entry.digest))
            ends[name] = _int(raw, "endOffset")
        entries[name] = entry
    for name, entry in entries.items():
        if entry.pieces:
            _close_ranges(entry, ends.get(name, 0), toc_offset)
            check_coverage(entry, toc_offset)
    toc_sha256 = hashlib.sha256(toc_json).hexdigest()
    return TOC("zstd:chunked/containers", "zstd", entries, toc_offset, None, toc_sha256)


def _containers_piece(raw: dict[str, Any], name: str) -> Piece:
    return Piece(
        offset=_int(raw, "offset"),
        end=0,
        inner_offset=0,
        chunk_offset=_int(raw, "chunkOffset"),
        size=_int(raw, "chunkSize"),
        digest=toc_digest_field(raw, "chunkDigest", name),
        zeros=raw.get("chunkType") == "zeros",
    )


def _close_ranges(entry: Entry, end_offset: int, toc_offset: int) -> None:
    """A chunk ends where the next one starts; the last at the file's endOffset."""
    pieces = entry.pieces
    closed = []
    for index, piece in enumerate(pieces):
        end = pieces[index + 1].offset if index + 1 < len(pieces) else (end_offset or toc_offset)
        if piece.digest is None:
            raise InvalidLayer(f"TOC entry {entry.name!r}: a chunk has no digest; cannot verify it")
        if end <= piece.offset and not piece.zeros:
            raise InvalidLayer(f"TOC entry {entry.name!r}: chunk at {piece.offset} has no extent")
        closed.append(
            Piece(piece.offset, end, 0, piece.chunk_offset, piece.size, piece.digest, piece.zeros)
        )
    entry.pieces = closed


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
