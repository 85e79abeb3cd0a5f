"""Time to publish an image through the CSI API vs `skopeo copy` of the same image.

Separate from the tests: performance is measured here, never asserted.

    .venv/bin/python hack/bench_pull.py --size-mib 1024 --layers 4 --reps 3

Starts a loopback registry (CNCF distribution), pushes a synthetic image of
random (incompressible, like model weights) data with skopeo, then alternates
runs of
  * csi-oci: a fresh `csi-oci serve` + empty state dir, timed NodePublishVolume
    (resolve, download, verify digests and diff_ids, unpack, bind mount);
  * skopeo: `skopeo copy docker://... oci:DIR` (download + verify, no unpack).
Page caches are dropped before each run when the kernel allows it. Prints
median and spread and writes a JSON file.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO / "tests"))  # reuse the test support (registry, images)
sys.path.insert(0, str(REPO / "hack"))

from benchlib import drop_caches, timed_publish  # noqa: E402
from support.images import File, Image, Layer, push_image  # noqa: E402
from support.registry import Registry  # noqa: E402


def make_image(size_mib: int, layers: int, compression: str) -> Image:
    per = size_mib * 1024 * 1024 // layers
    built = []
    for i in range(layers):
        data = os.urandom(per)
        built.append(
            Layer(
                [File(f"models/model-{i:05d}-of-{layers:05d}.safetensors", data)],
                compression=compression,
            )
        )
    return Image(built)


def time_csi_oci(registry: Registry, ref: str, work: Path) -> float:
    return timed_publish(ref, work)


def time_skopeo(registry: Registry, ref: str, work: Path) -> float:
    dest = work / "oci"
    started = time.perf_counter()
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            f"docker://{ref}",
            f"oci:{dest}:bench",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--compression", choices=["none", "gzip", "zstd"], default="none")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "bench-pull.json")
    args = p.parse_args()

    base = Path(tempfile.mkdtemp(prefix="csi-oci-bench-"))
    registry = Registry(base / "registry")
    try:
        t0 = time.perf_counter()
        image = make_image(args.size_mib, args.layers, args.compression)
        push_image(registry, image, "bench/model:v1", base / "push")
        del image
        print(
            f"built and pushed {args.size_mib} MiB in {args.layers} {args.compression} layers "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        ref = f"{registry.host}/bench/model:v1"
        results: dict[str, list[float]] = {"csi-oci publish": [], "skopeo copy": []}
        dropped = True
        for rep in range(args.reps):
            for name, fn in (("csi-oci publish", time_csi_oci), ("skopeo copy", time_skopeo)):
                work = base / f"run-{rep}-{name.split()[0]}"
                work.mkdir()
                dropped = drop_caches() and dropped
                seconds = fn(registry, ref, work)
                shutil.rmtree(work, ignore_errors=True)
                results[name].append(seconds)
                print(f"rep {rep + 1}: {name}: {seconds:.2f}s")
        summary = {
            name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs": v}
            for name, v in results.items()
        }
        ratio = summary["skopeo copy"]["median_s"] / summary["csi-oci publish"]["median_s"]
        report = {
            "size_mib": args.size_mib,
            "layers": args.layers,
            "compression": args.compression,
            "reps": args.reps,
            "page_cache_dropped": dropped,
            "results": summary,
            "speedup_vs_skopeo": ratio,
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
            f"\ncsi-oci publish is {ratio:.2f}x the speed of skopeo copy (median); "
            f"page cache dropped between runs: {dropped}; JSON: {args.out}"
        )
    finally:
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
