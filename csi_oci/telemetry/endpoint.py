"""Prometheus metrics, the /metrics + /healthz endpoint, and lazy servers' stats files.

Metric objects live in one registry of their own (not prometheus_client's
global one), so importing this module twice in a test process or from the
CLI never trips over duplicate registrations, and the endpoint shows only
what csi-oci defines plus the process metrics.

Values that already exist on disk (store size, published volumes) are not
mirrored into gauges that could drift: `NodeCollector` reads them. So do
the lazy FUSE servers' numbers: every `python -m csi_oci.lazy.fs` process is
a separate process (it outlives a restart of the gRPC server), so it cannot
touch this process's counters. Instead it writes its totals every few
seconds with `write_lazy_stats()` to `<state>/lazy/<hex>/stats.json`.

Reading all that walks the store (every image record, blob and lazy piece),
the volume records and every stats file, so it is never done per scrape:
`NodeCollector` keeps a snapshot, computed once at start and then every
`SNAPSHOT_SECONDS` by one thread, and scrapes only serve it (N scrapers at
once cost nothing more than one). A failed refresh keeps the last good
snapshot; `csi_oci_metrics_snapshot_timestamp_seconds` tells its age.

The endpoint is for whoever can reach the pod network, and on a shared
cluster the images a node serves are its tenants' business: no metric names
an image, repository or digest unless `--metrics-image-labels` is given.
By default the lazy metrics are sums over all lazy servers; with the flag
they carry `image` and `digest` labels, one series per image. Either way the
counters never go down while the driver runs: each server's increase since
the last snapshot is added (all of a new or restarted server's totals), so
a server that stops or restarts is no counter reset for Prometheus.

Lazy stats file (`stats.json`, one JSON object; counters are totals since
that FUSE server started, so a restarted server starts again from 0):

| key | kind | meaning |
|---|---|---|
| `image` | string | the image reference the server serves (a label with --metrics-image-labels) |
| `digest` | string | its manifest digest (likewise; default: from the directory name) |
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
that is gone and is ignored."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from csi_oci.telemetry.instruments import (
    ERROR_REASONS,
    EVICTION_KINDS,
    EVICTIONS,
    OUTCOMES,
    PULL_DURATION,
    PULL_ERRORS,
    PULLS,
    REGISTRY,
)
from csi_oci.telemetry.lazystats import (
    LAZY_COUNTER_KEYS,
    LAZY_COUNTERS,
    LAZY_FETCHED,
    LAZY_GAUGES,
    LAZY_STATS_STALE_SECONDS,
    LazyStats,
    read_lazy_stats,
)


class _Usage(Protocol):
    @property
    def trees(self) -> int: ...
    @property
    def blobs(self) -> int: ...


class _Record(Protocol):
    @property
    def state(self) -> str: ...
    @property
    def tree(self) -> str: ...


class SpaceView(Protocol):
    """What the endpoint reads of the cache's room (csi_oci.storage.space.CacheSpace)."""

    @property
    def max_bytes(self) -> int | None: ...
    def usage(self) -> _Usage: ...
    def free_bytes(self) -> int: ...


class StoreView(Protocol):
    """What the endpoint reads of the node store (csi_oci.storage.store.Store).

    Protocols, not imports: telemetry sits below the data path and depends on
    nothing in it, so everything above may count into it.
    """

    @property
    def root(self) -> Path: ...
    @property
    def space(self) -> SpaceView: ...
    def list_images(self) -> Sequence[object]: ...
    def usable(self) -> bool: ...


class VolumesView(Protocol):
    """What the endpoint reads of the volume records (csi_oci.publish.records)."""

    def all(self) -> Iterable[_Record]: ...


log = logging.getLogger(__name__)


DEFAULT_METRICS_ADDRESS = ":9808"


ProcessCollector(registry=REGISTRY)


PlatformCollector(registry=REGISTRY)


# Series exist from the first scrape with 0, so rate() and alerts see the
# first event instead of a series appearing out of nowhere.
for _outcome in OUTCOMES:
    PULLS.labels(_outcome)
    PULL_DURATION.labels(_outcome)


for _reason in ERROR_REASONS:
    PULL_ERRORS.labels(_reason)


for _kind in EVICTION_KINDS:
    EVICTIONS.labels(_kind)


# key -> (metric name without _total, help); counters are exported as *_total.
# Label values of one lazy series: () by default, (image, digest) with image labels.
LazyLabels = tuple[str, ...]


