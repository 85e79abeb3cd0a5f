"""Prometheus metrics, the /metrics + /healthz endpoint, and lazy servers' stats files.

Metric objects live in one registry of their own (not prometheus_client's
global one), so importing this module twice in a test process or from the
CLI never trips over duplicate registrations, and the endpoint shows only
what csi-oci defines plus the process metrics.

Values that already exist on disk (store size, published volumes) are not
mirrored into gauges that could drift: `NodeCollector` reads them when
Prometheus scrapes. So do the lazy FUSE servers' numbers: every
`python -m csi_oci.lazyfs` process is a separate process (it outlives a
restart of the gRPC server), so it cannot touch this process's counters.
Instead it writes its totals every few seconds with `write_lazy_stats()`
to `<state>/lazy/<hex>/stats.json`, and the collector reads those files at
scrape time.

Lazy stats file (`stats.json`, one JSON object; counters are totals since
that FUSE server started, so a restarted server starts again from 0, which
Prometheus treats as a counter reset):

| key | kind | meaning |
|---|---|---|
| `image` | string | the image reference the server serves (a label) |
| `digest` | string | its manifest digest (a label; default: from the directory name) |
| `read_bytes` | counter | bytes returned to readers of the FUSE filesystem |
| `on_demand_fetched_bytes` | counter | bytes fetched from the registry because a read needed them |
| `prefetch_fetched_bytes` | counter | bytes fetched by the background prefetch |
| `cache_hits` | counter | piece lookups served from the verified piece cache (memory or disk) |
| `cache_misses` | counter | piece lookups that had to fetch from the registry |
| `fetch_errors` | counter | fetches or piece verifications that failed (the read got EIO) |
| `prefetch_done_bytes` | gauge | bytes of the prefetch plan already cached |
| `prefetch_total_bytes` | gauge | bytes the prefetch plan covers (0: no prefetch) |
| `pid` | integer | the writer's process id (filled in when absent) |
| `updated_at` | number | unix time of the write (filled in when absent) |

A file not rewritten for `LAZY_STATS_STALE_SECONDS` belongs to a server
that is gone and is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from csi_oci.errors import CsiOciError

if TYPE_CHECKING:  # only for annotations: keeps this module importable from lazyfs cheaply
    from csi_oci.store import Store
    from csi_oci.volumes import VolumeManager

log = logging.getLogger(__name__)

DEFAULT_METRICS_ADDRESS = ":9808"
LAZY_STATS_FILE = "stats.json"
LAZY_STATS_STALE_SECONDS = 300.0

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Model images take from seconds to an hour to pull: buckets span that range.
PULL_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
RPC_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 90, 120)

PULLS = Counter(
    "csi_oci_pulls",
    "Pulls of an image tree into the node store that finished, by outcome",
    ["outcome"],
    registry=REGISTRY,
)
PULLS_IN_PROGRESS = Gauge(
    "csi_oci_pulls_in_progress", "Pulls running now (in the background)", registry=REGISTRY
)
PULL_BYTES = Counter(
    "csi_oci_pull_bytes",
    "Bytes of blobs (layers and configs) received from registries and mirrors by pulls, "
    "resent bytes included",
    registry=REGISTRY,
)
PULL_DURATION = Histogram(
    "csi_oci_pull_duration_seconds",
    "Time from the start of a pull to its commit into the store (or its failure)",
    ["outcome"],
    buckets=PULL_DURATION_BUCKETS,
    registry=REGISTRY,
)
PULL_ERRORS = Counter(
    "csi_oci_pull_errors",
    "Failures to resolve or pull an image, by reason",
    ["reason"],
    registry=REGISTRY,
)
EVICTIONS = Counter(
    "csi_oci_store_evictions",
    "Items removed from the node store to make room (or by gc), by kind",
    ["kind"],
    registry=REGISTRY,
)
EVICTED_BYTES = Counter(
    "csi_oci_store_evicted_bytes", "Bytes freed by evictions", registry=REGISTRY
)
RPCS = Counter(
    "csi_oci_rpcs",
    "CSI calls answered, by method and gRPC code",
    ["method", "code"],
    registry=REGISTRY,
)
RPC_DURATION = Histogram(
    "csi_oci_rpc_duration_seconds",
    "Time to answer a CSI call, by method",
    ["method"],
    buckets=RPC_DURATION_BUCKETS,
    registry=REGISTRY,
)

OUTCOMES = ("succeeded", "failed")
ERROR_REASONS = (
    "not_found",
    "auth_denied",
    "registry_unreachable",
    "registry_error",
    "digest_mismatch",
    "invalid_layer",
    "out_of_space",
    "unsupported",
    "invalid_argument",
    "failed_precondition",
    "internal",
)
EVICTION_KINDS = ("tree", "blob", "lazy_piece")

# Series exist from the first scrape with 0, so rate() and alerts see the
# first event instead of a series appearing out of nowhere.
for _outcome in OUTCOMES:
    PULLS.labels(_outcome)
    PULL_DURATION.labels(_outcome)
for _reason in ERROR_REASONS:
    PULL_ERRORS.labels(_reason)
for _kind in EVICTION_KINDS:
    EVICTIONS.labels(_kind)


def error_reason(exc: BaseException) -> str:
    """The `reason` label of an error (see errors.py: every class names one)."""
    if isinstance(exc, CsiOciError):
        return exc.reason
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "out_of_space"
    return "internal"


def count_pull_error(exc: BaseException) -> None:
    PULL_ERRORS.labels(error_reason(exc)).inc()


def count_eviction(kind: str, nbytes: int) -> None:
    EVICTIONS.labels(kind).inc()
    EVICTED_BYTES.inc(max(0, nbytes))


# -- lazy servers' stats files ------------------------------------------------------

# key -> (metric name without _total, help); counters are exported as *_total.
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
LAZY_TEXT_KEYS = ("image", "digest")
LAZY_NUMBER_KEYS = (*LAZY_COUNTERS, *LAZY_FETCHED, *LAZY_GAUGES, "pid", "updated_at")


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


def read_lazy_stats(lazy_root: Path, *, now: float | None = None) -> list[LazyStats]:
    """The fresh stats files under `<state>/lazy/*/`; unreadable or stale ones skipped."""
    now = time.time() if now is None else now
    found = []
    for path in sorted(lazy_root.glob(f"*/{LAZY_STATS_FILE}")):
        try:
            if now - path.stat().st_mtime > LAZY_STATS_STALE_SECONDS:
                continue
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a server mid-exit or a torn file: next scrape will tell
        if not isinstance(raw, dict):
            continue
        numbers = {
            k: float(v)
            for k, v in raw.items()
            if k in LAZY_NUMBER_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
        }
        digest = raw.get("digest") if isinstance(raw.get("digest"), str) else ""
        found.append(
            LazyStats(
                image=str(raw.get("image") or ""),
                digest=digest or f"sha256:{path.parent.name}",
                numbers=numbers,
            )
        )
    return found


def lazy_metrics(stats: list[LazyStats]) -> Iterator[Metric]:
    labels = ["image", "digest"]
    for key, (name, text) in LAZY_COUNTERS.items():
        family = CounterMetricFamily(name, text, labels=labels)
        for s in stats:
            family.add_metric([s.image, s.digest], s.numbers.get(key, 0.0))
        yield family
    fetched = CounterMetricFamily(
        "csi_oci_lazy_fetched_bytes",
        "Bytes lazy servers fetched from registries, by cause (on_demand: a read waited; "
        "prefetch: fetched ahead)",
        labels=[*labels, "cause"],
    )
    for s in stats:
        for key, cause in LAZY_FETCHED.items():
            fetched.add_metric([s.image, s.digest, cause], s.numbers.get(key, 0.0))
    yield fetched
    for key, (name, text) in LAZY_GAUGES.items():
        gauge = GaugeMetricFamily(name, text, labels=labels)
        for s in stats:
            gauge.add_metric([s.image, s.digest], s.numbers.get(key, 0.0))
        yield gauge
    yield GaugeMetricFamily(
        "csi_oci_lazy_servers", "Lazy FUSE servers reporting stats", value=len(stats)
    )


# -- what is on disk, read at scrape time ----------------------------------------------


class NodeCollector(Collector):
    """Store size, published volumes and lazy stats, read when Prometheus scrapes."""

    def __init__(self, store: Store, volumes: VolumeManager) -> None:
        self._store = store
        self._volumes = volumes

    def collect(self) -> Iterable[Metric]:
        store = self._store
        # A broken state dir must not break the scrape: /healthz reports it.
        with contextlib.suppress(OSError):
            usage = store.usage()
            size = GaugeMetricFamily(
                "csi_oci_store_bytes",
                "Bytes the node store holds, by kind (trees: unpacked files; blobs: raw "
                "files, spooled layers and lazy pieces)",
                labels=["kind"],
            )
            size.add_metric(["trees"], usage.trees)
            size.add_metric(["blobs"], usage.blobs)
            yield size
            yield GaugeMetricFamily(
                "csi_oci_store_images",
                "Image trees in the node store",
                value=len(store.list_images()),
            )
            yield GaugeMetricFamily(
                "csi_oci_store_free_bytes",
                "Free bytes on the state directory's filesystem",
                value=store.free_bytes(),
            )
        if store.max_bytes is not None:
            yield GaugeMetricFamily(
                "csi_oci_store_max_bytes",
                "The cache budget (--cache-max-bytes)",
                value=store.max_bytes,
            )
        published = GaugeMetricFamily(
            "csi_oci_volumes_published",
            "Volumes published on this node, by mode",
            labels=["mode"],
        )
        counts = {"unpack": 0, "lazy": 0}
        with contextlib.suppress(OSError):
            for rec in self._volumes.all_records():
                if rec.state == "published":
                    counts["lazy" if rec.tree.startswith("lazy:") else "unpack"] += 1
        for mode, n in counts.items():
            published.add_metric([mode], n)
        yield published
        yield from lazy_metrics(read_lazy_stats(store.root / "lazy"))


# -- the HTTP endpoint ---------------------------------------------------------------------

# A health check: (what is checked, healthy?) -> listed in the /healthz body.
HealthCheck = Callable[[], tuple[str, bool]]


class _QuietHandler(WSGIRequestHandler):
    """wsgiref prints every request to stderr; kubelet probes every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics endpoint: " + format, *args)


