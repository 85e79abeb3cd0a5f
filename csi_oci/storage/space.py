"""The cache's room: how much the store holds, how much a pull may add, what to evict.

`--cache-max-bytes` caps what the store holds (trees by their own bytes and
entries, blobs, lazy pieces) and `--cache-min-free-bytes` keeps a floor of
free space on its filesystem. Eviction removes what no volume uses and no
publish is about to mount (`pinned`), least recently used first. A pull asks
for room as its bytes land (`evict_for`, from unpack.budget.DiskBudget),
never for the sizes a manifest claims.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from csi_oci.storage.pins import StorePins
from csi_oci.storage.records import ImageRecord, Usage, blob_pin
from csi_oci.telemetry import instruments

log = logging.getLogger(__name__)


class StoreContents(Protocol):
    """What the room is computed from (csi_oci.storage.store.Store)."""

    @property
    def root(self) -> Path: ...
    @property
    def blobs(self) -> Path: ...
    @property
    def chunks(self) -> Path: ...
    @property
    def trash(self) -> Path: ...
    def list_images(self) -> Sequence[ImageRecord]: ...
    def image_dir(self, key: str) -> Path: ...


def _on_disk(st: os.stat_result) -> int:
    """Bytes a file holds on disk: a lazy layer file is sparse until it is filled."""
    return min(st.st_size, st.st_blocks * 512)


def _held_open(path: Path) -> bool:
    """A lazy layer file in use: its FUSE server holds a shared flock on it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _eviction_kind(label: str) -> str:
    """The metric's `kind` label from a candidate's label ("tree …", "blob …", "lazy cache …");
    lazy layer files keep the `lazy_piece` kind the metric has always had."""
    return "lazy_piece" if label.startswith("lazy ") else label.partition(" ")[0]


Candidate = tuple[float, str, Path, int]  # (last used, label, path, bytes)


