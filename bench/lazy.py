"""Lazy vs unpack on a large model image (measured, never asserted).

    .venv/bin/python -m bench.lazy --size-mib 2048 --files 4

Builds an eStargz image of safetensors-like shards (random data) plus a small
config.json with stargz-snapshotter's estargz module (hack/tools/estargz-gen,
config.json prioritized), pushes it to a loopback registry, then, with page
caches dropped before each step, measures through `csi-oci serve`:
  * lazy: NodePublishVolume -> first byte of config.json, bytes fetched from
    the registry for that (from the registry's access log), cold sequential
    read of one big shard through FUSE, warm re-read of it, and the same read
    of a plain file on disk;
  * unpack: the full NodePublishVolume of the same image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.lib import drop_caches
from tests.support.driver import Driver
from tests.support.lazyfixtures import estargz_blob, make_layer_tar, push_lazy_image
from tests.support.registry import Registry

REPO = Path(__file__).resolve().parent.parent


def read_all(path: Path) -> float:
    """Sequential read() into one reused buffer: the file system's speed, not Python's."""
    buf = bytearray(1 << 20)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - started


def mmap_all(path: Path) -> float:
    """Touch every page through mmap, as safetensors loaders read weights."""
    import mmap

    started = time.perf_counter()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        for offset in range(0, len(m), 4096):
            _ = m[offset]  # one byte per page: the cost is the page faults
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.lazy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size-mib", type=int, default=2048)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "bench-lazy.json")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="csi-oci-bench-lazy-"))
    registry = Registry(base / "registry")
    try:
        per = (args.size_mib << 20) // args.files
        files = {
            f"models/model-{i + 1:05d}-of-{args.files:05d}.safetensors": os.urandom(per)
            for i in range(args.files)
        }
        files["models/config.json"] = (
            b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096}'
        )
        t0 = time.perf_counter()
        blob = estargz_blob(
            make_layer_tar(files, dirs=("models",)),
            base / "blob",
            level=1,
            prioritized=("models/config.json",),
        )
        pushed = push_lazy_image(registry, [blob], "bench/lazy:v1", base / "push")
        image_bytes = len(blob.blob)
        del files, blob
        print(
            f"built and pushed a {image_bytes >> 20} MiB eStargz image "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        big = f"model-00001-of-{args.files:05d}.safetensors"
        report: dict[str, float] = {"image_bytes": image_bytes}

        drop_caches()
        d = Driver(base / "lazy")
        target = base / "pods" / "lazy" / "mount"
        target.parent.mkdir(parents=True)
        try:
            before = registry.blob_bytes_sent("bench/lazy")
            started = time.perf_counter()
            d.publish(
                target,
                {
                    "image": pushed.reference,
                    "mode": "lazy",
                    "subPath": "models",
                    "prefetch": "none",
                },
                timeout=600,
            )
            (target / "config.json").read_bytes()[:1]
            report["lazy_first_byte_s"] = time.perf_counter() - started
            report["lazy_bytes_for_config"] = registry.blob_bytes_sent("bench/lazy") - before
            cold = read_all(target / big)
            report["lazy_cold_read_mib_s"] = (per >> 20) / cold
            warm = read_all(target / big)
            report["lazy_warm_read_mib_s"] = (per >> 20) / warm
            report["lazy_warm_mmap_mib_s"] = (per >> 20) / mmap_all(target / big)
            d.unpublish(target)
        finally:
            d.stop()

        drop_caches()
        d = Driver(base / "unpack")
        target = base / "pods" / "unpack" / "mount"
        target.parent.mkdir(parents=True)
        try:
            started = time.perf_counter()
            d.publish(
                target,
                {"image": pushed.reference, "mode": "unpack", "subPath": "models"},
                timeout=600,
            )
            report["unpack_publish_s"] = time.perf_counter() - started
            read_all(target / big)  # warm the page cache, as the lazy warm read had
            report["plain_warm_read_mib_s"] = (per >> 20) / read_all(target / big)
            report["plain_warm_mmap_mib_s"] = (per >> 20) / mmap_all(target / big)
            d.unpublish(target)
        finally:
            d.stop()

        report["first_byte_vs_unpack"] = report["lazy_first_byte_s"] / report["unpack_publish_s"]
        report["config_bytes_fraction"] = report["lazy_bytes_for_config"] / image_bytes
        report["warm_vs_plain"] = report["lazy_warm_read_mib_s"] / report["plain_warm_read_mib_s"]
        report["warm_mmap_vs_plain"] = (
            report["lazy_warm_mmap_mib_s"] / report["plain_warm_mmap_mib_s"]
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        for key, value in report.items():
            print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
        print(f"JSON: {args.out}")
    finally:
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
