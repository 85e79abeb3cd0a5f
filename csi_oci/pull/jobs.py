"""Pull jobs: one background pull per tree, joined by every publish that needs it.

A NodePublishVolume waits at most --publish-wait for its job, then answers
ABORTED with the job's progress; kubelet's retry joins the same job.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from csi_oci.errors import (
    PullInProgress,
)


@dataclass
class Progress:
    """Bytes of layer blobs received, for ABORTED messages and the CLI bar."""

    total: int = 0
    done: int = 0
    phase: str = "resolving"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _first_byte_at: float | None = field(default=None, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            if self._first_byte_at is None:
                self._first_byte_at = time.monotonic()
            self.done += n

    def rate(self) -> float | None:
        """Bytes per second since the first byte arrived (None before a second of data)."""
        if self._first_byte_at is None:
            return None
        elapsed = time.monotonic() - self._first_byte_at
        return self.done / elapsed if elapsed >= 1.0 else None

    def status(self) -> str:
        """`3.2/14.0 GiB (23%), 180.0 MiB/s, ETA 61s`, or the phase before bytes flow."""
        if self.total <= 0:
            return self.phase
        pct = 100.0 * self.done / self.total
        text = f"{human(self.done)}/{human(self.total)} ({pct:.0f}%)"
        rate = self.rate()
        if rate:
            eta = max(0, self.total - self.done) / rate
            text += f", {human(int(rate))}/s, ETA {eta:.0f}s"
        elif self.done == 0:
            text += ", waiting for the first bytes"
        return text

    def describe(self) -> str:
        if self.total <= 0:
            return self.phase
        pct = 100.0 * self.done / self.total
        return f"{self.phase}: {human(self.done)} of {human(self.total)} ({pct:.0f}%)"


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


class PullJob:
    """One background pull of one tree."""

    def __init__(self, key: str, reference: str = "") -> None:
        self.key = key
        self.reference = reference or key
        self.progress = Progress()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.tree: Path | None = None

    def wait(self, timeout: float | None) -> Path:
        if not self.done.wait(timeout):
            raise PullInProgress(
                f"pull of {self.reference} in progress: {self.progress.status()} "
                f"({self.key}); it continues in the background and the next retry picks it up"
            )
        if self.error is not None:
            raise self.error
        assert self.tree is not None
        return self.tree
