"""/metrics, /healthz and JSON logs of a real `csi-oci serve`, publishing real
images from a real loopback registry (needs root for the bind mounts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support.driver import Driver
from support.images import File, Image, Layer, push_image
from support.registry import free_port

from csi_oci.csi.v1 import csi_pb2
from csi_oci.metrics import LAZY_STATS_STALE_SECONDS, write_lazy_stats

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")

SECRET_PASSWORD = "hunter2-do-not-log"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the real endpoint."""
    resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def target_in(tmp_path: Path, name: str) -> Path:
    parent = tmp_path / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    """A driver with metrics on a free loopback port and JSON logs."""
    port = free_port()
    d = Driver(
        tmp_path_factory.mktemp("metered"),
        metrics_address=f"127.0.0.1:{port}",
        extra_args=["--log-format", "json"],
    )
    d.metrics_port = port
    yield d
    d.stop()


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

    target = target_in(tmp_path, "m1")
    metered.publish(target, {"image": ref}, volume_id="vol-m1")
    after = scrape(port)

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
    assert delta("csi_oci_rpcs_total", method="NodePublishVolume", code="OK") == 1

    # A second volume of the same image pulls nothing.
    target2 = target_in(tmp_path, "m2")
    metered.publish(target2, {"image": ref}, volume_id="vol-m2")
    again = scrape(port)
    assert value(again, "csi_oci_pulls_total", outcome="succeeded") == value(
        after, "csi_oci_pulls_total", outcome="succeeded"
    )
    assert value(again, "csi_oci_pull_bytes_total") == value(after, "csi_oci_pull_bytes_total")
    assert value(again, "csi_oci_volumes_published", mode="unpack") == 2

    metered.unpublish(target, volume_id="vol-m1")
    metered.unpublish(target2, volume_id="vol-m2")
    assert value(scrape(port), "csi_oci_volumes_published", mode="unpack") == 0


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


def test_lazy_servers_stats_files_are_exported(metered):
    digest_hex = "ab" * 32
    lazy_dir = metered.state_dir / "lazy" / digest_hex
    lazy_dir.mkdir(parents=True, exist_ok=True)
    write_lazy_stats(
        lazy_dir / "stats.json",
        {
            "image": "registry.example/llama:3",
            "read_bytes": 1000,
            "on_demand_fetched_bytes": 300,
            "prefetch_fetched_bytes": 700,
            "cache_hits": 5,
            "cache_misses": 2,
            "fetch_errors": 0,
            "prefetch_done_bytes": 700,
            "prefetch_total_bytes": 2000,
        },
    )
    stale_dir = metered.state_dir / "lazy" / ("cd" * 32)
    stale_dir.mkdir(parents=True, exist_ok=True)
    write_lazy_stats(stale_dir / "stats.json", {"image": "gone/server:1", "read_bytes": 9})
    old = time.time() - LAZY_STATS_STALE_SECONDS - 60
    os.utime(stale_dir / "stats.json", (old, old))
    try:
        samples = scrape(metered.metrics_port)
        labels = {"image": "registry.example/llama:3", "digest": f"sha256:{digest_hex}"}
        assert value(samples, "csi_oci_lazy_read_bytes_total", **labels) == 1000
        fetched = "csi_oci_lazy_fetched_bytes_total"
        assert value(samples, fetched, cause="on_demand", **labels) == 300
        assert value(samples, fetched, cause="prefetch", **labels) == 700
        assert value(samples, "csi_oci_lazy_cache_hits_total", **labels) == 5
        assert value(samples, "csi_oci_lazy_cache_misses_total", **labels) == 2
        assert value(samples, "csi_oci_lazy_prefetch_done_bytes", **labels) == 700
        assert value(samples, "csi_oci_lazy_prefetch_total_bytes", **labels) == 2000
        assert value(samples, "csi_oci_lazy_servers") == 1, "the stale file is ignored"
        assert not any(dict(lbl).get("image") == "gone/server:1" for _n, lbl in samples)
    finally:
        for directory in (lazy_dir, stale_dir):
            (directory / "stats.json").unlink()
            directory.rmdir()
    with pytest.raises(ValueError, match="unknown lazy stats key"):
        write_lazy_stats(lazy_dir.parent / "typo.json", {"read_byte": 1})


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
