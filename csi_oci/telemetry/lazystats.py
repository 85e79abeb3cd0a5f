"""The lazy FUSE servers' stats files: written by each server, read by the endpoint.

Each `python -m csi_oci.lazy.fs` is its own process (it outlives a restart of
the gRPC server), so it cannot touch the driver's counters: it writes its
totals every few seconds to `<state>/lazy/<hex>/stats.json` and the endpoint
reads them. No prometheus_client here: FUSE servers do not load it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAZY_STATS_FILE = "stats.json"


LAZY_STATS_STALE_SECONDS = 300.0


# The stats file's numbers and the metrics the endpoint makes of them.
LAZY_COUNTERS: dict[str, tuple[str, str]] = {
    "read_bytes": ("csi_oci_lazy_read_bytes", "Bytes returned to readers of lazy volumes"),
    "cache_hits": (
        "csi_oci_lazy_cache_hits",
        "Lazy piece lookups served from the verified piece cache",
    ),
    "cache_misses": (
        "csi_oci_lazy_cache_misses",
        "Lazy piece lookups that had to fetch from the registry",
    ),
    "fetch_errors": (
        "csi_oci_lazy_fetch_errors",
        "Lazy fetches or piece verifications that failed (the read got EIO)",
    ),
}


# The two kinds of fetched bytes are one metric with a `cause` label, so
# that `sum without (cause)` is the total traffic.
LAZY_FETCHED: dict[str, str] = {
    "on_demand_fetched_bytes": "on_demand",
    "prefetch_fetched_bytes": "prefetch",
}


LAZY_GAUGES: dict[str, tuple[str, str]] = {
    "prefetch_done_bytes": (
        "csi_oci_lazy_prefetch_done_bytes",
        "Bytes of the lazy prefetch plan already cached",
    ),
    "prefetch_total_bytes": (
        "csi_oci_lazy_prefetch_total_bytes",
        "Bytes the lazy prefetch plan covers",
    ),
}


LAZY_TEXT_KEYS = ("image", "digest", "last_error")


# Read by NodeGetVolumeStats (csi_oci.publish.usage), not made metrics here:
# kubelet turns them into kubelet_volume_stats_* and the volume condition.
LAZY_VOLUME_KEYS = ("tree_bytes", "tree_inodes", "failing_since")


LAZY_NUMBER_KEYS = (
    *LAZY_COUNTERS,
    *LAZY_FETCHED,
    *LAZY_GAUGES,
    *LAZY_VOLUME_KEYS,
    "pid",
    "updated_at",
)


def write_lazy_stats(path: Path | str, stats: dict[str, Any]) -> None:
    """Publish a lazy FUSE server's totals (called by lazyfs every few seconds).

    `path` is `<state>/lazy/<hex>/stats.json`. Unknown keys and non-numbers
    raise ValueError: a typo would otherwise be a metric silently stuck at 0.
    The file is replaced atomically (readers see the old or the new one) but
    not fsynced: the numbers are worthless after a reboot anyway, and a
    periodic fsync would cost the FUSE server disk flushes for nothing.
    """
    out: dict[str, Any] = {}
    for key, value in stats.items():
        if key in LAZY_TEXT_KEYS:
            if not isinstance(value, str):
                raise ValueError(f"lazy stats key {key!r} must be a string, not {value!r}")
        elif key in LAZY_NUMBER_KEYS:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"lazy stats key {key!r} must be a number >= 0, not {value!r}")
        else:
            raise ValueError(f"unknown lazy stats key {key!r} (see csi_oci/metrics.py)")
        out[key] = value
    out.setdefault("pid", os.getpid())
    out.setdefault("updated_at", time.time())
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".stats-", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(out, f, sort_keys=True)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class LazyStats:
    image: str
    digest: str
    numbers: dict[str, float]
    server: str = ""  # the stats file's directory under <state>/lazy: one per server
    last_error: str = ""  # why reads fail, while they do (see numbers["failing_since"])


def read_lazy_stats(lazy_root: Path, *, now: float | None = None) -> list[LazyStats]:
    """The fresh stats files under `<state>/lazy/*/`; unreadable or stale ones skipped."""
    now = time.time() if now is None else now
    found = []
    for path in sorted(lazy_root.glob(f"*/{LAZY_STATS_FILE}")):
        stats = read_server_stats(path.parent, now=now)
        if stats is not None:
            found.append(stats)
    return found


def read_server_stats(server_dir: Path, *, now: float | None = None) -> LazyStats | None:
    """One FUSE server's stats file (`<state>/lazy/<hex>/stats.json`), if fresh and readable."""
    path = server_dir / LAZY_STATS_FILE
    now = time.time() if now is None else now
    try:
        if now - path.stat().st_mtime > LAZY_STATS_STALE_SECONDS:
            return None
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a server mid-exit or a torn file: next snapshot will tell
    if not isinstance(raw, dict):
        return None
    numbers = {
        k: float(v)
        for k, v in raw.items()
        if k in LAZY_NUMBER_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
    }
    digest = raw.get("digest") if isinstance(raw.get("digest"), str) else ""
    last_error = raw.get("last_error")
    return LazyStats(
        image=str(raw.get("image") or ""),
        digest=digest or f"sha256:{path.parent.name}",
        numbers=numbers,
        server=path.parent.name,
        last_error=last_error if isinstance(last_error, str) else "",
    )


LAZY_COUNTER_KEYS = (*LAZY_COUNTERS, *LAZY_FETCHED)
