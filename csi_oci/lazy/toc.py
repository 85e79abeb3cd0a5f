"""The table of contents of a lazily readable layer, in one model for all formats.

eStargz and both zstd:chunked dialects describe a layer the same way: file
entries (metadata, whole-file digest) and, per file, the *pieces* its payload
is stored in: a compressed range of the blob that decompresses to a known
span of the file, with a digest to check before anything is served. This
module holds that model and the name rules; the format modules fill it.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn

from csi_oci.errors import InvalidLayer
from csi_oci.spec.digest import Digest

# Files the formats add to the layer root for their own use: never shown.
HIDDEN_ROOT_NAMES = frozenset({"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"})
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})  # shared: most entries have none
ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo"})

# Bounds on what a TOC may make a FUSE server hold. The image's author writes
# the TOC, and every lazily served image shares the lazy-server container's
# memory, so each is checked while parsing, before anything is built on it.
# Real layers sit below: a 4 GiB model written by skopeo as zstd:chunked (64 KiB
# content-defined chunks) has 65,000 entries and 12 MiB of TOC JSON; eStargz's
# 4 MiB chunks make a 100 GiB model 25,000 entries. Measured worst case under
# these caps (tests/test_security_lazy.py): a FUSE server peaks near 235 MB
# (250,000 directories: TOC text, parsed entries and the FUSE tree).
MAX_TOC_COMPRESSED_BYTES = 32 << 20  # one layer's TOC as stored in the blob
MAX_TOC_JSON_BYTES = 32 << 20  # one layer's TOC, decompressed
MAX_IMAGE_TOC_JSON_BYTES = 128 << 20  # every layer of one image together
MAX_IMAGE_TOC_ENTRIES = 250_000  # entries and chunks of every layer of one image
# One piece is decompressed whole to be verified: its span (plus the bytes
# skipped inside a shared gzip member) and its compressed range are capped.
MAX_PIECE_BYTES = 64 << 20
MAX_PIECE_EXTENT = MAX_PIECE_BYTES + (MAX_PIECE_BYTES >> 6) + (1 << 20)  # stored-block overhead


class TocBudget:
    """What the TOCs of one image may cost, charged layer by layer while parsing."""

    def __init__(
        self,
        max_entries: int = MAX_IMAGE_TOC_ENTRIES,
        max_json_bytes: int = MAX_IMAGE_TOC_JSON_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_json_bytes = max_json_bytes
        self.entries = 0
        self.json_bytes = 0

    def charge_json(self, n: int, what: str) -> None:
        if n > MAX_TOC_JSON_BYTES:
            raise InvalidLayer(
                f"{what} is {n} bytes, more than the {MAX_TOC_JSON_BYTES} a layer's TOC may have"
            )
        self.json_bytes += n
        if self.json_bytes > self.max_json_bytes:
            raise InvalidLayer(
                f"{what}: the image's TOCs add up to more than {self.max_json_bytes} bytes"
            )

    def charge_entry(self, what: str) -> None:
        self.charge_entries(1, what)

    def ensure_room(self, n: int, what: str) -> None:
        """Refuse now if `n` more entries could not fit (nothing is charged)."""
        if self.entries + n > self.max_entries:
            self._refuse(what)

    def charge_entries(self, n: int, what: str) -> None:
        self.entries += n
        if self.entries > self.max_entries:
            self._refuse(what)

    def _refuse(self, what: str) -> NoReturn:
        raise InvalidLayer(
            f"{what}: the image's TOCs hold more than {self.max_entries} entries; "
            "serve it with mode unpack"
        )


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_WHITESPACE_CHARS = " \t\n\r"  # "" (the end) is "in" it too: skip() then finds nothing


def iter_toc_entries(
    toc_json: bytes, what: str, budget: TocBudget | None = None
) -> Iterator[dict[str, Any]]:
    """The `entries` of a version-1 TOC, one object at a time.

    json.loads would build every entry as a dict before the first could be
    counted: a TOC of millions of tiny entries costs gigabytes that way. Here
    the top-level object is walked by hand and each entry decoded alone, so
    the budget refuses a TOC at its first entry too many, and what is held at
    once is the TOC text and the entries kept so far. `version` is checked
    when the object ends (it may come after `entries`), so callers must
    consume every entry before trusting what they built.
    """
    budget = budget or TocBudget()
    budget.charge_json(len(toc_json), what)
    try:
        text = toc_json.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidLayer(f"{what} is not UTF-8: {exc}") from None
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        match = _WHITESPACE.match(text, pos)
        return match.end() if match else pos

    def expect(pos: int, char: str) -> int:
        pos = skip(pos)
        if text[pos : pos + 1] != char:
            raise InvalidLayer(f"{what} is not valid JSON: expected {char!r} at {pos}")
        return pos + 1

    def value(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, skip(pos))
        except json.JSONDecodeError as exc:
            raise InvalidLayer(f"{what} is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidLayer(f"{what} is not valid JSON: nested too deeply") from None

    version: Any = None
    seen_entries = False
    pos = expect(0, "{")
    if text[skip(pos) : skip(pos) + 1] == "}":
        raise InvalidLayer(f"{what} is not a version 1 TOC with entries")
    decode = decoder.raw_decode
    while True:
        key, pos = value(pos)
        if not isinstance(key, str):
            raise InvalidLayer(f"{what} is not valid JSON: an object key is not a string")
        pos = expect(pos, ":")
        if key == "entries":
            if seen_entries:
                raise InvalidLayer(f"{what} has two entries lists")
            seen_entries = True
            pos = expect(pos, "[")
            if text[skip(pos) : skip(pos) + 1] == "]":
                pos = skip(pos) + 1
            else:
                pos = skip(pos)
                while True:
                    # Writers emit compact JSON: the whitespace regex runs
                    # only when the next byte is not already the delimiter
                    # (this loop is most of a 65,000-entry TOC's parse).
                    try:
                        raw, pos = decode(text, pos)
                    except json.JSONDecodeError as exc:
                        raise InvalidLayer(f"{what} is not valid JSON: {exc}") from None
                    except RecursionError:
                        raise InvalidLayer(f"{what} is not valid JSON: nested too deeply") from None
                    if type(raw) is not dict:
                        raise InvalidLayer(f"{what}: an entry is not an object")
                    budget.charge_entry(what)
                    yield raw
                    delimiter = text[pos : pos + 1]
                    if delimiter not in (",", "]"):
                        pos = skip(pos)
                        delimiter = text[pos : pos + 1]
                    if delimiter == ",":
                        pos += 1
                        if text[pos : pos + 1] in _WHITESPACE_CHARS:
                            pos = skip(pos)
                        if text[pos : pos + 1] == "]":
                            raise InvalidLayer(f"{what} is not valid JSON: a trailing comma")
                        continue
                    pos = expect(pos, "]")
                    break
        else:
            item, pos = value(pos)
            if key == "version":
                version = item
        pos = skip(pos)
        if text[pos : pos + 1] == ",":
            pos += 1
            continue
        pos = expect(pos, "}")
        break
    if skip(pos) != len(text):
        raise InvalidLayer(f"{what} is not valid JSON: extra data after the TOC")
    if version != 1 or isinstance(version, bool) or not seen_entries:
        raise InvalidLayer(f"{what} is not a version 1 TOC with entries")


class Piece(NamedTuple):
    """One verifiable span of a file: compressed [offset, end) -> file[chunk_offset:+size].

    A NamedTuple, not a frozen dataclass: a 4 GiB zstd:chunked layer has
    92,000 of them, all built before the first byte is served, and a tuple
    is built in a third of the time (immutable all the same).
    """

    offset: int  # start of the gzip member / zstd frame(s) in the blob
    end: int  # where the compressed range ends (next piece's offset, or the TOC)
    inner_offset: int  # uncompressed bytes to skip inside the member (eStargz innerOffset)
    chunk_offset: int  # where this span starts in the file
    size: int  # uncompressed length of the span
    digest: Digest | None  # of the span (chunkDigest, or the file digest if one piece)
    zeros: bool = False  # containers/storage "zeros" chunk: synthesized, never fetched


@dataclass(slots=True)
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
    xattrs: Mapping[str, bytes] = field(default_factory=lambda: NO_XATTRS)
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
    toc_sha256: str = ""  # hex sha256 of the TOC JSON: names the layer's local file

    def files(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.name not in HIDDEN_ROOT_NAMES]


def normalize_name(raw: str, where: str) -> str:
    """A TOC name made relative and clean, held to the rules for tar member names."""
    from csi_oci.unpack.paths import split_member_name

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


def check_coverage(entry: Entry, toc_offset: int) -> None:
    """Pieces must tile the file exactly (no gap, overlap, overrun or empty piece),
    and each must be a bounded range of the payload area, before the TOC."""
    position = 0
    for piece in entry.pieces:
        check_piece_bounds(entry, piece, toc_offset)
        if piece.chunk_offset != position or piece.size <= 0:
            raise InvalidLayer(
                f"TOC entry {entry.name!r}: pieces do not tile the file at {position}"
            )
        position += piece.size
    if entry.size and position != entry.size:
        raise InvalidLayer(
            f"TOC entry {entry.name!r}: pieces cover {position} bytes of {entry.size}"
        )


def check_piece_bounds(entry: Entry, piece: Piece, toc_offset: int) -> None:
    """What one read of this piece would fetch and decompress stays bounded and in the blob."""
    if piece.inner_offset + piece.size > MAX_PIECE_BYTES:
        raise InvalidLayer(
            f"TOC entry {entry.name!r}: a piece of {piece.inner_offset + piece.size} bytes at "
            f"file offset {piece.chunk_offset}; pieces may hold at most {MAX_PIECE_BYTES} bytes "
            "(serve this image with mode unpack)"
        )
    if piece.zeros:
        return
    if not 0 <= piece.offset < piece.end <= toc_offset:
        raise InvalidLayer(
            f"TOC entry {entry.name!r}: piece at blob offset {piece.offset}..{piece.end} is "
            f"outside the payload area (0..{toc_offset})"
        )
    if piece.end - piece.offset > MAX_PIECE_EXTENT:
        raise InvalidLayer(
            f"TOC entry {entry.name!r}: piece at blob offset {piece.offset} spans "
            f"{piece.end - piece.offset} compressed bytes, more than {MAX_PIECE_EXTENT}"
        )