class CacheSpace:
    def __init__(
        self, contents: StoreContents, *, max_bytes: int | None = None, min_free_bytes: int = 0
    ) -> None:
        self._contents = contents
        self.max_bytes = max_bytes  # --cache-max-bytes; None: no budget
        self.min_free_bytes = min_free_bytes  # --cache-min-free-bytes: a floor for the disk
        self._pins_lock = threading.Lock()
        self._evict_lock = threading.Lock()  # one eviction at a time (parallel pulls)
        self._pinned: dict[str, int] = {}  # trees (and blobs) a publish or pull holds on to
        # Pins that outlive a call (pre-warmed images): a file, so another
        # process (`csi-oci gc`) and a restarted driver honour them too.
        self.held = StorePins(Path(contents.root) / "pins.json")

    @contextlib.contextmanager
    def pinned(self, key: str) -> Iterator[None]:
        """Keep a tree (or, with storage.records.blob_pin, a blob) from eviction meanwhile."""
        with self._pins_lock:
            self._pinned[key] = self._pinned.get(key, 0) + 1
        try:
            yield
        finally:
            with self._pins_lock:
                self._pinned[key] -= 1
                if not self._pinned[key]:
                    del self._pinned[key]

    # -- what there is ------------------------------------------------------------

    def usage(self) -> Usage:
        store = self._contents
        trees = sum(rec.own_bytes for rec in store.list_images())
        blobs = 0
        for directory in (store.blobs, store.chunks):
            for entry in directory.iterdir() if directory.is_dir() else []:
                with contextlib.suppress(OSError):
                    blobs += _on_disk(entry.lstat())
        return Usage(trees, blobs)

    def free_bytes(self) -> int:
        st = os.statvfs(self._contents.root)
        return st.f_bavail * st.f_frsize

    def _headroom(self) -> int:
        """Bytes a new pull may add now (negative: over budget or below the floor)."""
        limits = [self.free_bytes() - self.min_free_bytes]
        if self.max_bytes is not None:
            limits.append(self.max_bytes - self.usage().total)
        return min(limits)

    def room(self) -> int:
        return max(0, self._headroom())

    def best_room(self, in_use: set[str]) -> int:
        """Room there would be after evicting everything evictable."""
        evictable = sum(nbytes for _t, _l, _p, nbytes in self._candidates(in_use))
        limits = [self.free_bytes() + evictable - self.min_free_bytes]
        if self.max_bytes is not None:
            limits.append(self.max_bytes - (self.usage().total - evictable))
        return max(0, min(limits))

    def _candidates(self, in_use: set[str]) -> list[Candidate]:
        """Evictable items, least recently used first."""
        store = self._contents
        out = []
        with self._pins_lock:
            busy = set(in_use) | set(self._pinned) | self.held.keys()
        for rec in store.list_images():
            key = rec.key or rec.digest
            if key in busy:
                continue
            with contextlib.suppress(OSError):
                used = (store.image_dir(key) / "image.json").stat().st_mtime
                out.append(
                    (used, f"tree {rec.reference} ({key})", store.image_dir(key), rec.own_bytes)
                )
        for entry in store.blobs.iterdir() if store.blobs.is_dir() else []:
            if entry.name.endswith(".partial") or blob_pin(f"sha256:{entry.name}") in busy:
                continue
            with contextlib.suppress(OSError):
                st = entry.lstat()
                if st.st_nlink == 1:  # linked into no tree: a cached download
                    out.append((st.st_mtime, f"blob {entry.name}", entry, st.st_size))
        for entry in store.chunks.iterdir() if store.chunks.is_dir() else []:
            with contextlib.suppress(OSError):  # lazy layer files: fetched again when needed
                if _held_open(entry):
                    continue  # a FUSE server serves from it (shared flock)
                st = entry.lstat()
                out.append((st.st_mtime, f"lazy cache {entry.name}", entry, _on_disk(st)))
        out.sort(key=lambda item: item[0])
        return out

    # -- evicting -----------------------------------------------------------------

    def evict(self, needed: int, in_use: set[str]) -> int:
        """Free space for `needed` more bytes, LRU first, never what is in use.

        Trees whose raw files are hard links keep those blobs alive; removing
        such a tree turns them into unlinked blobs, evictable in turn.
        """
        freed = 0
        for _ in range(3):  # a removed tree can make its blobs evictable
            headroom = self._headroom()  # one walk of the store per pass, not per item
            progress = False
            for _used, label, path, nbytes in self._candidates(in_use):
                if headroom >= needed:
                    return freed
                self._remove(label, path, nbytes)
                freed += nbytes
                headroom += nbytes
                progress = True
            if not progress:
                break
        return freed

    def evict_for(self, extra: int, in_use: set[str]) -> int:
        """Evict unused items, least recently used first, until `extra` bytes are freed.

        For a pull whose bytes have landed and need room (unpack.budget.DiskBudget);
        returns the bytes freed, which may be less when nothing else is unused.
        """
        freed = 0
        with self._evict_lock:
            for _ in range(3):  # a removed tree can make its blobs evictable
                progress = False
                for _used, label, path, nbytes in self._candidates(in_use):
                    if freed >= extra:
                        return freed
                    self._remove(label, path, nbytes, why=" to make room for a pull")
                    freed += nbytes
                    progress = True
                if not progress or freed >= extra:
                    break
        return freed

    def gc(self, in_use: set[str], *, everything: bool = False) -> int:
        """`csi-oci gc`: back under the budget (or remove all that is unused)."""
        if not everything:
            return self.evict(0, in_use)
        freed = 0
        for _ in range(2):
            for _used, label, path, nbytes in self._candidates(in_use):
                self._remove(label, path, nbytes)
                freed += nbytes
        return freed

    def _remove(self, label: str, path: Path, nbytes: int, why: str = "") -> None:
        log.info("evicting %s (%d bytes)%s", label, nbytes, why)
        if path.is_dir():
            # Out of sight first (atomic), then delete at leisure.
            self._contents.trash.mkdir(mode=0o700, parents=True, exist_ok=True)
            hidden = Path(tempfile.mkdtemp(prefix="evict-", dir=self._contents.trash))
            os.rename(path, hidden / "tree")
            shutil.rmtree(hidden, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        instruments.count_eviction(_eviction_kind(label), nbytes)
