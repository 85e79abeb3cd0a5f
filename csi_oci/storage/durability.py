"""Background flushing of committed trees and blobs, safe across reboots."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from csi_oci.storage.atomic import syncfs

log = logging.getLogger(__name__)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class Durability:
    """Background flushing of committed trees and blobs, safe across reboots.

    Before an item is renamed into the store, a marker file naming it (and
    holding this boot's id) is created; the filesystem journal orders that
    metadata change before the rename. A single background thread runs
    syncfs and then removes the markers that existed when it started. A
    marker left from an *earlier boot* means the item may be torn (renamed
    but its data never written): `torn()` lists those for removal.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._boot = boot_id()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def pending(self, name: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / name).write_text(self._boot)

    def done(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)

    def torn(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        out = []
        for marker in sorted(self.dir.iterdir()):
            try:
                if marker.read_text().strip() != self._boot:
                    out.append(marker.name)
            except OSError:
                out.append(marker.name)
        return out

    def request(self) -> None:
        """Ask for a flush soon; returns at once."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="syncer", daemon=True)
                self._thread.start()
        self._wake.set()

    def flush(self) -> None:
        """Flush now, in the caller's thread (tests and shutdown)."""
        self._sync_once()

    def _run(self) -> None:
        while self._wake.wait(timeout=60):
            self._wake.clear()
            try:
                self._sync_once()
            except OSError as exc:
                log.warning("background flush of the store failed: %s", exc)

    def _sync_once(self) -> None:
        if not self.dir.is_dir():
            return
        covered = list(self.dir.iterdir())
        if not covered:
            return
        syncfs(self.dir)
        for marker in covered:
            marker.unlink(missing_ok=True)
        syncfs(self.dir)  # persist the removals: metadata only, cheap
