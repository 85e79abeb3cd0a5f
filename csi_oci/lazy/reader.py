"""Verified reads of a lazy layer: find and trust its TOC, turn pieces into file bytes.

    toc = open_toc(media_type, annotations, blob_size, fetch)   # verified TOC
    data = LazyReader(toc, fetch, cache_dir).read("models/config.json", 0, 4096)

Nothing unverified leaves this module: the TOC is checked against the
layer's digest annotation, and each piece against its digest before it
lands. Verified bytes land in one local file per layer (`LayerFile`), laid
out file by file as the layer's files are, so a read is one pread however
many pieces it spans, and the kernel's page cache keeps what was read.

Each piece is in one of four states. MISSING: to be fetched. CLAIMED: a
thread (an on-demand read, or the background fill in csi_oci.lazy.prefetch)
is fetching it; others wait for it rather than fetch it again, so no piece
crosses the network twice. PRESENT: verified and in the layer file.
ON_DISK: the layer file was left by an earlier server (a restart, another
volume of the image) and may hold it; it is checked against its digest
before it counts as present, so a file torn by a crash is never served.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import os
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
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

# An on-demand miss fetches the pieces after it in the same file too, up to
# this many compressed bytes in one range request: a loader reading a shard
# in order then meets pieces already landed instead of paying a round trip
# per kernel request (1 MiB) or per zstd:chunked chunk (tens of KiB). A small
# file costs no more than itself.
ON_DEMAND_RUN_BYTES = 8 << 20
MAX_RUN_BYTES = 16 << 20  # one range request, at most (bounds what it holds in memory)
LAND_BATCH_PIECES = 256  # pieces per pwritev (under IOV_MAX, 1024)
LAND_BATCH_BYTES = 8 << 20
SPILL_BYTES = 32 << 20  # verified pieces kept in memory when the layer file cannot take them
# On-demand runs in flight in this process: each holds its compressed range and
# one decoded piece. The kernel may send a dozen reads at once; this bounds
# what they hold (the background fill has its own bound, csi_oci.lazy.prefetch).
ON_DEMAND_FILLS = 4
_ON_DEMAND = threading.BoundedSemaphore(ON_DEMAND_FILLS)
LAYER_FILE_PREFIX = "layer-"
LAYER_FILE_SUFFIX = ".data"
LAYOUT_VERSION = 1  # part of a layer file's name: a new layout never reads an old file

MISSING, CLAIMED, PRESENT, ON_DISK = 0, 1, 2, 3


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
    """The cache directory (0700, made if missing) as an fd for *at() calls."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    os.fchmod(fd, 0o700)
    return fd


def layer_file_name(toc: TOC) -> str:
    """The layer file's name: from the verified TOC's own digest, nothing else.

    The layout (where each piece lands) is a function of the TOC alone, so
    every server of a layer with this TOC agrees on it; the name holds only
    hex digits from sha256, never a value read from the blob.
    """
    return f"{LAYER_FILE_PREFIX}v{LAYOUT_VERSION}-{toc.toc_sha256}{LAYER_FILE_SUFFIX}"