class LazyTotals:
    """The lazy servers' numbers per series, counters that never go down.

    A plain sum of the servers' totals would drop whenever one of them stops
    (its file goes) or restarts (from 0), and Prometheus takes any drop of a
    counter for a reset to 0: rate() would count the whole sum again. So each
    server's increase since the last look is added to its series' counters:
    all of its totals when it is new (or restarted: a pid not seen before,
    or numbers that went down). Gauges are plain sums of the live servers.
    Not thread-safe: `NodeCollector` calls it under its refresh lock.
    """

    def __init__(self, *, image_labels: bool) -> None:
        self.image_labels = image_labels
        # (directory, pid) -> (its counters at the last look, wall time of that look)
        self._last: dict[tuple[str, float], tuple[dict[str, float], float]] = {}
        self._totals: dict[LazyLabels, dict[str, float]] = {}

    def _labels(self, s: LazyStats) -> LazyLabels:
        return (s.image, s.digest) if self.image_labels else ()

    def update(
        self, stats: list[LazyStats], *, now: float | None = None
    ) -> dict[LazyLabels, dict[str, float]]:
        """Series labels -> counter totals and gauge sums, after this look at `stats`."""
        now = time.time() if now is None else now
        live: dict[LazyLabels, dict[str, float]] = {}
        if not self.image_labels:
            live[()] = dict.fromkeys(LAZY_GAUGES, 0.0)  # the sums exist with no server too
        for s in stats:
            server = (s.server, s.numbers.get("pid", 0.0))
            counts = {k: s.numbers.get(k, 0.0) for k in LAZY_COUNTER_KEYS}
            before, _seen = self._last.get(server, (dict.fromkeys(LAZY_COUNTER_KEYS, 0.0), 0.0))
            if any(counts[k] < before[k] for k in LAZY_COUNTER_KEYS):
                before = dict.fromkeys(LAZY_COUNTER_KEYS, 0.0)  # restarted in between
            self._last[server] = (counts, now)
            labels = self._labels(s)
            totals = self._totals.setdefault(labels, dict.fromkeys(LAZY_COUNTER_KEYS, 0.0))
            for k in LAZY_COUNTER_KEYS:
                totals[k] += counts[k] - before[k]
            gauges = live.setdefault(labels, dict.fromkeys(LAZY_GAUGES, 0.0))
            for k in LAZY_GAUGES:
                gauges[k] += s.numbers.get(k, 0.0)
        # A server unseen for as long as a file stays fresh is gone; so is a
        # per-image series with no live server (or every image ever served stays).
        self._last = {k: v for k, v in self._last.items() if now - v[1] <= LAZY_STATS_STALE_SECONDS}
        self._totals = {k: v for k, v in self._totals.items() if k in live}
        return {
            labels: {**self._totals.get(labels, dict.fromkeys(LAZY_COUNTER_KEYS, 0.0)), **g}
            for labels, g in live.items()
        }


def lazy_metrics(
    series: dict[LazyLabels, dict[str, float]], servers: int, *, image_labels: bool
) -> Iterator[Metric]:
    """The lazy families from `LazyTotals.update()`: per image only with `image_labels`."""
    labels = ["image", "digest"] if image_labels else []
    for key, (name, text) in LAZY_COUNTERS.items():
        family = CounterMetricFamily(name, text, labels=labels)
        for values, numbers in series.items():
            family.add_metric(list(values), numbers[key])
        yield family
    fetched = CounterMetricFamily(
        "csi_oci_lazy_fetched_bytes",
        "Bytes lazy servers fetched from registries, by cause (on_demand: a read waited; "
        "prefetch: fetched ahead)",
        labels=[*labels, "cause"],
    )
    for values, numbers in series.items():
        for key, cause in LAZY_FETCHED.items():
            fetched.add_metric([*values, cause], numbers[key])
    yield fetched
    for key, (name, text) in LAZY_GAUGES.items():
        gauge = GaugeMetricFamily(name, text, labels=labels)
        for values, numbers in series.items():
            gauge.add_metric(list(values), numbers[key])
        yield gauge
    yield GaugeMetricFamily(
        "csi_oci_lazy_servers", "Lazy FUSE servers reporting stats", value=servers
    )


SNAPSHOT_SECONDS = 5.0


@dataclass(frozen=True)
class _NodeNumbers:
    """What one look at the state directory found."""

    trees_bytes: int
    blobs_bytes: int
    images: int
    free_bytes: int
    published: dict[str, int]  # mode -> volumes
    lazy: list[LazyStats]


