"""hack/bench (``python -m bench``) runs end to end (tiny model): every packaging,
every peer, the lazy runs, the machine limits, and its three outputs;
``python -m bench.profile`` profiles the raw pull of csi-oci and oras.

Performance is never asserted here; this only keeps the benchmark command
working on a fresh clone. The run itself checks each tool's files against
the model's sha256 (first repetition), so a tool that wrote wrong bytes
fails it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parent.parent
PACKAGINGS = {"raw", "tar", "tar+gzip", "tar+zstd", "estargz", "zstd:chunked"}
IMAGE_PEERS = {"oras cp + tar -x", "skopeo copy + tar -x", "crane export + tar -x"}


def test_bench_smoke_run_writes_json_markdown_and_chart(tmp_path):
    out = tmp_path / "out"
    # A short scratch path: the drivers' unix sockets live under it (108-byte limit).
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--size-mib",
        "24",
        "--shards",
        "2",
        "--reps",
        "1",
        "--no-drop-caches",
        "--limit-sample-mib",
        "8",
        "--out-dir",
        str(out),
        "--workdir",
        str(scratch),
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False
        )
        leftovers = list(scratch.iterdir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "bench.json").read_text())
    results = report["results"]
    assert set(results) == PACKAGINGS
    assert set(results["raw"]) == {"csi-oci publish", "oras pull"}
    for packaging in PACKAGINGS - {"raw"}:
        expected = {"csi-oci publish", *IMAGE_PEERS}
        if packaging in ("estargz", "zstd:chunked"):
            expected.add("csi-oci lazy")
            assert 0 < results[packaging]["csi-oci lazy"]["first_byte_s"]
        if packaging in ("tar+gzip", "tar+zstd"):
            expected.add("csi-oci publish, no diff_id check")
        assert set(results[packaging]) == expected, packaging
    for tools in results.values():
        for tool, stats in tools.items():
            assert stats["median_s"] > 0 and stats["mib_s"] > 0
            if tool != "csi-oci lazy":  # every other run records the machine's CPU use
                assert 0 < stats["cpu_busy_s"] and stats["cpu_idle_s"] >= 0
    publish = results["tar"]["csi-oci publish"]
    assert 0 < publish["rss_idle_bytes"] <= publish["rss_peak_bytes"]

    limits = report["limits"]
    for key in (
        "sha256_one_core",
        "gzip_zlib",
        "gzip_isal",
        "zstd",
        "http_loopback_one_stream",
        "disk_write_page_cache",
        "download_to_files",
        "download_to_files_cpu_s_per_gib",
    ):
        assert limits[key] > 0, key
    assert 0 < limits["verified_pull_floor"] <= limits["download_to_files"]
    assert 0 < report["ratios"]["raw"]["fraction_of_floor"]
    bounds = {r["target"].split(":")[0]: r["bound"] for r in report["targets"] if "bound" in r}
    assert "verified-pull floor" in bounds["raw"] and "diff_id" in bounds["tar+zstd"]
    assert {r["target"].split(":")[0] for r in report["targets"]} >= {"raw", "tar", "tar+gzip"}
    assert set(report["ratios"]) == PACKAGINGS

    markdown = (out / "bench.md").read_text()
    assert "## Targets" in markdown and "| tar+zstd | csi-oci publish |" in markdown
    assert "## Machine use during a run" in markdown
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers == [], "the run removes its registry, model and outputs"


def test_profile_splits_each_tools_cpu_by_thread_object_and_symbol(tmp_path):
    """python -m bench.profile (perf over the timed window) names the driver's
    pipeline threads, the registry and oras, and its shares add up."""
    out = tmp_path / "profile.md"
    cmd = [
        sys.executable,
        "-m",
        "bench.profile",
        "--size-mib",
        "64",
        "--shards",
        "2",
        "--no-drop-caches",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    csi, oras = text.split("### csi-oci publish")[1].split("### oras pull")
    assert "| raw-fetch |" in csi, "the driver's receive+hash stage is named"
    assert "| docker-registry |" in csi and "| docker-registry |" in oras
    assert "| oras |" in oras
    for section in (csi, oras):
        by_thread = section.split("#### by process or thread")[1].split("####")[0]
        shares = [int(m) for m in re.findall(r"\| (\d+) % \|", by_thread)]
        assert shares and 80 <= sum(shares) <= 101, by_thread


def test_loader_bench_smoke_run_measures_every_lazy_format(tmp_path):
    """bench.loader end to end on a small model: every format, both loader patterns."""
    out = tmp_path / "loader.json"
    scratch = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    cmd = [sys.executable, "-m", "bench.loader", "--size-mib", "16", "--shards", "2"]
    cmd += ["--no-drop-caches", "--out", str(out), "--work", str(scratch)]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False
        )
        leftovers = list(scratch.iterdir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert leftovers == []
    report = json.loads(out.read_text())
    runs = {(r["format"], r["pattern"]): r for r in report["runs"]}
    formats = ("estargz", "zstd:chunked/stargz", "zstd:chunked/containers")
    assert set(runs) == {(f, p) for f in formats for p in ("shards", "safetensors")}
    for run in runs.values():
        assert run["lazy"]["first_byte_fresh_s"] > 0 and run["unpack"]["publish_s"] > 0
        assert run["lazy"]["payload_fetched_ratio"] == 1.0, run  # no piece fetched twice
    assert set(report["first_byte"]) == set(formats)
    assert "| zstd:chunked/containers | safetensors |" in out.with_suffix(".md").read_text()


def test_signing_bench_smoke_run_times_every_signature_kind(tmp_path):
    """bench.signing end to end, once each: fresh and cached checks, the peers'
    own verify, warm publishes with and without a policy, model-signing."""
    out = tmp_path / "signing.json"
    cmd = [sys.executable, "-m", "bench.signing", "--reps", "2", "--model-mib", "16"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    kinds = {"cosign-key", "cosign-certificate", "cosign-bundle", "notation-jws", "notation-cose"}
    assert set(report["cases"]) == kinds
    for row in report["cases"].values():
        assert row["fresh"]["median_ms"] > 0 and row["cached_in_memory"]["median_ms"] >= 0
    assert report["cases"]["cosign-key"]["peer"]["tool"] == "cosign 2.5.3"
    assert set(report["publish"]) == {"with_policy", "without_policy"}
    assert report["model_signing"]["csi-oci"]["median_ms"] > 0
