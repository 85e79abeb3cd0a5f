"""Pull jobs: one background pull per tree, joined by every publish that needs it.

A NodePublishVolume waits at most --publish-wait for its job, then answers
ABORTED with the job's progress; kubelet's retry joins the same job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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


class PullJobs:
    """Single flight: at most one running job per tree key, joined by every caller."""

    def __init__(self) -> None:
        self._jobs: dict[str, PullJob] = {}
        self._lock = threading.Lock()

    def join_or_start(
        self,
        key: str,
        reference: str,
        *,
        finished_is_answer: Callable[[], bool],
        start: Callable[[PullJob], None],
    ) -> PullJob:
        """The running job for `key`, else a new one handed to `start`.

        A finished job is the answer only when `finished_is_answer()` (its
        tree is still in the store): the caller looked for the tree just
        before that job committed it, and without this, publishes at once
        could pull the image twice. A failure is never replayed: the retry
        must look at the registry again (the blob may have been fixed), and
        an evicted tree is pulled again.
        """
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.done.is_set():
                if job.error is None and finished_is_answer():
                    return job
                job = None
            if job is None:
                job = PullJob(key, reference)
                self._jobs[key] = job
                start(job)
            return job

    def active(self) -> list[PullJob]:
        with self._lock:
            return [j for j in self._jobs.values() if not j.done.is_set()]