class NodeCollector(Collector):
    """Store size, published volumes and lazy stats, from a snapshot of the state dir.

    `start()` takes the first snapshot (so the first scrape has the real
    numbers) and starts one thread that takes another every
    `refresh_seconds`; `collect()` serves the last one and reads nothing.
    Not started (tests, tools), `collect()` takes one on demand when the last
    is older than `refresh_seconds`. Either way one snapshot is taken at a
    time, under a lock: concurrent scrapes share it. A failed snapshot keeps
    the last good one and is logged once, until one succeeds again.
    """

    def __init__(
        self,
        store: StoreView,
        volumes: VolumesView,
        *,
        image_labels: bool = False,
        refresh_seconds: float = SNAPSHOT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._volumes = volumes
        self.image_labels = image_labels
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()  # one snapshot at a time; guards _lazy
        self._lazy = LazyTotals(image_labels=image_labels)
        self._families: tuple[Metric, ...] | None = None  # the last good snapshot
        self._attempted: float | None = None  # clock() of the last try, good or not
        self._failing = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the snapshot ---------------------------------------------------------------------

    def refresh(self) -> bool:
        """Take a snapshot now (after any running one); False if it failed."""
        with self._lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        self._attempted = self._clock()
        try:
            numbers = self._read()
        except Exception as exc:  # a broken state dir must not break scrapes: /healthz tells
            if not self._failing:
                log.warning(
                    "metrics: cannot read the state directory (%s); serving the last numbers "
                    "until it works again",
                    exc,
                )
            self._failing = True
            return False
        if self._failing:
            log.info("metrics: reading the state directory works again")
            self._failing = False
        self._families = tuple(self._render(numbers, self._lazy.update(numbers.lazy)))
        return True

    def _read(self) -> _NodeNumbers:
        store = self._store
        usage = store.space.usage()
        published = {"unpack": 0, "lazy": 0}
        for rec in self._volumes.all():
            if rec.state == "published":
                published["lazy" if rec.tree.startswith("lazy:") else "unpack"] += 1
        return _NodeNumbers(
            trees_bytes=usage.trees,
            blobs_bytes=usage.blobs,
            images=len(store.list_images()),
            free_bytes=store.space.free_bytes(),
            published=published,
            lazy=read_lazy_stats(store.root / "lazy"),
        )

    def _render(
        self, numbers: _NodeNumbers, lazy: dict[LazyLabels, dict[str, float]]
    ) -> Iterator[Metric]:
        size = GaugeMetricFamily(
            "csi_oci_store_bytes",
            "Bytes the node store holds, by kind (trees: unpacked files; blobs: raw "
            "files, spooled layers and lazy pieces)",
            labels=["kind"],
        )
        size.add_metric(["trees"], numbers.trees_bytes)
        size.add_metric(["blobs"], numbers.blobs_bytes)
        yield size
        yield GaugeMetricFamily(
            "csi_oci_store_images", "Image trees in the node store", value=numbers.images
        )
        yield GaugeMetricFamily(
            "csi_oci_store_free_bytes",
            "Free bytes on the state directory's filesystem",
            value=numbers.free_bytes,
        )
        published = GaugeMetricFamily(
            "csi_oci_volumes_published",
            "Volumes published on this node, by mode",
            labels=["mode"],
        )
        for mode, n in numbers.published.items():
            published.add_metric([mode], n)
        yield published
        yield from lazy_metrics(lazy, len(numbers.lazy), image_labels=self.image_labels)
        yield GaugeMetricFamily(
            "csi_oci_metrics_snapshot_timestamp_seconds",
            "Unix time the store, volume and lazy numbers were read (every few seconds; "
            "older: reading the state directory fails)",
            value=time.time(),
        )

    # -- the refresher thread --------------------------------------------------------------

    def start(self) -> None:
        """The first snapshot now, then one every `refresh_seconds` until `stop()`."""
        if self._thread is not None:
            return
        self.refresh()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="metrics-snapshot", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self.refresh_seconds):
            self.refresh()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- Collector -----------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        if self._thread is None:  # no refresher: on demand, at most once a period
            with self._lock:
                last = self._attempted
                if last is None or self._clock() - last >= self.refresh_seconds:
                    self._refresh_locked()
        # Families are only read by the exposition: scrapes can share them.
        yield from self._families or ()
        if self._store.space.max_bytes is not None:
            yield GaugeMetricFamily(
                "csi_oci_store_max_bytes",
                "The cache budget (--cache-max-bytes)",
                value=self._store.space.max_bytes,
            )

    def describe(self) -> Iterable[Metric]:
        """The families' names, for the registry's duplicate check (reads nothing)."""
        empty = _NodeNumbers(0, 0, 0, 0, {}, [])
        yield from self._render(empty, {})
        yield GaugeMetricFamily("csi_oci_store_max_bytes", "The cache budget", value=0)


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
    """Serves /metrics (Prometheus text) and /healthz on one port, in daemon threads.

    `node`, if given, is registered and its snapshot thread started by
    `start()` (first snapshot before the port answers), and both undone by
    `stop()`.
    """

    def __init__(
        self, address: str, checks: list[HealthCheck], node: NodeCollector | None = None
    ) -> None:
        host, port = parse_address(address)
        metrics_app = make_wsgi_app(REGISTRY)
        self._checks = checks
        self._node = node

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                return self._healthz(start_response)
            body: Iterable[bytes] = metrics_app(environ, start_response)
            return body

        server_class = _ThreadedServer6 if ":" in host else _ThreadedServer
        self._server = make_server(
            host, port, app, server_class=server_class, handler_class=_QuietHandler
        )
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> None:
        if self._node is not None:
            REGISTRY.register(self._node)  # reads nothing (describe)
            self._node.start()
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._node is not None:
            self._node.stop()
            with contextlib.suppress(KeyError):  # never registered: start() failed
                REGISTRY.unregister(self._node)

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


def state_dir_check(store: StoreView) -> HealthCheck:
    def check() -> tuple[str, bool]:
        if store.usable():
            return f"state directory {store.root} is writable", True
        return f"state directory {store.root} is not writable", False

    return check
