"""Publish a ModelPack raw artifact through the CSI API vs `oras pull` of it.

Separate from the tests: performance is measured here, never asserted.

    .venv/bin/python hack/bench_artifact.py --size-mib 1024 --files 8 --reps 3

Builds an 8-file ModelPack artifact (`application/vnd.cncf.model.weight.v1.raw`
layers of random data, plus small config files; each layer titled, so oras
writes every file), pushes it to a loopback CNCF distribution registry, then
alternates, with page caches dropped before each run:
  * csi-oci: a fresh `csi-oci serve` + empty state dir, timed NodePublishVolume
    (resolve, parallel download, sha256 of every blob, files written once,
    bind mount);
  * oras: `oras pull --plain-http` of the same reference into an empty dir
    (oras verifies each blob's digest too).
Also prints this machine's sha256 throughput on one core for reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # reuse the test support (registry, artifacts)
sys.path.insert(0, str(REPO / "hack"))

from benchlib import drop_caches, timed_publish  # noqa: E402
from support.artifacts import modelpack, push_artifact  # noqa: E402
from support.registry import Registry  # noqa: E402


def sha256_mib_s() -> float:
    data = os.urandom(256 << 20)
    started = time.perf_counter()
    hashlib.sha256(data).digest()
    return 256 / (time.perf_counter() - started)


def oras_binary() -> str:
    local = REPO / ".cache" / "bin" / "oras"
    found = str(local) if local.exists() else shutil.which("oras")
    if not found:
        sys.exit("oras CLI not found: run hack/install-deps")
    return found


def time_csi_oci(ref: str, work: Path, expect_files: int) -> float:
    def check(target: Path) -> None:
        assert len(os.listdir(target)) == expect_files

    return timed_publish(ref, work, check=check)


def time_oras(ref: str, work: Path, expect_files: int) -> float:
    dest = work / "oras"
    dest.mkdir()
    started = time.perf_counter()
    subprocess.run(
        [oras_binary(), "pull", "--plain-http", "-o", str(dest), ref],
        check=True,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - started
    assert len(os.listdir(dest)) == expect_files
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "bench-artifact.json")
    args = p.parse_args()

    base = Path(tempfile.mkdtemp(prefix="csi-oci-bench-art-"))
    registry = Registry(base / "registry")
    try:
        per = args.size_mib * 1024 * 1024 // args.files
        files = {
            f"model-{i + 1:05d}-of-{args.files:05d}.safetensors": ("weight", os.urandom(per))
            for i in range(args.files)
        }
        t0 = time.perf_counter()
        ref = push_artifact(registry, modelpack(files, fmt="raw"), "bench/modelpack:v1")
        del files
        print(
            f"pushed a {args.size_mib} MiB, {args.files}-file ModelPack raw artifact "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        results: dict[str, list[float]] = {"csi-oci publish": [], "oras pull": []}
        dropped = True
        for rep in range(args.reps):
            for name, fn in (("csi-oci publish", time_csi_oci), ("oras pull", time_oras)):
                work = base / f"run-{rep}-{name.split()[0]}"
                work.mkdir()
                dropped = drop_caches() and dropped
                seconds = fn(ref, work, args.files)
                shutil.rmtree(work, ignore_errors=True)
                results[name].append(seconds)
                print(f"rep {rep + 1}: {name}: {seconds:.2f}s")
        sha = sha256_mib_s()
        summary = {
            name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs": v}
            for name, v in results.items()
        }
        speedup = summary["oras pull"]["median_s"] / summary["csi-oci publish"]["median_s"]
        report = {
            "size_mib": args.size_mib,
            "files": args.files,
            "reps": args.reps,
            "page_cache_dropped": dropped,
            "sha256_one_core_mib_s": sha,
            "results": summary,
            "speedup_vs_oras": speedup,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print()
        print("| tool | median s | min s | max s | MiB/s |")
        print("|---|---|---|---|---|")
        for name, s in summary.items():
            print(
                f"| {name} | {s['median_s']:.2f} | {s['min_s']:.2f} | {s['max_s']:.2f} | "
                f"{args.size_mib / s['median_s']:.0f} |"
            )
        print(
            f"\ncsi-oci publish is {speedup:.2f}x the speed of oras pull (median); sha256 on one "
            f"core here: {sha:.0f} MiB/s; page cache dropped: {dropped}; JSON: {args.out}"
        )
    finally:
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
