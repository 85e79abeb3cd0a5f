"""/metrics, /healthz and JSON logs of a real `csi-oci serve`, publishing real
images from a real loopback registry (needs root for the bind mounts), and the
node collector's snapshot in-process (no root)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from csi_oci.csi.v1 import csi_pb2
from csi_oci.publish.records import VolumeRecord
from csi_oci.storage.store import Store
from csi_oci.telemetry import endpoint, instruments, lazystats
from csi_oci.telemetry.endpoint import LazyTotals, MetricsServer, NodeCollector
from csi_oci.telemetry.lazystats import LAZY_STATS_STALE_SECONDS, LazyStats, write_lazy_stats
from tests.support.driver import Driver, wait_for
from tests.support.images import File, Image, Layer, push_image
from tests.support.lazyfixtures import estargz_blob, make_layer_tar, push_lazy_image

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE mounts need root and /dev/fuse",
)

SECRET_PASSWORD = "hunter2-do-not-log"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """(sample name, sorted labels) -> value."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape_text(port: int) -> str:
    resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.text


def scrape(port: int) -> Samples:
    """(sample name, sorted labels) -> value, from the real endpoint."""
    return parse(scrape_text(port))


def scrape_until(port: int, ready, timeout: float = 30.0) -> Samples:
    """The first scrape for which `ready(samples)` holds (or the last one): store,
    volume and lazy numbers come from a snapshot taken every few seconds."""
    found: list[Samples] = []

    def check() -> bool:
        found[:] = [scrape(port)]
        return bool(ready(found[0]))

    wait_for(check, timeout=timeout, interval=0.2)
    return found[0]


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def lazy_series(samples: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {k: v for k, v in samples.items() if k[0].startswith("csi_oci_lazy_")}


def target_in(tmp_path: Path, name: str) -> Path:
    parent = tmp_path / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


# The module's drivers (tests/conftest.py make_module_driver): metrics on a free
# loopback port (.metrics_port) and JSON logs.


@pytest.fixture(scope="module")
def metered(make_module_driver):
    """The default: lazy metrics are sums, with no image labels."""
    return make_module_driver("--log-format", "json", metrics=True)


@pytest.fixture(scope="module")
def labelled(make_module_driver):
    """With --metrics-image-labels."""
    return make_module_driver("--log-format", "json", "--metrics-image-labels", metrics=True)


LAZY_FILES = {
    "models/config.json": b'{"hidden_size": 64}',
    "models/model.safetensors": os.urandom(3_000_000),
}


@pytest.fixture(scope="module")
def lazy_image(registry, tmp_path_factory):
    """An eStargz image in a tenant's repository: (reference, manifest digest)."""
    tmp = tmp_path_factory.mktemp("lazy-image")
    blob = estargz_blob(
        make_layer_tar(LAZY_FILES, dirs=("models",)), tmp / "blob", chunk_size=1 << 20
    )
    pushed = push_lazy_image(registry, [blob], "tenant-lazy/private-model:v7", tmp)
    return pushed.reference, pushed.digest


@needs_root
@pytest.mark.slow
def test_a_real_pull_moves_the_counters_by_the_right_amounts(metered, registry, tmp_path):
    layers = [
        Layer([File("weights-0", os.urandom(300_000))], compression="gzip"),
        Layer([File("weights-1", os.urandom(200_000))], compression="none"),
    ]
    image = Image(layers)
    push_image(registry, image, "metrics/model:v1", tmp_path)
    ref = f"{registry.host}/metrics/model:v1"
    port = metered.metrics_port
    before = scrape(port)

    def unpack_volumes(n: int):
        return lambda s: value(s, "csi_oci_volumes_published", mode="unpack") == n

    target = target_in(tmp_path, "m1")
    metered.publish(target, {"image": ref}, volume_id="vol-m1")
    after = scrape_until(port, unpack_volumes(1))

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("csi_oci_pulls_total", outcome="succeeded") == 1
    assert delta("csi_oci_pulls_total", outcome="failed") == 0
    # Layer blobs and the config blob, each once: nothing resent on loopback.
    blob_bytes = sum(layer.size for layer in layers) + len(image.config_bytes)
    assert delta("csi_oci_pull_bytes_total") == blob_bytes
    assert delta("csi_oci_pull_duration_seconds_count", outcome="succeeded") == 1
    assert value(after, "csi_oci_pulls_in_progress") == 0
    assert value(after, "csi_oci_volumes_published", mode="unpack") == 1
    assert value(after, "csi_oci_volumes_published", mode="lazy") == 0
    assert value(after, "csi_oci_store_images") == 1
    assert value(after, "csi_oci_store_bytes", kind="trees") >= 500_000
    assert value(after, "csi_oci_store_free_bytes") > 0
    assert value(after, "csi_oci_metrics_snapshot_timestamp_seconds") > time.time() - 60
    assert delta("csi_oci_rpcs_total", method="NodePublishVolume", code="OK") == 1

    # A second volume of the same image pulls nothing.
    target2 = target_in(tmp_path, "m2")
    metered.publish(target2, {"image": ref}, volume_id="vol-m2")
    again = scrape_until(port, unpack_volumes(2))
    assert value(again, "csi_oci_pulls_total", outcome="succeeded") == value(
        after, "csi_oci_pulls_total", outcome="succeeded"
    )
    assert value(again, "csi_oci_pull_bytes_total") == value(after, "csi_oci_pull_bytes_total")
    assert value(again, "csi_oci_volumes_published", mode="unpack") == 2

    metered.unpublish(target, volume_id="vol-m1")
    metered.unpublish(target2, volume_id="vol-m2")
    gone = scrape_until(port, unpack_volumes(0))
    assert value(gone, "csi_oci_volumes_published", mode="unpack") == 0


@needs_root
def test_failed_pulls_are_counted_by_reason(metered, registry, tmp_path):
    port = metered.metrics_port
    image = Image([Layer([File("f", b"x")])])
    push_image(registry, image, "metrics/reasons:v1", tmp_path)
    before = scrape(port)
    target = target_in(tmp_path, "missing")
    with pytest.raises(Exception, match="not found"):
        metered.publish(target, {"image": f"{registry.host}/metrics/reasons:no-such-tag"})
    after = scrape(port)
    reason = ("csi_oci_pull_errors_total", (("reason", "not_found"),))
    assert after[reason] - before.get(reason, 0.0) == 1
    rpc = ("csi_oci_rpcs_total", (("code", "NOT_FOUND"), ("method", "NodePublishVolume")))
    assert after[rpc] - before.get(rpc, 0.0) == 1


@needs_root
def test_healthz_follows_the_state_dir(metered):
    url = f"http://127.0.0.1:{metered.metrics_port}/healthz"
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200, resp.text
    assert "gRPC server serving" in resp.text and "writable" in resp.text
    state = str(metered.state_dir)
    # A read-only bind over the state dir: what a disk remounted read-only looks like.
    subprocess.run(["mount", "--bind", state, state], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", state], check=True)
        resp = requests.get(url, timeout=10)
        assert resp.status_code == 503, resp.text
        assert f"FAIL: state directory {state} is not writable" in resp.text
    finally:
        subprocess.run(["umount", state], check=True)
    assert requests.get(url, timeout=10).status_code == 200


@needs_fuse
@pytest.mark.slow
def test_by_default_no_metric_names_a_tenants_image(metered, registry, lazy_image, tmp_path):
    """One unpacked and one lazy volume: /metrics counts them, names neither."""
    lazy_ref, lazy_digest = lazy_image
    unpacked = Image([Layer([File("weights", os.urandom(50_000))])])
    unpacked_digest = push_image(registry, unpacked, "tenant-unpack/secret-model:v3", tmp_path)
    unpacked_ref = f"{registry.host}/tenant-unpack/secret-model:v3"
    port = metered.metrics_port
    before = scrape(port)
    lazy_target, unpack_target = target_in(tmp_path, "lazy"), target_in(tmp_path, "unpack")
    metered.publish(unpack_target, {"image": unpacked_ref}, volume_id="vol-unpack")
    metered.publish(
        lazy_target, {"image": lazy_ref, "mode": "lazy", "prefetch": "none"}, volume_id="vol-lazy"
    )
    try:
        assert (lazy_target / "models" / "config.json").read_bytes() == b'{"hidden_size": 64}'
        read_before = value(before, "csi_oci_lazy_read_bytes_total")
        after = scrape_until(
            port,
            lambda s: (
                value(s, "csi_oci_volumes_published", mode="lazy") == 1
                and value(s, "csi_oci_volumes_published", mode="unpack") == 1
                and value(s, "csi_oci_lazy_read_bytes_total") > read_before
            ),
        )
        # The lazy server is exported, as sums over all servers.
        assert value(after, "csi_oci_volumes_published", mode="lazy") == 1
        assert value(after, "csi_oci_volumes_published", mode="unpack") == 1
        assert value(after, "csi_oci_lazy_servers") >= 1
        assert value(after, "csi_oci_lazy_read_bytes_total") > read_before
        assert value(after, "csi_oci_lazy_fetched_bytes_total", cause="on_demand") > 0
        for (name, labels), _v in lazy_series(after).items():
            assert {k for k, _ in labels} <= {"cause"}, (name, labels)
        text = scrape_text(port)
        needles = [
            lazy_ref,
            unpacked_ref,
            "tenant-lazy",
            "tenant-unpack",
            "private-model",
            "secret-model",
            lazy_digest.partition(":")[2],
            unpacked_digest.partition(":")[2],
        ]
        for needle in needles:
            assert needle not in text, f"/metrics names {needle!r}"
        for line in text.splitlines():
            assert "image=" not in line and "digest=" not in line, line
    finally:
        metered.unpublish(lazy_target, volume_id="vol-lazy")
        metered.unpublish(unpack_target, volume_id="vol-unpack")


@needs_fuse
@pytest.mark.slow
def test_image_labels_flag_labels_the_lazy_series(labelled, lazy_image, tmp_path):
    lazy_ref, lazy_digest = lazy_image
    port = labelled.metrics_port
    target = target_in(tmp_path, "labelled")
    labelled.publish(
        target, {"image": lazy_ref, "mode": "lazy", "prefetch": "none"}, volume_id="vol-labelled"
    )
    try:
        assert (target / "models" / "config.json").read_bytes() == b'{"hidden_size": 64}'
        labels = {"image": lazy_ref, "digest": lazy_digest}
        after = scrape_until(
            port, lambda s: value(s, "csi_oci_lazy_read_bytes_total", **labels) > 0
        )
        read = value(after, "csi_oci_lazy_read_bytes_total", **labels)
        assert read >= len(LAZY_FILES["models/config.json"])
        assert value(after, "csi_oci_lazy_fetched_bytes_total", cause="on_demand", **labels) > 0
        assert ("csi_oci_lazy_prefetch_total_bytes", tuple(sorted(labels.items()))) in after
        assert f'image="{lazy_ref}"' in scrape_text(port)
        # No unlabelled sums next to the per-image series.
        assert value(after, "csi_oci_lazy_read_bytes_total") == 0
        assert ("csi_oci_lazy_read_bytes_total", ()) not in after
    finally:
        labelled.unpublish(target, volume_id="vol-labelled")


SYNTHETIC_STATS = {
    "image": "registry.example/llama:3",
    "read_bytes": 1000,
    "on_demand_fetched_bytes": 300,
    "prefetch_fetched_bytes": 700,
    "cache_hits": 5,
    "cache_misses": 2,
    "fetch_errors": 0,
    "prefetch_done_bytes": 700,
    "prefetch_total_bytes": 2000,
}


def write_synthetic_stats(state_dir: Path) -> tuple[Path, Path]:
    """A fresh stats file and a stale one (written first: a snapshot that sees
    the fresh one has seen both)."""
    stale_dir = state_dir / "lazy" / ("cd" * 32)
    stale_dir.mkdir(parents=True, exist_ok=True)
    write_lazy_stats(stale_dir / "stats.json", {"image": "gone/server:1", "read_bytes": 9})
    old = time.time() - LAZY_STATS_STALE_SECONDS - 60
    os.utime(stale_dir / "stats.json", (old, old))
    fresh_dir = state_dir / "lazy" / ("ab" * 32)
    fresh_dir.mkdir(parents=True, exist_ok=True)
    write_lazy_stats(fresh_dir / "stats.json", SYNTHETIC_STATS)
    return fresh_dir, stale_dir


def remove_stats(*directories: Path) -> None:
    for directory in directories:
        (directory / "stats.json").unlink()
        directory.rmdir()


@needs_root
@pytest.mark.slow
def test_lazy_stats_files_are_exported_per_image_with_the_flag(labelled):
    port = labelled.metrics_port
    servers = value(scrape(port), "csi_oci_lazy_servers")
    fresh_dir, stale_dir = write_synthetic_stats(labelled.state_dir)
    try:
        samples = scrape_until(port, lambda s: value(s, "csi_oci_lazy_servers") == servers + 1)
        labels = {"image": "registry.example/llama:3", "digest": f"sha256:{'ab' * 32}"}
        assert value(samples, "csi_oci_lazy_read_bytes_total", **labels) == 1000
        fetched = "csi_oci_lazy_fetched_bytes_total"
        assert value(samples, fetched, cause="on_demand", **labels) == 300
        assert value(samples, fetched, cause="prefetch", **labels) == 700
        assert value(samples, "csi_oci_lazy_cache_hits_total", **labels) == 5
        assert value(samples, "csi_oci_lazy_cache_misses_total", **labels) == 2
        assert value(samples, "csi_oci_lazy_prefetch_done_bytes", **labels) == 700
        assert value(samples, "csi_oci_lazy_prefetch_total_bytes", **labels) == 2000
        assert value(samples, "csi_oci_lazy_servers") == servers + 1, "the stale file is ignored"
        assert not any(dict(lbl).get("image") == "gone/server:1" for _n, lbl in samples)
    finally:
        remove_stats(fresh_dir, stale_dir)
    with pytest.raises(ValueError, match="unknown lazy stats key"):
        write_lazy_stats(fresh_dir.parent / "typo.json", {"read_byte": 1})


@needs_root
@pytest.mark.slow
def test_lazy_stats_files_are_summed_without_labels_by_default(metered):
    port = metered.metrics_port
    before = scrape(port)
    servers = value(before, "csi_oci_lazy_servers")
    fresh_dir, stale_dir = write_synthetic_stats(metered.state_dir)
    try:
        after = scrape_until(port, lambda s: value(s, "csi_oci_lazy_servers") == servers + 1)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("csi_oci_lazy_read_bytes_total") == 1000
        assert delta("csi_oci_lazy_fetched_bytes_total", cause="on_demand") == 300
        assert delta("csi_oci_lazy_fetched_bytes_total", cause="prefetch") == 700
        assert delta("csi_oci_lazy_cache_hits_total") == 5
        assert delta("csi_oci_lazy_cache_misses_total") == 2
        assert delta("csi_oci_lazy_prefetch_total_bytes") == 2000
        assert value(after, "csi_oci_lazy_servers") == servers + 1, "the stale file is ignored"
        assert "registry.example/llama" not in scrape_text(port)
    finally:
        remove_stats(fresh_dir, stale_dir)
    # The server is gone: the sums' counters do not go down (no false reset).
    gone = scrape_until(port, lambda s: value(s, "csi_oci_lazy_servers") == servers)
    assert value(gone, "csi_oci_lazy_servers") == servers
    assert value(gone, "csi_oci_lazy_read_bytes_total") == value(
        after, "csi_oci_lazy_read_bytes_total"
    )
    assert value(gone, "csi_oci_lazy_prefetch_total_bytes") == value(
        before, "csi_oci_lazy_prefetch_total_bytes"
    )


@needs_root
def test_json_log_lines_parse_and_keep_secrets_out(metered, registry, tmp_path):
    image = Image([Layer([File("f", b"json logs")])])
    push_image(registry, image, "metrics/logs:v1", tmp_path)
    target = target_in(tmp_path, "logs")
    # The registry is anonymous: the secret is unused, but it reaches the driver.
    secrets = {"username": "bob", "password": SECRET_PASSWORD}
    metered.publish(
        target, {"image": f"{registry.host}/metrics/logs:v1"}, volume_id="vol-logs", secrets=secrets
    )
    metered.unpublish(target, volume_id="vol-logs")
    text = metered.log_text()
    assert SECRET_PASSWORD not in text
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert entries, "the driver logged nothing"
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert entry["time"].endswith("Z")
    publishes = [
        e for e in entries if e.get("rpc") == "NodePublishVolume" and "vol-logs" in e["request"]
    ]
    assert publishes and publishes[-1]["code"] == "OK"
    assert "***" in publishes[-1]["request"], "the secret shows as redacted"
    assert isinstance(publishes[-1]["duration_seconds"], float)
    assert any(e["logger"] == "csi_oci" and "metrics on" in e["message"] for e in entries)


@needs_root
def test_a_busy_metrics_port_does_not_stop_the_driver(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d = Driver(tmp_path / "drv", metrics_address=f"127.0.0.1:{port}")
        try:
            assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value
            assert "metrics and /healthz are disabled" in d.log_text()
        finally:
            d.stop()


# -- the node collector's snapshot, in-process ----------------------------------------------


@dataclass
class Walks:
    """Calls of everything that reads the state directory."""

    usage: int = 0
    list_images: int = 0
    free_bytes: int = 0
    all_records: int = 0
    lazy_stats: int = 0


class FakeVolumes:
    """The one thing NodeCollector asks the volume records for, counted."""

    def __init__(self, walks: Walks) -> None:
        self.walks = walks
        self.records: list[VolumeRecord] = []

    def publish(self, volume_id: str, tree: str) -> None:
        digest = "sha256:" + "0" * 64
        self.records.append(
            VolumeRecord(volume_id, f"/pods/{volume_id}", {}, digest, "published", 0.0, tree)
        )

    def all(self) -> list[VolumeRecord]:
        self.walks.all_records += 1
        return list(self.records)


def snapshots(walks: Walks) -> int:
    """How many snapshots read the state directory: each reads everything once
    (Store.usage() lists the images itself, so those may be read twice)."""
    n = walks.usage
    assert walks.free_bytes == walks.all_records == walks.lazy_stats == n, walks
    assert n <= walks.list_images <= 2 * n, walks
    return n


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A real Store in tmp_path, its reads counted, and counted fake volumes."""
    store = Store(tmp_path / "state")
    store.ensure_layout()
    walks = Walks()
    for owner, name in (
        (store.space, "usage"),
        (store, "list_images"),
        (store.space, "free_bytes"),
    ):
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name):
            setattr(walks, _name, getattr(walks, _name) + 1)
            return _original(*args)

        monkeypatch.setattr(owner, name, counted)
    original_read = lazystats.read_lazy_stats

    def read_lazy_stats(*args, **kwargs):
        walks.lazy_stats += 1
        return original_read(*args, **kwargs)

    monkeypatch.setattr(endpoint, "read_lazy_stats", read_lazy_stats)
    return store, FakeVolumes(walks), walks


def collect_samples(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def concurrently(n: int, fn) -> list:
    """`fn()` from n threads released at once; their results."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_concurrent_scrapes_share_one_snapshot(node):
    """50 scrapes at once, not started (on demand): one walk of the store."""
    store, volumes, walks = node
    volumes.publish("v1", "sha256:" + "1" * 64)
    volumes.publish("v2", "lazy:sha256:" + "2" * 64)
    collector = NodeCollector(store, volumes, refresh_seconds=3600)
    registry = CollectorRegistry()
    registry.register(collector)
    assert walks == Walks(), "registering reads nothing (describe)"
    results = concurrently(50, lambda: collect_samples(registry))
    assert snapshots(walks) == 1
    for samples in results:  # and every scrape got the real numbers
        assert value(samples, "csi_oci_volumes_published", mode="unpack") == 1
        assert value(samples, "csi_oci_volumes_published", mode="lazy") == 1
        assert value(samples, "csi_oci_store_free_bytes") > 0
        assert value(samples, "csi_oci_lazy_servers") == 0


@pytest.mark.slow
def test_the_metrics_server_serves_the_snapshot_and_stops_its_thread(node):
    """Through the real HTTP endpoint: the first scrape is right, 50 at once walk
    nothing more, and stopping the server stops the snapshot thread."""
    store, volumes, walks = node
    volumes.publish("v1", "sha256:" + "1" * 64)
    collector = NodeCollector(store, volumes, refresh_seconds=3600)
    server = MetricsServer("127.0.0.1:0", [], collector)
    server.start()
    try:
        assert collector.running
        assert snapshots(walks) == 1, "the first snapshot, at start"
        results = concurrently(50, lambda: scrape(server.port))
        for samples in results:
            assert value(samples, "csi_oci_volumes_published", mode="unpack") == 1
        assert snapshots(walks) == 1
    finally:
        server.stop()
    assert not collector.running
    assert collector not in instruments.REGISTRY._collector_to_names, "unregistered at stop"


def test_the_snapshot_is_refreshed_after_its_period(node):
    """On demand, with a fake clock: a change shows up once the period has passed."""
    store, volumes, walks = node
    now = [1000.0]
    collector = NodeCollector(store, volumes, refresh_seconds=5, clock=lambda: now[0])
    registry = CollectorRegistry()
    registry.register(collector)
    first = collect_samples(registry)
    assert value(first, "csi_oci_lazy_servers") == 0
    assert value(first, "csi_oci_volumes_published", mode="unpack") == 0

    lazy_dir = store.root / "lazy" / ("ab" * 32)
    lazy_dir.mkdir(parents=True)
    write_lazy_stats(lazy_dir / "stats.json", {"image": "tenant/model:1", "read_bytes": 42})
    volumes.publish("v1", "sha256:" + "1" * 64)
    now[0] += 4.9
    within = collect_samples(registry)
    assert value(within, "csi_oci_lazy_servers") == 0, "served from the snapshot"
    assert value(within, "csi_oci_volumes_published", mode="unpack") == 0
    assert snapshots(walks) == 1

    now[0] += 0.1
    later = collect_samples(registry)
    assert snapshots(walks) == 2
    assert value(later, "csi_oci_lazy_servers") == 1
    assert value(later, "csi_oci_lazy_read_bytes_total") == 42
    assert value(later, "csi_oci_volumes_published", mode="unpack") == 1
    assert "tenant/model" not in generate_latest(registry).decode()


def test_the_snapshot_thread_refreshes_with_a_short_period(node):
    store, volumes, walks = node
    collector = NodeCollector(store, volumes, refresh_seconds=0.05)
    registry = CollectorRegistry()
    registry.register(collector)
    collector.start()
    try:
        assert value(collect_samples(registry), "csi_oci_volumes_published", mode="lazy") == 0
        volumes.publish("v1", "lazy:sha256:" + "1" * 64)
        assert wait_for(
            lambda: value(collect_samples(registry), "csi_oci_volumes_published", mode="lazy") == 1,
            timeout=20,
        ), "the change never showed up"
        assert walks.usage >= 2
    finally:
        collector.stop()
    assert not collector.running
    stopped_at = walks.usage
    collect_samples(registry)  # stopped: on demand again, at most once a period
    assert walks.usage <= stopped_at + 1


def test_a_failed_refresh_keeps_the_last_snapshot_and_logs_once(node, caplog, monkeypatch):
    store, volumes, walks = node
    now = [0.0]
    collector = NodeCollector(store, volumes, refresh_seconds=5, clock=lambda: now[0])
    registry = CollectorRegistry()
    registry.register(collector)
    volumes.publish("v1", "sha256:" + "1" * 64)
    good = collect_samples(registry)
    assert value(good, "csi_oci_volumes_published", mode="unpack") == 1

    working_usage = store.space.usage

    def broken() -> None:
        walks.usage += 1
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store.space, "usage", broken)
    volumes.publish("v2", "sha256:" + "2" * 64)
    with caplog.at_level(logging.INFO, logger="csi_oci.telemetry.endpoint"):
        for _ in range(3):
            now[0] += 5
            samples = collect_samples(registry)
            assert value(samples, "csi_oci_volumes_published", mode="unpack") == 1
            assert value(samples, "csi_oci_metrics_snapshot_timestamp_seconds") == value(
                good, "csi_oci_metrics_snapshot_timestamp_seconds"
            )
        assert walks.usage == 4, "one try per period"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "Input/output error" in warnings[0].getMessage()

        monkeypatch.setattr(store.space, "usage", working_usage)
        now[0] += 5
        recovered = collect_samples(registry)
        assert value(recovered, "csi_oci_volumes_published", mode="unpack") == 2
        assert any("works again" in r.getMessage() for r in caplog.records)


def stats(server: str, pid: int, image: str = "", **numbers: float) -> LazyStats:
    return LazyStats(image, f"sha256:{server}", {"pid": pid, **numbers}, server=server)


def test_lazy_sums_never_go_down_when_servers_stop_or_restart():
    totals = LazyTotals(image_labels=False)
    out = totals.update([stats("a", 1, read_bytes=100), stats("b", 2, read_bytes=50)], now=0)
    assert out == {
        (): {
            **dict.fromkeys(lazystats.LAZY_COUNTER_KEYS, 0.0),
            "read_bytes": 150.0,
            "prefetch_done_bytes": 0.0,
            "prefetch_total_bytes": 0.0,
        }
    }
    # a: +30; b stops: its 50 stay counted.
    assert totals.update([stats("a", 1, read_bytes=130)], now=1)[()]["read_bytes"] == 180
    # a restarts (new pid, from 0): its new totals are all new.
    assert totals.update([stats("a", 9, read_bytes=10)], now=2)[()]["read_bytes"] == 190
    # ... or the same pid, numbers gone down: a restart too.
    assert totals.update([stats("a", 9, read_bytes=4)], now=3)[()]["read_bytes"] == 194
    # No server at all: the sums stay, the gauges are 0.
    last = totals.update([], now=4)[()]
    assert last["read_bytes"] == 194 and last["prefetch_total_bytes"] == 0


def test_lazy_series_per_image_merge_servers_and_go_with_them():
    totals = LazyTotals(image_labels=True)
    out = totals.update(
        [
            stats("a", 1, "r/x:1", read_bytes=10, prefetch_total_bytes=5),
            stats("b", 2, "r/y:1", read_bytes=20),
        ],
        now=0,
    )
    assert out[("r/x:1", "sha256:a")]["read_bytes"] == 10
    assert out[("r/x:1", "sha256:a")]["prefetch_total_bytes"] == 5
    assert out[("r/y:1", "sha256:b")]["read_bytes"] == 20
    out = totals.update([stats("a", 1, "r/x:1", read_bytes=15)], now=1)
    assert list(out) == [("r/x:1", "sha256:a")], "a series with no live server goes"
    assert out[("r/x:1", "sha256:a")]["read_bytes"] == 15