class _ThreadedServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never delays shutdown


class _ThreadedServer6(_ThreadedServer):
    address_family = socket.AF_INET6


def parse_address(address: str) -> tuple[str, int]:
    """`:9808`, `0.0.0.0:9808`, `127.0.0.1:0`, `[::]:9808` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r} is not [host]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class MetricsServer:
    """Serves /metrics (Prometheus text) and /healthz on one port, in daemon threads."""

    def __init__(self, address: str, checks: list[HealthCheck]) -> None:
        host, port = parse_address(address)
        metrics_app = make_wsgi_app(REGISTRY)
        self._checks = checks

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                return self._healthz(start_response)
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        server_class = _ThreadedServer6 if ":" in host else _ThreadedServer
        self._server = make_server(
            host, port, app, server_class=server_class, handler_class=_QuietHandler
        )
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _healthz(self, start_response: Callable[..., Any]) -> list[bytes]:
        lines = []
        healthy = True
        for check in self._checks:
            try:
                what, ok = check()
            except Exception as exc:  # a check that crashes is a failed check, not a 500
                what, ok = f"health check failed: {exc!r}", False
            healthy = healthy and ok
            lines.append(f"{'ok' if ok else 'FAIL'}: {what}\n")
        status = "200 OK" if healthy else "503 Service Unavailable"
        body = "".join(lines).encode()
        start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]


def grpc_socket_check(path: str, serving: threading.Event) -> HealthCheck:
    """Healthy while the server is started and its unix socket accepts connections.

    A connect() proves the socket file is there and listened on without
    making a gRPC call (which would be logged, and could queue behind
    publishes waiting for pulls).
    """

    def check() -> tuple[str, bool]:
        if not serving.is_set():
            return f"gRPC server on {path} is not serving", False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            try:
                sock.connect(path)
            except OSError as exc:
                return f"gRPC socket {path} does not accept connections: {exc}", False
        return f"gRPC server serving on {path}", True

    return check


def state_dir_check(store: Store) -> HealthCheck:
    def check() -> tuple[str, bool]:
        if store.usable():
            return f"state directory {store.root} is writable", True
        return f"state directory {store.root} is not writable", False

    return check


__all__ = [
    "DEFAULT_METRICS_ADDRESS",
    "REGISTRY",
    "MetricsServer",
    "NodeCollector",
    "count_eviction",
    "count_pull_error",
    "error_reason",
    "read_lazy_stats",
    "write_lazy_stats",
]
