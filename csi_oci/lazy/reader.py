"""Verified reads of a lazy layer: find and trust its TOC, turn pieces into file bytes.

    toc = open_toc(media_type, annotations, blob_size, fetch)   # verified TOC
    data = LazyReader(toc, fetch).read("models/config.json", 0, 4096)

Nothing unverified leaves this module: the TOC is checked against the
layer's digest annotation, and each piece against its digest before it is
returned. Verified pieces are kept in a bounded memory cache and, with a
cache directory, on disk by digest (opened relative to the directory's fd,
never following links).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import threading
from collections import OrderedDict
from pathlib import Path

from csi_oci.errors import CsiOciError, InvalidLayer, NotFound
from csi_oci.lazy import estargz, zstdchunked
from csi_oci.lazy.toc import TOC, Entry, Piece, TocBudget

GZIP_TYPES = (
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
)
ZSTD_TYPES = ("application/vnd.oci.image.layer.v1.tar+zstd",)

log = logging.getLogger(__name__)

MEMORY_CACHE_BYTES = 32 << 20  # verified pieces kept in memory per layer
MERGE_FETCH_BYTES = 16 << 20  # one range request for adjacent missing pieces, at most


class NotLazy(InvalidLayer):
    """The layer cannot be served lazily (no format, or no trust anchor)."""


def lazy_format(media_type: str, annotations: dict[str, str]) -> str | None:
    """Which lazy format a layer descriptor announces, if any (annotations first)."""
    if media_type in GZIP_TYPES and estargz.TOC_DIGEST_ANNOTATION in annotations:
        return "estargz"
    if media_type in ZSTD_TYPES:
        if estargz.TOC_DIGEST_ANNOTATION in annotations:
            return "zstd:chunked/stargz"
        if zstdchunked.annotation(annotations, "manifest-checksum") is not None:
            return "zstd:chunked/containers"
    return None


def open_toc(
    media_type: str,
    annotations: dict[str, str],
    blob_size: int,
    fetch: estargz.Fetch,
    budget: TocBudget | None = None,
) -> TOC:
    """The verified TOC of a layer; `budget` is shared by the layers of one image."""
    fmt = lazy_format(media_type, annotations)
    if fmt is None:
        raise NotLazy(
            f"layer of type {media_type!r} has no eStargz or zstd:chunked TOC digest annotation; "
            "without one nothing can be verified before the whole blob is downloaded"
        )
    if fmt == "estargz":
        return estargz.read_toc(
            fetch, blob_size, annotations[estargz.TOC_DIGEST_ANNOTATION], budget
        )
    return zstdchunked.read_toc(annotations, fetch, blob_size, budget)


def _open_cache_dir(path: Path) -> int:
    """The piece cache directory (0700, made if missing) as an fd for *at() calls."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    os.fchmod(fd, 0o700)
    return fd