class LayerFile:
    """One local file holding a layer's verified bytes, file after file.

    Opened relative to the cache directory's fd with O_NOFOLLOW, refused
    unless it is a regular file. Holds a shared flock while open: eviction
    (csi_oci.storage.space) skips a locked file. Without a directory (tests,
    local blobs) it is an anonymous temporary file.
    """

    def __init__(self, cache_dir: Path | None, name: str) -> None:
        self.reused = False
        if cache_dir is None:
            with tempfile.TemporaryFile() as anonymous:
                self.fd = os.dup(anonymous.fileno())
            return
        dir_fd = _open_cache_dir(cache_dir)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise OSError(errno.EINVAL, f"{name} in the lazy cache is not a regular file")
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        self.reused = st.st_size > 0

    def write(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], offset + written)

    def writev(self, buffers: list[bytes], offset: int) -> None:
        """Buffers back to back from `offset` (short writes finished one by one)."""
        written = os.pwritev(self.fd, buffers, offset)
        total = sum(len(b) for b in buffers)
        if written < total:
            rest = b"".join(buffers)[written:]
            self.write(rest, offset + written)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LazyReader:
    """Verified reads of one layer's file bytes.

    Pieces are numbered in TOC order, so each file's pieces are a run of
    indices; `_place[i]` is where piece i lands in the layer file.
    """

    def __init__(
        self,
        toc: TOC,
        fetch: estargz.Fetch,
        cache_dir: Path | None = None,
    ) -> None:
        self.toc = toc
        self._fetch = fetch
        self.pieces: list[Piece] = []
        self.owners: list[Entry] = []
        self._place: list[int] = []
        self._first: dict[str, int] = {}  # entry name -> index of its first piece
        self._starts: dict[str, list[int]] = {}  # entry name -> its pieces' file offsets
        base = 0
        for entry in toc.entries.values():
            if not entry.pieces:
                continue
            self._first[entry.name] = len(self.pieces)
            self._starts[entry.name] = [p.chunk_offset for p in entry.pieces]
            for piece in entry.pieces:
                self.pieces.append(piece)
                self.owners.append(entry)
                self._place.append(base + piece.chunk_offset)
            base += -(-entry.size // 4096) * 4096  # each file on its own pages
        try:
            self.layer_file = LayerFile(cache_dir, layer_file_name(toc))
        except OSError as exc:  # a link or a non-file where ours should be: never used
            log.warning("lazy cache file of a %s layer: %s; using a private one", toc.format, exc)
            self.layer_file = LayerFile(None, "")
        initial = ON_DISK if self.layer_file.reused else MISSING
        self._state = bytearray(initial for _ in self.pieces)
        self._on_disk = bytearray(self._state)  # ON_DISK: still to be checked there
        for index, piece in enumerate(self.pieces):
            if piece.zeros:
                self._state[index] = PRESENT  # synthesized, never stored
        self._cond = threading.Condition()
        self._spill: OrderedDict[int, bytes] = OrderedDict()
        self._spill_bytes = 0
        # Totals for the metrics (csi_oci.telemetry.endpoint lazy stats); plain ints:
        # a lost increment under a race costs a count, never correctness.
        self.fetched_bytes = 0  # compressed bytes fetched for on-demand reads
        self.read_bytes = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.fetch_errors = 0
        # The volume condition kubelet asks for (NodeGetVolumeStats): when
        # reads or the background fill started failing and why; 0.0 / "" while
        # the last attempt succeeded.
        self.failing_since = 0.0
        self.last_error = ""
        self.prefetch_fetched_bytes = 0
        self.prefetch_done_bytes = 0
        self.prefetch_total_bytes = 0

    # -- lookups ------------------------------------------------------------------

    def entry(self, name: str) -> Entry:
        entry = self.toc.entries.get(name)
        if entry is None:
            raise NotFound(f"{name!r} is not in the layer")
        return entry

    def _span(self, entry: Entry, offset: int, length: int) -> tuple[int, int]:
        """Indices [first, last) of the pieces covering file bytes [offset, offset+length)."""
        starts = self._starts.get(entry.name)
        if not starts or length <= 0 or offset >= entry.size:
            return 0, 0
        first = self._first[entry.name]
        lo = max(0, bisect.bisect_right(starts, offset) - 1)
        hi = bisect.bisect_left(starts, offset + length)
        return first + lo, first + max(hi, lo + 1)

    def present(self, index: int) -> bool:
        return self._state[index] == PRESENT

    # -- claiming and filling -----------------------------------------------------

    def claim(self, indices: Iterable[int]) -> list[int]:
        """Mark the pieces nobody has yet as this thread's to fetch; returns them."""
        taken = []
        with self._cond:
            for index in indices:
                if self._state[index] in (MISSING, ON_DISK):
                    self._state[index] = CLAIMED
                    taken.append(index)
        return taken

    def _release(self, indices: list[int], state: int) -> None:
        with self._cond:
            for index in indices:
                if self._state[index] == CLAIMED:
                    self._state[index] = state
            self._cond.notify_all()

    def fill(self, claimed: list[int], *, prefetch: bool = False) -> int:
        """Fetch, verify and land claimed pieces; returns compressed bytes fetched.

        Pieces a previous server left on disk are checked there first. The
        rest are fetched in runs of blob-adjacent pieces, one range request
        each. On any error every piece not yet landed goes back to MISSING
        (and waiters wake) before the error propagates.
        """
        done: list[int] = []
        fetched = 0
        try:
            to_fetch = []
            for index in claimed:
                if self._check_on_disk(index):
                    done.append(index)
                else:
                    to_fetch.append(index)
            for run in self.runs(to_fetch):
                fetched += self._fill_run(run, prefetch)
                done.extend(run)
        except BaseException:
            landed = set(done)
            self._release([i for i in claimed if i not in landed], MISSING)
            raise
        return fetched

    def _check_on_disk(self, index: int) -> bool:
        if not self._on_disk[index]:
            return False
        self._on_disk[index] = 0  # checked once: if it fails, it is fetched
        piece = self.pieces[index]
        try:
            data = self.layer_file.read(self._place[index], piece.size)
            if len(data) == piece.size:
                estargz.verify_piece(data, piece, "cached piece")
                self._landed(index)
                return True
        except (OSError, CsiOciError):
            pass
        return False

    def runs(self, indices: list[int], max_bytes: int = MAX_RUN_BYTES) -> list[list[int]]:
        """Pieces in blob order, grouped into runs whose compressed ranges touch,
        each at most `max_bytes` (one range request per run)."""
        runs: list[list[int]] = []
        start = end = -1
        for index in sorted(indices, key=lambda i: (self.pieces[i].offset, i)):
            piece = self.pieces[index]
            if runs and start <= piece.offset <= end and piece.end - start <= max_bytes:
                runs[-1].append(index)
                end = max(end, piece.end)
                continue
            runs.append([index])
            start, end = piece.offset, piece.end
        return runs

    def _fill_run(self, run: list[int], prefetch: bool) -> int:
        start = min(self.pieces[i].offset for i in run)
        end = max(self.pieces[i].end for i in run)
        compressed = self._fetch(start, end - start)
        if len(compressed) != end - start:
            raise InvalidLayer(
                f"the registry sent {len(compressed)} bytes for a range of {end - start}"
            )
        if prefetch:
            self.prefetch_fetched_bytes += len(compressed)
        else:
            self.fetched_bytes += len(compressed)
        view = memoryview(compressed)  # slices without copies
        batch: list[tuple[int, bytes]] = []
        batch_bytes = 0
        for index in run:
            piece = self.pieces[index]
            data = self.decode(
                self.owners[index], piece, view[piece.offset - start : piece.end - start]
            )
            if batch and (
                self._place[batch[-1][0]] + len(batch[-1][1]) != self._place[index]
                or len(batch) >= LAND_BATCH_PIECES
                or batch_bytes >= LAND_BATCH_BYTES
            ):
                self._land_batch(batch)
                batch, batch_bytes = [], 0
            batch.append((index, data))
            batch_bytes += len(data)
            if prefetch:
                self.prefetch_done_bytes += piece.end - piece.offset
            else:
                self.cache_misses += 1
        if batch:
            self._land_batch(batch)
        return len(compressed)

    def _land_batch(self, batch: list[tuple[int, bytes]]) -> None:
        """Pieces that lie back to back in the layer file: one pwritev, one wake-up.

        zstd:chunked's 64 KiB chunks are tens of thousands per GiB; a write
        and a notify each cost more than their bytes.
        """
        if len(batch) == 1:
            self._land(*batch[0])
            return
        try:
            self.layer_file.writev([data for _i, data in batch], self._place[batch[0][0]])
        except OSError:
            for index, data in batch:  # piece by piece: what fails goes to memory
                self._land(index, data)
            return
        with self._cond:
            for index, _data in batch:
                self._state[index] = PRESENT
            self._cond.notify_all()

    def decode(self, entry: Entry, piece: Piece, compressed: estargz.BlobBytes) -> bytes:
        """Decompress and verify one piece (IntegrityError if it does not match)."""
        if self.toc.compression == "gzip":
            return estargz.read_piece_gzip(compressed, piece, entry.name)
        return zstdchunked.read_piece_zstd(compressed, piece, entry.name)

    def _land(self, index: int, data: bytes) -> None:
        """A verified piece into the layer file; into memory if the file cannot take it
        (a full disk costs speed, never a read)."""
        try:
            self.layer_file.write(data, self._place[index])
        except OSError as exc:
            log.warning("lazy cache of a %s layer: %s; piece kept in memory", self.toc.format, exc)
            with self._cond:
                self._spill[index] = data
                self._spill_bytes += len(data)
                while self._spill_bytes > SPILL_BYTES and len(self._spill) > 1:
                    old, dropped = self._spill.popitem(last=False)
                    self._spill_bytes -= len(dropped)
                    if self._state[old] == PRESENT:
                        self._state[old] = MISSING
        self._landed(index)

    def _landed(self, index: int) -> None:
        with self._cond:
            self._state[index] = PRESENT
            self._cond.notify_all()

    # -- reads --------------------------------------------------------------------

    def _ensure(self, entry: Entry, first: int, last: int) -> None:
        """Every piece in [first, last) present: fetched by this thread, or by the
        thread that claimed it first (waited for, never fetched twice)."""
        entry_end = self._first[entry.name] + len(entry.pieces)
        while True:
            with self._cond:
                waiting = False
                gap = -1
                for index in range(first, last):
                    state = self._state[index]
                    if state == CLAIMED:
                        waiting = True
                    elif state != PRESENT:
                        gap = index
                        break
                if gap < 0:
                    if not waiting:
                        return
                    self._cond.wait(1.0)
                    continue
                run = self._claim_run(gap, max(last, gap + 1), entry_end)
            with _ON_DEMAND:
                self.fill(run)

    def _claim_run(self, gap: int, needed_end: int, entry_end: int) -> list[int]:
        """Claim from `gap` on: the missing pieces the read needs, then the file's
        next missing pieces up to ON_DEMAND_RUN_BYTES (caller holds the lock)."""
        run: list[int] = []
        start = self.pieces[gap].offset
        index = gap
        while index < entry_end:
            state = self._state[index]
            piece = self.pieces[index]
            if state == CLAIMED or state == PRESENT:
                if index >= needed_end:
                    break  # read-ahead stops at the first piece someone else has
                index += 1
                continue
            span = piece.end - start
            ahead = index >= needed_end and span > ON_DEMAND_RUN_BYTES
            if run and (span > MAX_RUN_BYTES or ahead):
                break
            self._state[index] = CLAIMED
            run.append(index)
            index += 1
        return run

    def read_landed(self, name: str, offset: int, length: int) -> bytes | None:
        """The bytes if every piece they need is present, else None (never fetches)."""
        entry = self.toc.entries.get(name)
        if entry is None or offset >= entry.size:
            return None
        length = min(length, entry.size - offset)
        first, last = self._span(entry, offset, length)
        if first == last:
            return None
        try:  # None from _assemble: a piece is not landed yet
            data = self._assemble(entry, first, last, offset, length)
        except OSError:
            return None
        if data is not None:
            self.read_bytes += len(data)
            self.cache_hits += 1
            self.failing_since = 0.0  # what pods read, they get
        return data

    def read(self, name: str, offset: int, length: int) -> bytes:
        entry = self.entry(name)
        try:
            data = self._read(entry, offset, length)
        except (CsiOciError, OSError) as exc:
            self.fetch_errors += 1
            self.failed(exc)
            raise
        self.failing_since = 0.0
        self.read_bytes += len(data)
        return data

    def failed(self, exc: BaseException) -> None:
        """Note a failed fetch (a read's or the background fill's) for the volume condition."""
        self.last_error = str(exc)[:300] or type(exc).__name__
        if not self.failing_since:
            self.failing_since = time.time()

    def _read(self, entry: Entry, offset: int, length: int) -> bytes:
        length = min(length, entry.size - offset)
        first, last = self._span(entry, offset, length)
        if first == last:
            return b""
        misses = self.cache_misses
        for _attempt in range(3):
            self._ensure(entry, first, last)
            data = self._assemble(entry, first, last, offset, length)
            if data is not None:
                if self.cache_misses == misses:
                    self.cache_hits += 1
                return data
        raise OSError(errno.EIO, f"{entry.name}: pieces kept being dropped from the lazy cache")

    def _assemble(
        self, entry: Entry, first: int, last: int, offset: int, length: int
    ) -> bytes | None:
        """The bytes, from the layer file in as few preads as possible (one, when no
        piece is synthesized zeros or held in memory); None if a piece went missing."""
        base = self._place[self._first[entry.name]] - entry.pieces[0].chunk_offset
        if not self._spill and not any(self.pieces[i].zeros for i in range(first, last)):
            # The common case: one pread, one copy.
            if any(self._state[i] != PRESENT for i in range(first, last)):
                return None
            data = self.layer_file.read(base + offset, length)
            return data if len(data) == length else None
        out = bytearray()
        position = offset
        end = offset + length
        index = first
        while position < end:
            piece = self.pieces[index]
            piece_end = min(end, piece.chunk_offset + piece.size)
            if piece.zeros:
                out += bytes(piece_end - position)
            elif index in self._spill:
                held = self._spill.get(index)
                if held is None:
                    return None
                out += held[position - piece.chunk_offset : piece_end - piece.chunk_offset]
            else:
                # Extend over the following stored pieces: one pread for all of them.
                stop = index
                while (
                    stop + 1 < last
                    and not self.pieces[stop + 1].zeros
                    and stop + 1 not in self._spill
                    and self.pieces[stop].chunk_offset + self.pieces[stop].size < end
                ):
                    stop += 1
                if any(self._state[i] != PRESENT for i in range(index, stop + 1)):
                    return None
                piece = self.pieces[stop]
                piece_end = min(end, piece.chunk_offset + piece.size)
                want = piece_end - position
                data = self.layer_file.read(base + position, want)
                if len(data) != want:
                    return None
                out += data
                index = stop
            position = piece_end
            index += 1
        return bytes(out)

    def read_all(self, name: str) -> bytes:
        entry = self.entry(name)
        return self.read(name, 0, entry.size)

    def close(self) -> None:
        self.layer_file.close()


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
