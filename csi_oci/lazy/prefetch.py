"""Hydration: fill a layer's local file in the background, at pipeline speed.

Order: the prioritized files (up to `.prefetch.landmark`) first, then, for
`all`, the rest of the layer, in blob order. Pieces are fetched in large
range requests (up to RUN_BYTES, pieces whose compressed ranges touch), by
WORKERS threads at once: while one waits on the network, others inflate and
verify (zlib, zstd and sha256 release the GIL). Every image served by a
FUSE server shares one bound on runs in flight (its layers fill in
parallel, its memory stays bounded).

On-demand reads never queue behind this: a read claims the pieces it needs
(csi_oci.lazy.reader) and fetches them itself, and a run here claims its
pieces only as it starts, so it skips what a read already took and a read
waits only for a piece already on the wire. No piece is fetched twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from csi_oci.errors import CsiOciError
from csi_oci.lazy.reader import LazyReader

log = logging.getLogger(__name__)

MODES = ("none", "landmark", "all")
RUN_BYTES = 8 << 20  # one range request; WORKERS of them in memory at once, compressed
WORKERS = 3
MAX_FAILURES = 20  # per layer, before the background fill gives up
RETRY_BASE = 1.0
RETRY_CAP = 60.0
# Runs in flight across every layer of this process (one FUSE server = one image).
_IN_FLIGHT = threading.BoundedSemaphore(WORKERS)


def plan(
    reader: LazyReader, mode: str, wanted: Callable[[str], bool] | None = None
) -> list[list[int]]:
    """Runs of piece indices in fill order: prioritized files first, each phase in
    blob order, consecutive pieces grouped while their ranges touch."""
    if mode == "none":
        return []
    toc = reader.toc
    chosen = [
        i
        for i, (entry, piece) in enumerate(zip(reader.owners, reader.pieces, strict=True))
        if not piece.zeros and (wanted is None or wanted(entry.name))
    ]
    if toc.prefetch_end is not None:
        first = [i for i in chosen if reader.pieces[i].offset < toc.prefetch_end]
    else:
        first = []
    first_set = set(first)
    rest = [] if mode == "landmark" else [i for i in chosen if i not in first_set]
    return reader.runs(first, RUN_BYTES) + reader.runs(rest, RUN_BYTES)


def prefetch(
    reader: LazyReader,
    mode: str,
    stop: threading.Event | None = None,
    wanted: Callable[[str], bool] | None = None,
    workers: int = WORKERS,
) -> int:
    """Land the layer's pieces per `mode`; returns the compressed bytes fetched.

    `wanted`: only files it accepts (a volume's include set) are fetched.
    Blocks until done (or `stop`); the FUSE server runs it on a thread per layer.
    """
    runs = plan(reader, mode, wanted)
    reader.prefetch_total_bytes = sum(
        reader.pieces[i].end - reader.pieces[i].offset for run in runs for i in run
    )
    reader.prefetch_done_bytes = sum(
        reader.pieces[i].end - reader.pieces[i].offset
        for run in runs
        for i in run
        if reader.present(i)
    )
    if not runs:
        return 0
    state = _Fill(reader, runs, stop)
    threads = [
        threading.Thread(target=state.work, name=f"hydrate-{n}", daemon=True)
        for n in range(max(1, workers))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reader.prefetch_done_bytes = sum(  # exact, now that nothing is in flight
        reader.pieces[i].end - reader.pieces[i].offset
        for run in runs
        for i in run
        if reader.present(i)
    )
    log.info(
        "prefetch (%s) of a %s layer done: %d bytes fetched",
        mode,
        reader.toc.format,
        state.fetched,
    )
    return state.fetched


class _Fill:
    """Runs handed out in order to the worker threads of one layer's fill."""

    def __init__(
        self, reader: LazyReader, runs: list[list[int]], stop: threading.Event | None
    ) -> None:
        self.reader = reader
        self.runs = runs
        self.stop = stop or threading.Event()
        self.lock = threading.Lock()
        self.next = 0
        self.failures = 0
        self.fetched = 0

    def _take(self) -> list[int] | None:
        with self.lock:
            if self.next >= len(self.runs) or self.stop.is_set():
                return None
            run = self.runs[self.next]
            self.next += 1
            return run

    def work(self) -> None:
        reader = self.reader
        while (run := self._take()) is not None:
            while not self.stop.is_set():
                with _IN_FLIGHT:
                    claimed = reader.claim(run)  # what no read has taken meanwhile
                    taken = set(claimed)
                    # A read landed (or is landing) the others: done as far as the fill goes.
                    reader.prefetch_done_bytes += sum(
                        reader.pieces[i].end - reader.pieces[i].offset
                        for i in run
                        if i not in taken
                    )
                    if not claimed:
                        break
                    try:
                        fetched = reader.fill(claimed, prefetch=True)
                    except (CsiOciError, OSError) as exc:
                        error: Exception | None = exc
                    else:
                        error = None
                with self.lock:
                    if error is None:
                        self.fetched += fetched
                        reader.failing_since = 0.0
                        break
                    reader.failed(error)
                    # A flaky registry delays the background fill; it does not
                    # end it (a complete layer is what makes reads local).
                    self.failures += 1
                    failures = self.failures
                if failures > MAX_FAILURES:
                    log.warning("prefetch of %s gave up: %s", reader.toc.format, error)
                    self.stop.set()
                    return
                pause = min(RETRY_CAP, RETRY_BASE * 2 ** (failures - 1))
                log.warning(
                    "prefetch of %s failed (%s); again in %.0f s", reader.toc.format, error, pause
                )
                self.stop.wait(pause)
