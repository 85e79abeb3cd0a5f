"""Prefetch: fill a layer's piece cache in the background, in large requests.

Order: the prioritized files (up to `.prefetch.landmark`) first, then, for
`all`, the rest of the layer. Adjacent pieces are merged into one range
request (up to MERGE_BYTES) so a layer arrives in few, large transfers. An
on-demand read always goes first: prefetch waits while any is in progress.
Once every piece is cached, reads never touch the network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from csi_oci.errors import CsiOciError
from csi_oci.lazy.reader import LazyReader
from csi_oci.lazy.toc import Entry, Piece

log = logging.getLogger(__name__)

MODES = ("none", "landmark", "all")
MERGE_BYTES = 16 << 20
MAX_FAILURES = 20  # per layer, before the background fill gives up
RETRY_BASE = 1.0
RETRY_CAP = 60.0


def _groups(items: list[tuple[Entry, Piece]]) -> list[list[tuple[Entry, Piece]]]:
    """Pieces in blob order, merged while their compressed ranges touch."""
    groups: list[list[tuple[Entry, Piece]]] = []
    start = end = -1
    for entry, piece in sorted(items, key=lambda item: (item[1].offset, item[1].inner_offset)):
        if groups and piece.offset <= end and max(end, piece.end) - start <= MERGE_BYTES:
            groups[-1].append((entry, piece))
            end = max(end, piece.end)
            continue
        groups.append([(entry, piece)])
        start, end = piece.offset, piece.end
    return groups


def prefetch(
    reader: LazyReader,
    mode: str,
    stop: threading.Event | None = None,
    wanted: Callable[[str], bool] | None = None,
) -> int:
    """Cache the layer's pieces per `mode`; returns the compressed bytes fetched.

    `wanted`: only files it accepts (a volume's include set) are fetched.
    """
    if mode == "none":
        return 0
    toc = reader.toc
    items = [
        (e, p)
        for e in toc.entries.values()
        if wanted is None or wanted(e.name)
        for p in e.pieces
        if not p.zeros
    ]
    if toc.prefetch_end is not None:
        first = [(e, p) for e, p in items if p.offset < toc.prefetch_end]
    else:
        first = []
    first_ids = {id(p) for _e, p in first}
    rest = [] if mode == "landmark" else [(e, p) for e, p in items if id(p) not in first_ids]
    fetched = 0
    failures = 0
    planned = first + rest
    reader.prefetch_total_bytes = sum(p.end - p.offset for _e, p in planned)
    reader.prefetch_done_bytes = sum(p.end - p.offset for _e, p in planned if reader.cached(p))
    for phase in (first, rest):
        for group in _groups([(e, p) for e, p in phase if not reader.cached(p)]):
            start = group[0][1].offset
            end = max(p.end for _e, p in group)
            while True:
                while reader.demand > 0 and not (stop and stop.is_set()):
                    time.sleep(0.005)  # on-demand reads first
                if stop is not None and stop.is_set():
                    return fetched
                try:
                    data = reader.fetch_range(start, end - start)
                    break
                except (CsiOciError, OSError) as exc:
                    # A flaky registry delays the background fill; it does not
                    # end it (a complete layer is what makes reads local).
                    failures += 1
                    if failures > MAX_FAILURES:
                        log.warning("prefetch of %s gave up at %d: %s", toc.format, start, exc)
                        return fetched
                    pause = min(RETRY_CAP, RETRY_BASE * 2 ** (failures - 1))
                    log.warning(
                        "prefetch of %s failed at %d (%s); again in %.0f s",
                        toc.format,
                        start,
                        exc,
                        pause,
                    )
                    if stop is not None and stop.wait(pause):
                        return fetched
                    if stop is None:
                        time.sleep(pause)
            fetched += len(data)
            reader.prefetch_fetched_bytes += len(data)
            for entry, piece in group:
                try:
                    piece_bytes = reader.decode(
                        entry, piece, data[piece.offset - start : piece.end - start]
                    )
                except CsiOciError as exc:
                    log.error("prefetch: %s", exc)  # not cached; an on-demand read will say so
                    continue
                reader.store_piece(entry, piece, piece_bytes)
                reader.prefetch_done_bytes += piece.end - piece.offset
    log.info("prefetch (%s) of a %s layer done: %d bytes fetched", mode, toc.format, fetched)
    return fetched