class LazyReader:
    """Verified reads of file bytes.

    Pieces are kept in a small in-memory cache and, with `cache_dir`, on
    disk, named by their digest: shared by every layer and image that holds
    the same bytes, and checked again when loaded, so a file torn by a crash
    is never served (it is fetched again).
    """

    def __init__(
        self,
        toc: TOC,
        fetch: estargz.Fetch,
        cache_bytes: int = MEMORY_CACHE_BYTES,
        cache_dir: Path | None = None,
    ) -> None:
        self.toc = toc
        self._fetch = fetch
        self._cache: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._cache_bytes = 0
        self._limit = cache_bytes
        self._lock = threading.Lock()
        self._dir_fd = _open_cache_dir(cache_dir) if cache_dir is not None else None
        self.demand = 0  # on-demand reads in progress (prefetch yields to them)
        # Totals for the metrics (csi_oci.telemetry.endpoint lazy stats); plain ints:
        # a lost increment under a race costs a count, never correctness.
        self.fetched_bytes = 0  # compressed bytes fetched for on-demand reads
        self.read_bytes = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.fetch_errors = 0
        self.prefetch_fetched_bytes = 0
        self.prefetch_done_bytes = 0
        self.prefetch_total_bytes = 0

    def entry(self, name: str) -> Entry:
        entry = self.toc.entries.get(name)
        if entry is None:
            raise NotFound(f"{name!r} is not in the layer")
        return entry

    def piece(self, entry: Entry, piece: Piece) -> bytes:
        # innerOffset: several files may share one member, so the position inside
        # it is part of what identifies a piece.
        key = (piece.offset, piece.inner_offset, piece.size)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return cached
        data = self._from_disk(piece)
        if data is not None:
            self.cache_hits += 1
        else:
            self.cache_misses += 1
            compressed = b"" if piece.zeros else self._fetch(piece.offset, piece.end - piece.offset)
            self.fetched_bytes += len(compressed)
            data = self.decode(entry, piece, compressed)
            self._to_disk(piece, data)
        self._remember(key, data)
        return data

    def _remember(self, key: tuple[int, int, int], data: bytes) -> None:
        """Keep a verified piece in memory; the cache is bounded in bytes, not pieces
        (a piece may be up to MAX_PIECE_BYTES)."""
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._cache_bytes -= len(old)
            if len(data) > self._limit:
                return
            self._cache[key] = data
            self._cache_bytes += len(data)
            while self._cache_bytes > self._limit:
                _, dropped = self._cache.popitem(last=False)
                self._cache_bytes -= len(dropped)

    def _fetch_adjacent_together(self, entry: Entry, pieces: list[Piece]) -> None:
        """One range request for each run of missing pieces that touch in the blob.

        A read spanning many small chunks (zstd:chunked's rolling chunks are
        often tens of KiB) would otherwise cost a round trip per chunk.
        """
        with self._lock:
            missing = [
                p
                for p in pieces
                if not p.zeros
                and (p.offset, p.inner_offset, p.size) not in self._cache
                and not self.cached(p)
            ]
        runs: list[list[Piece]] = []
        for piece in missing:
            if (
                runs
                and runs[-1][0].offset <= piece.offset <= runs[-1][-1].end
                and max(piece.end, runs[-1][-1].end) - runs[-1][0].offset <= MERGE_FETCH_BYTES
            ):
                runs[-1].append(piece)
            else:
                runs.append([piece])
        for run in runs:
            if len(run) < 2:
                continue  # piece() fetches it alone
            start, end = run[0].offset, max(p.end for p in run)
            compressed = self._fetch(start, end - start)
            self.fetched_bytes += len(compressed)
            for piece in run:
                self.cache_misses += 1
                span = compressed[piece.offset - start : piece.end - start]
                data = self.decode(entry, piece, span)
                self._to_disk(piece, data)
                self._remember((piece.offset, piece.inner_offset, piece.size), data)

    def decode(self, entry: Entry, piece: Piece, compressed: bytes) -> bytes:
        """Decompress and verify one piece (IntegrityError if it does not match)."""
        if self.toc.compression == "gzip":
            return estargz.read_piece_gzip(compressed, piece, entry.name)
        return zstdchunked.read_piece_zstd(compressed, piece, entry.name)

    def cached(self, piece: Piece) -> bool:
        if self._dir_fd is None or piece.digest is None:
            return False
        try:
            st = os.stat(piece.digest.file_name, dir_fd=self._dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode)

    def _from_disk(self, piece: Piece) -> bytes | None:
        """A cached piece, re-verified; None if absent, not a plain file, or damaged.

        The name comes only from a validated digest (`Digest.file_name`: one
        flat component) and is opened relative to the cache directory's fd
        with O_NOFOLLOW, so no TOC value can reach a file elsewhere.
        """
        if self._dir_fd is None or piece.digest is None:
            return None
        name = piece.digest.file_name
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except OSError:
            return None  # absent, or a symlink someone planted (ELOOP): fetch it
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != piece.size:
                data = None
            else:
                data = os.pread(fd, piece.size, 0)
        except OSError:
            data = None
        finally:
            os.close(fd)
        if data is not None:
            try:
                estargz.verify_piece(data, piece, "cached piece")
            except CsiOciError:
                data = None
        if data is None:  # torn, damaged or not ours: drop it, fetch again
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._dir_fd)
        return data

    def _to_disk(self, piece: Piece, data: bytes) -> None:
        if self._dir_fd is None or piece.digest is None or self.cached(piece):
            return
        name = piece.digest.file_name
        tmp = f".piece-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=self._dir_fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError as exc:  # a full disk costs speed, not correctness
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._dir_fd)
            log.warning("not caching a piece of %s: %s", self.toc.format, exc)

    def close(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def fetch_range(self, offset: int, length: int) -> bytes:
        """Raw blob bytes (prefetch merges several pieces into one request)."""
        return self._fetch(offset, length)

    def store_piece(self, entry: Entry, piece: Piece, data: bytes) -> None:
        """Keep a piece that prefetch fetched and verified."""
        self._to_disk(piece, data)

    def read(self, name: str, offset: int, length: int) -> bytes:
        entry = self.entry(name)
        with self._lock:
            self.demand += 1
        try:
            data = self._read(entry, offset, length)
        except (CsiOciError, OSError):
            self.fetch_errors += 1
            raise
        else:
            self.read_bytes += len(data)
            return data
        finally:
            with self._lock:
                self.demand -= 1

    def _read(self, entry: Entry, offset: int, length: int) -> bytes:
        pieces = entry.pieces_for(offset, length)
        if len(pieces) > 1:
            self._fetch_adjacent_together(entry, pieces)
        out = bytearray()
        for piece in pieces:
            data = self.piece(entry, piece)
            start = max(offset, piece.chunk_offset) - piece.chunk_offset
            stop = min(offset + length, piece.chunk_offset + piece.size) - piece.chunk_offset
            out += data[start:stop]
        return bytes(out)

    def read_all(self, name: str) -> bytes:
        entry = self.entry(name)
        return self.read(name, 0, entry.size)


__all__ = [
    "TOC",
    "Entry",
    "LazyReader",
    "NotLazy",
    "Piece",
    "TocBudget",
    "lazy_format",
    "open_toc",
]
