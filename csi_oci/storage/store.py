"""The node store: unpacked image trees, content-addressed, under the state dir.

Layout (everything below `--state-dir`):

    images/sha256/<manifest hex>/rootfs/   the unpacked tree, shared by all volumes
    images/sha256/<manifest hex>/image.json  what it is: reference, layers, sizes
    refs/<sha256 of "ref|platform">.json   last resolution of a tag (storage.tags)
    blobs/sha256/<hex>                     verified layer blobs spooled during a pull
    staging/<random>/                      trees being built; never visible elsewhere
    trash/                                 failed or evicted trees, deleted in the background
    volumes/                               published-volume records (see volumes.py)

A tree becomes visible only by an atomic rename of a finished, synced
staging directory, so a crash or failure at any point leaves either the old
state or the new one, and `recover()` at start sweeps what a dead pull left."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

from csi_oci.errors import CsiOciError, FailedPrecondition
from csi_oci.spec.reference import validate_digest
from csi_oci.storage.atomic import read_json, write_json_atomic
from csi_oci.storage.durability import Durability
from csi_oci.storage.records import ImageRecord
from csi_oci.storage.space import CacheSpace
from csi_oci.storage.tags import TagRecords

log = logging.getLogger(__name__)


class Store:
    """Trees and blobs under the state dir; `tags` and `space` are its two helpers."""

    def __init__(
        self, state_dir: Path, *, max_bytes: int | None = None, min_free_bytes: int = 0
    ) -> None:
        self.root = Path(state_dir)
        self.images = self.root / "images" / "sha256"
        self.refs = self.root / "refs"
        self.blobs = self.root / "blobs" / "sha256"
        self.staging = self.root / "staging"
        self.durable = Durability(self.root / "pending-sync")
        self.chunks = self.root / "lazy" / "chunks"  # verified lazy pieces (lazymount)
        self.trash = self.root / "trash"  # failed pulls' trees, being deleted
        self._trash_queue: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._trash_lock = threading.Lock()
        self._trash_thread: threading.Thread | None = None
        self.tags = TagRecords(self.refs)
        self.space = CacheSpace(self, max_bytes=max_bytes, min_free_bytes=min_free_bytes)

    def touch(self, key: str) -> None:
        """Mark a tree as just used (eviction is least recently used first)."""
        with contextlib.suppress(OSError, ValueError):
            os.utime(self.image_dir(key) / "image.json")

    def lock(self, *, wait: bool) -> int:
        """Take the state dir's owner lock (held until the process exits).

        Only the owner may run `recover()`: it deletes staging trees, which
        would destroy the pulls of another process using the same state dir.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(
                f"state dir {self.root} is in use by another csi-oci process (a running "
                "`csi-oci serve`?); stop it or pass a different --state-dir"
            ) from None
        return fd

    def ensure_layout(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Only root may look in: trees of every tenant's images, volume records
        # and lazy servers' logs live here. Pods see their trees through bind
        # mounts, which do not need the path to them to be searchable.
        os.chmod(self.root, 0o700)
        for d in (self.images, self.refs, self.blobs, self.staging, self.durable.dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.staging, 0o700)

    def recover(self) -> None:
        """Remove what interrupted pulls left behind (staging trees, partial blobs),
        and whatever a reboot may have torn before it reached the disk."""
        self.ensure_layout()
        for name in self.durable.torn():
            kind, _, item = name.partition("-")
            path = (self.images if kind == "image" else self.blobs) / item
            log.warning(
                "removing %s %s: committed but not yet on disk when the node went down", kind, item
            )
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            self.durable.done(name)
        self.durable.request()  # anything pending from this boot: flush it now
        for entry in self.staging.iterdir():
            log.info("removing leftover staging directory %s", entry.name)
            shutil.rmtree(entry, ignore_errors=True)
        for entry in self.trash.iterdir() if self.trash.is_dir() else []:
            self._to_trash(entry)  # deleted in the background, as when discarded
        for entry in self.blobs.iterdir():
            if entry.name.endswith(".partial") or entry.name.startswith(".tmp-"):
                entry.unlink(missing_ok=True)

    # -- images ---------------------------------------------------------------

    def image_dir(self, key: str) -> Path:
        digest, dot, suffix = key.partition(".")
        algo, _, hexpart = validate_digest(digest).partition(":")
        if algo != "sha256":
            raise ValueError("only sha256 manifests are stored")
        if dot and not (suffix.startswith("include-") and suffix[8:].isalnum()):
            raise ValueError(f"bad store key {key!r}")
        return self.images / (hexpart + dot + suffix)

    def tree(self, key: str) -> Path:
        return self.image_dir(key) / "rootfs"

    def image(self, key: str) -> ImageRecord | None:
        raw = read_json(self.image_dir(key) / "image.json")
        if raw is None or not (self.image_dir(key) / "rootfs").is_dir():
            return None
        try:
            return ImageRecord(**raw)
        except TypeError:
            log.warning("ignoring unreadable image record %s", key)
            return None

    def note_signatures(self, key: str, entries: list[dict[str, str]]) -> None:
        """Add verified signatures to a tree's image.json (one entry per rule and signer)."""
        record = self.image(key)
        if record is None:
            return
        merged = [s for s in record.signatures if s.get("rule") not in {e["rule"] for e in entries}]
        merged += entries
        if merged == record.signatures:
            return
        write_json_atomic(
            self.image_dir(key) / "image.json",
            asdict(replace(record, signatures=merged)),
            durable=False,
        )

    def new_staging(self) -> Path:
        self.ensure_layout()
        path = Path(tempfile.mkdtemp(prefix="pull-", dir=self.staging))
        (path / "rootfs").mkdir(mode=0o755)
        return path

    def commit(self, staging: Path, record: ImageRecord) -> Path:
        """Make a finished staging tree the image's tree, atomically.

        The rename makes it visible at once; flushing it to disk happens in
        the background (see `durable`), so a publish does not wait for the
        disk. Until then a pending-sync marker names it.
        """
        # No fsync of its own: the tree's pending-sync marker covers it.
        write_json_atomic(staging / "image.json", asdict(record), durable=False)
        os.chmod(staging, 0o755)
        final = self.image_dir(record.key or record.digest)
        self.durable.pending(f"image-{final.name}")
        try:
            os.rename(staging, final)
        except OSError:
            if self.image(record.key or record.digest) is None:
                raise
            # Someone committed the same image first: theirs is as good as ours.
            shutil.rmtree(staging, ignore_errors=True)
        self.durable.request()
        return final / "rootfs"

    def commit_blob(self, tmp: Path, digest: str, *, flush: bool = True) -> Path:
        """Move a verified blob into the blob store (flushed in the background).

        A pull passes `flush=False` and its tree's commit flushes everything
        pending: a syncfs while the other blobs still stream in would write
        them back mid-download, on the cores and disk the pull is using. The
        marker makes the blob safe either way (torn() after a power loss).
        """
        final = self.blob_path(digest)
        self.durable.pending(f"blob-{final.name}")
        os.rename(tmp, final)
        if flush:
            self.durable.request()
        return final

    def discard(self, staging: Path) -> None:
        """Drop a failed pull's staging tree: out of sight at once, deleted in the background.

        A refused layer of 100,000 empty directories takes a minute to delete
        on a small disk; the publish that reports the refusal must not wait
        for it. Whatever a crash leaves in the trash goes at the next start.
        """
        try:
            self.trash.mkdir(mode=0o700, parents=True, exist_ok=True)
            hidden = self.trash / staging.name
            os.rename(staging, hidden)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            return
        self._to_trash(hidden)

    def _to_trash(self, path: Path) -> None:
        self._trash_queue.put(path)
        with self._trash_lock:
            if self._trash_thread is None or not self._trash_thread.is_alive():
                self._trash_thread = threading.Thread(
                    target=self._empty_trash, name="trash", daemon=True
                )
                self._trash_thread.start()

    def _empty_trash(self) -> None:
        while True:
            try:
                path = self._trash_queue.get(timeout=5)
            except queue.Empty:
                return
            shutil.rmtree(path, ignore_errors=True)

    def wait_for_trash(self, timeout: float = 60.0) -> None:
        """Block until discarded trees are deleted (tests, shutdown)."""
        thread = self._trash_thread
        deadline = time.monotonic() + timeout
        while not self._trash_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))

    def list_images(self) -> list[ImageRecord]:
        out = []
        for entry in sorted(self.images.iterdir()) if self.images.is_dir() else []:
            try:
                rec = self.image("sha256:" + entry.name)
            except (ValueError, CsiOciError):
                continue
            if rec is not None:
                out.append(rec)
        return out

    # -- spooled blobs ----------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = validate_digest(digest).partition(":")
        return self.blobs / (hexpart if algo == "sha256" else f"{algo}-{hexpart}")

    def usable(self) -> bool:
        """The state dir exists and is writable (Probe's readiness)."""
        try:
            self.ensure_layout()
            fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=self.root)
            os.close(fd)
            os.unlink(tmp)
            return True
        except OSError:
            return False
