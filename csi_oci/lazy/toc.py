"""The table of contents of a lazily readable layer, in one model for all formats.

eStargz and both zstd:chunked dialects describe a layer the same way: file
entries (metadata, whole-file digest) and, per file, the *pieces* its payload
is stored in: a compressed range of the blob that decompresses to a known
span of the file, with a digest to check before anything is served. This
module holds that model and the name rules; the format modules fill it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from csi_oci.digest import Digest
from csi_oci.errors import InvalidLayer

# Files the formats add to the layer root for their own use: never shown.
HIDDEN_ROOT_NAMES = frozenset({"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"})
PREFETCH_LANDMARK = ".prefetch.landmark"
ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo"})


@dataclass(frozen=True)
class Piece:
    """One verifiable span of a file: compressed [offset, end) -> file[chunk_offset:+size]."""

    offset: int  # start of the gzip member / zstd frame(s) in the blob
    end: int  # where the compressed range ends (next piece's offset, or the TOC)
    inner_offset: int  # uncompressed bytes to skip inside the member (eStargz innerOffset)
    chunk_offset: int  # where this span starts in the file
    size: int  # uncompressed length of the span
    digest: Digest | None  # of the span (chunkDigest, or the file digest if one piece)
    zeros: bool = False  # containers/storage "zeros" chunk: synthesized, never fetched


@dataclass
class Entry:
    name: str  # normalised: relative, no leading "./" or trailing "/"
    type: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime: float = 0.0
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: Digest | None = None
    pieces: list[Piece] = field(default_factory=list)

    def pieces_for(self, offset: int, length: int) -> list[Piece]:
        """The pieces covering file bytes [offset, offset+length)."""
        if length <= 0 or offset >= self.size:
            return []
        starts = [p.chunk_offset for p in self.pieces]
        first = max(0, bisect.bisect_right(starts, offset) - 1)
        out = []
        for piece in self.pieces[first:]:
            if piece.chunk_offset >= offset + length:
                break
            out.append(piece)
        return out


@dataclass
class TOC:
    """A verified table of contents."""

    format: str  # "estargz", "zstd:chunked/stargz" or "zstd:chunked/containers"
    compression: str  # "gzip" or "zstd"
    entries: dict[str, Entry]
    toc_offset: int  # where the TOC (and so the payload area) ends in the blob
    prefetch_end: int | None = None  # blob offset where prioritized files end

    def files(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.name not in HIDDEN_ROOT_NAMES]


def normalize_name(raw: str, where: str) -> str:
    """A TOC name made relative and clean, held to the rules for tar member names."""
    from csi_oci.applier import split_member_name

    return "/".join(split_member_name(raw, where))


def finish_pieces(entries: list[Entry], toc_offset: int) -> None:
    """Close each piece's compressed range at the next distinct offset after it.

    The formats give only where a member or frame *starts*; it ends where
    the next one starts (in blob order), the last one where the TOC starts.
    """
    starts = sorted({p.offset for e in entries for p in e.pieces if not p.zeros} | {toc_offset})
    for entry in entries:
        fixed = []
        for piece in entry.pieces:
            if piece.zeros or piece.end > piece.offset:
                fixed.append(piece)
                continue
            index = bisect.bisect_right(starts, piece.offset)
            end = starts[index] if index < len(starts) else toc_offset
            if end <= piece.offset:
                raise InvalidLayer(
                    f"TOC entry {entry.name!r}: piece at {piece.offset} has no extent"
                )
            fixed.append(
                Piece(
                    piece.offset,
                    end,
                    piece.inner_offset,
                    piece.chunk_offset,
                    piece.size,
                    piece.digest,
                    piece.zeros,
                )
            )
        entry.pieces = fixed


def check_coverage(entry: Entry) -> None:
    """Pieces must tile the file exactly: no gap, no overlap, no overrun."""
    position = 0
    for piece in entry.pieces:
        if piece.chunk_offset != position or piece.size < 0:
            raise InvalidLayer(
                f"TOC entry {entry.name!r}: pieces do not tile the file at {position}"
            )
        position += piece.size
    if entry.size and position != entry.size:
        raise InvalidLayer(
            f"TOC entry {entry.name!r}: pieces cover {position} bytes of {entry.size}"
        )
