"""Model loaders through lazy mounts against the unpack path (measured, never asserted).

    .venv/bin/python -m bench.loader --size-mib 1024 --shards 4
    .venv/bin/python -m bench.loader --size-mib 4096 --shards 8 --patterns shards

One model (safetensors-shaped shards: an 8-byte header length, a JSON header,
then tensors; half random, half bf16-like low-entropy data, plus config.json)
is written in every lazy format by the reference tools (estargz-gen for
eStargz and zstd:chunked's stargz dialect, skopeo for the containers/storage
dialect) and pushed to a loopback registry. Then, page caches dropped before
each run and each run on a fresh driver and state dir, for each format:

  * lazy: NodePublishVolume (mode lazy, default prefetch) -> first byte of
    config.json -> a loader has every byte. Loaders: `shards` (one thread
    per shard, 16 MiB read() calls in order) and `safetensors` (one thread
    per shard: read the header, then copy every tensor in file order out of
    an mmap, as safetensors' loaders do);
  * unpack: NodePublishVolume (mode unpack) + the same loader;
  * first byte with a warm standby FUSE server (the driver up for a few
    seconds) and the compressed bytes config.json cost (prefetch none);
  * the warm re-read of a shard through FUSE against the same read of the
    unpacked file (both from the page cache);
  * the FUSE server's peak RSS, and whether any blob byte was fetched twice
    (the registry's bytes sent against the blob's size).

CPU seconds are the whole machine's (driver, FUSE server, registry, kernel).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.lib import Stopwatch, drop_caches
from bench.models import (
    ESTARGZ_GEN,
    LAYER_TYPES,
    BlobFile,
    Pusher,
    blob_file,
    file_digest,
    low_entropy,
    push_image,
    write_tar,
    zstd_chunked_via_skopeo,
)
from csi_oci.telemetry.lazystats import LAZY_STATS_FILE
from tests.support.driver import Driver, fuse_pids, wait_for
from tests.support.registry import Registry

REPO = Path(__file__).resolve().parent.parent
FORMATS = ("estargz", "zstd:chunked/stargz", "zstd:chunked/containers")
PATTERNS = ("shards", "safetensors")
READ_BYTES = 16 << 20
TENSOR_BYTES = 64 << 20  # what one tensor copy moves (a layer's weight matrix)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the model -----------------------------------------------------------------------


def make_safetensors_model(root: Path, total: int, shards: int) -> list[str]:
    """Shards with a real safetensors header (tensors of TENSOR_BYTES), plus config.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["Bench"], "hidden": 4096}))
    names = []
    per = total // shards
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors, offset = {}, 0
        while offset < per:
            size = min(TENSOR_BYTES, per - offset)
            tensors[f"layers.{len(tensors)}.weight"] = {
                "dtype": "BF16",
                "shape": [size // 2],
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header = json.dumps(tensors).encode()
        header += b" " * (-len(header) % 8)
        make = os.urandom if i % 2 == 0 else low_entropy
        with open(root / name, "wb") as out:
            out.write(struct.pack("<Q", len(header)) + header)
            left = per
            while left:
                data = make(min(TENSOR_BYTES, left))
                out.write(data)
                left -= len(data)
        names.append(name)
    return names


def estargz_gen_file(src: Path, out: Path, fmt: str) -> BlobFile:
    """eStargz or zstd:chunked (stargz dialect) by stargz-snapshotter's estargz module."""
    cmd = [str(ESTARGZ_GEN), "-in", str(src), "-out", str(out), "-format", fmt]
    cmd += ["-prioritized", "config.json"]
    if fmt == "estargz":
        cmd += ["-level", "6"]
    proc = subprocess.run(cmd, capture_output=True, check=True, stdin=subprocess.DEVNULL)
    info = json.loads(proc.stdout)
    return BlobFile(out, info["mediaType"], info["digest"], info["size"], info["annotations"])


def build(model: Path, work: Path, host: str, formats: tuple[str, ...]) -> dict[str, Any]:
    pusher = Pusher(host)
    work.mkdir(parents=True, exist_ok=True)
    tar = work / "model.tar"
    write_tar(model, tar)
    diff_id = file_digest(tar)
    pushed: dict[str, Any] = {}
    for fmt in formats:
        if fmt == "zstd:chunked/containers":
            blob = zstd_chunked_via_skopeo(blob_file(tar, LAYER_TYPES["tar"]), diff_id, work / "s")
            layer_diff = diff_id
        else:
            out = work / "layer.blob"
            gen_fmt = "estargz" if fmt == "estargz" else "zstdchunked"
            blob = estargz_gen_file(tar, out, gen_fmt)
            # estargz.Build rewrites the tar (landmark and TOC entries): its own diff_id.
            layer_diff = _diff_id(out, fmt)
        result = push_image(pusher, fmt.replace("/", "-"), blob, layer_diff)
        pushed[fmt] = {"ref": result.ref, "size": blob.size, "digest": blob.digest}
        shutil.rmtree(work / "s", ignore_errors=True)
        (work / "layer.blob").unlink(missing_ok=True)
        say(f"pushed {fmt}: {blob.size >> 20} MiB")
    tar.unlink()
    return pushed


def _diff_id(path: Path, fmt: str) -> str:
    import hashlib

    import zstandard
    from isal import igzip

    h = hashlib.sha256()
    with open(path, "rb") as raw:
        reader: Any = (
            igzip.open(raw, "rb")
            if fmt == "estargz"
            else zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        )
        while data := reader.read(4 << 20):
            h.update(data)
    return "sha256:" + h.hexdigest()


# -- the loaders ---------------------------------------------------------------------


def read_shard(path: Path) -> None:
    buf = bytearray(READ_BYTES)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def safetensors_shard(path: Path) -> None:
    """Header by read(), then each tensor copied out of an mmap in file order."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        base = 8 + length
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            spans = sorted(v["data_offsets"] for v in header.values())
            for start, end in spans:
                _ = bytes(m[base + start : base + end])  # what a to-device copy reads


LOADERS: dict[str, Callable[[Path], None]] = {
    "shards": read_shard,
    "safetensors": safetensors_shard,
}


def load(root: Path, names: list[str], pattern: str) -> None:
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            LOADERS[pattern](root / name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def warm_read_rate(path: Path, reps: int = 5) -> float:
    """MiB/s of a re-read from the page cache (1 MiB read() calls), best of `reps`:
    a read of a few hundred MiB from memory takes tens of ms, easily disturbed."""
    buf = bytearray(1 << 20)
    best = float("inf")
    for _ in range(reps + 1):  # the first read only warms
        started = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        best = min(best, time.perf_counter() - started)
    return path.stat().st_size / best / (1 << 20)


def fuse_cpu_s(state: Path) -> float:
    """CPU seconds (user + system) the image's FUSE servers spent so far."""
    total = 0
    for pid in fuse_pids(state):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def fuse_rss_peak_mb(state: Path) -> float:
    peak = 0
    for pid in fuse_pids(state):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    return peak / 1024


# -- the runs ------------------------------------------------------------------------


def lazy_run(
    work: Path, image: dict[str, Any], names: list[str], pattern: str, registry: Registry
) -> dict[str, float]:
    drv = Driver(work / "driver")
    target = work / "pod" / "mount"
    target.parent.mkdir(parents=True)
    repo = image["ref"].split("/", 1)[1].split(":")[0].split("@")[0]
    sent_before = registry.blob_bytes_sent(repo)
    try:
        with Stopwatch() as clock:
            drv.publish(target, {"image": image["ref"], "mode": "lazy"}, timeout=3600)
            with open(target / "config.json", "rb") as f:
                f.read(1)
            first_byte = time.perf_counter() - clock._started
            load(target, names, pattern)
        out = {
            "first_byte_fresh_s": first_byte,
            "all_bytes_s": clock.seconds,
            **clock.cpu,
            "fuse_rss_peak_mb": fuse_rss_peak_mb(drv.state_dir),
            "fuse_cpu_s": fuse_cpu_s(drv.state_dir),
        }
        out["warm_read_mib_s"] = warm_read_rate(target / names[0])
        # Let the background fill finish, then count what the registry sent.
        wait_for(lambda: _prefetch_done(drv.state_dir), timeout=600, interval=0.5)
        out["fetched_over_blob"] = (registry.blob_bytes_sent(repo) - sent_before) / image["size"]
        # Payload pieces fetched (reads and hydration) over the payload's size:
        # 1.000 means no piece crossed the network twice.
        stats = _stats(drv.state_dir)
        fetched = stats.get("on_demand_fetched_bytes", 0) + stats.get("prefetch_fetched_bytes", 0)
        out["payload_fetched_ratio"] = fetched / max(1, stats.get("prefetch_total_bytes", 0))
        drv.unpublish(target)
    finally:
        drv.stop(timeout=300)
    return out


def _stats(state: Path) -> dict[str, int]:
    """The image's FUSE server totals (its stats file, written every few seconds)."""
    total: dict[str, int] = {}
    for path in (state / "lazy").glob(f"*/{LAZY_STATS_FILE}"):
        for key, value in json.loads(path.read_text()).items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
    return total


def _prefetch_done(state: Path) -> bool:
    for path in (state / "lazy").glob(f"*/{LAZY_STATS_FILE}"):
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        total = stats.get("prefetch_total_bytes", 0)
        if not total or stats.get("prefetch_done_bytes", 0) < total:
            return False  # not planned yet (the first stats are written at start), or filling
    return True


def first_byte_warm_standby(
    work: Path, image: dict[str, Any], registry: Registry
) -> dict[str, float]:
    """First byte with the driver up and its standby FUSE server loaded; prefetch none,
    so the registry's bytes are what config.json alone cost."""
    drv = Driver(work / "driver")
    target = work / "pod" / "mount"
    target.parent.mkdir(parents=True)
    repo = image["ref"].split("/", 1)[1].split(":")[0].split("@")[0]
    try:
        time.sleep(3)  # the standby loads its imports
        before = registry.blob_bytes_sent(repo)
        started = time.perf_counter()
        drv.publish(
            target, {"image": image["ref"], "mode": "lazy", "prefetch": "none"}, timeout=600
        )
        with open(target / "config.json", "rb") as f:
            f.read(1)
        seconds = time.perf_counter() - started
        fetched = registry.blob_bytes_sent(repo) - before
        drv.unpublish(target)
    finally:
        drv.stop(timeout=300)
    return {"first_byte_standby_s": seconds, "config_fetched_fraction": fetched / image["size"]}


def unpack_run(
    work: Path, image: dict[str, Any], names: list[str], pattern: str
) -> dict[str, float]:
    drv = Driver(work / "driver")
    target = work / "pod" / "mount"
    target.parent.mkdir(parents=True)
    try:
        with Stopwatch() as clock:
            drv.publish(target, {"image": image["ref"], "mode": "unpack"}, timeout=3600)
            published = time.perf_counter() - clock._started
            load(target, names, pattern)
        out = {"publish_s": published, "all_bytes_s": clock.seconds, **clock.cpu}
        out["warm_read_mib_s"] = warm_read_rate(target / names[0])
        drv.unpublish(target)
    finally:
        drv.stop(timeout=300)
    return out


def render(report: dict[str, Any]) -> str:
    """The markdown table docs/benchmark.md shows (one run, as measured)."""
    lines = [
        f"{report['size_mib']} MiB model in {report['shards']} shards, "
        f"{report['shards']} loader threads; {report['date']}, {report['machine']}",
        "",
        "| format | loader | lazy: first byte | lazy: all bytes | unpack: publish + read "
        "| ratio | CPU s lazy / unpack (FUSE server) | warm re-read vs plain "
        "| FUSE RSS peak | payload fetched / payload |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        lazy, unpack = run["lazy"], run["unpack"]
        lines.append(
            f"| {run['format']} | {run['pattern']} | {lazy['first_byte_fresh_s']:.2f} s "
            f"| {lazy['all_bytes_s']:.2f} s | {unpack['all_bytes_s']:.2f} s "
            f"| **{run['all_bytes_ratio']:.2f}** "
            f"| {lazy['cpu_busy_s']:.1f} / {unpack['cpu_busy_s']:.1f} ({lazy['fuse_cpu_s']:.1f}) "
            f"| {run['warm_vs_plain']:.2f} | {lazy['fuse_rss_peak_mb']:.0f} MB "
            f"| {lazy['payload_fetched_ratio']:.3f} |"
        )
    lines += [
        "",
        "| format | first byte, warm standby | config.json fetched / image |",
        "|---|---|---|",
    ]
    for fmt, fb in report.get("first_byte", {}).items():
        lines.append(
            f"| {fmt} | {fb['first_byte_standby_s']:.3f} s "
            f"| {100 * fb['config_fetched_fraction']:.3f} % |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.loader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--shards", type=int, default=4, help="one loader thread per shard")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "bench-loader.json")
    p.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    p.add_argument("--no-drop-caches", action="store_true", help="keep the page cache (smoke runs)")
    args = p.parse_args()
    formats = tuple(args.formats.split(","))
    drop = (lambda: False) if args.no_drop_caches else drop_caches
    patterns = tuple(args.patterns.split(","))
    base = Path(tempfile.mkdtemp(prefix="csi-oci-bench-loader-", dir=args.work))
    registry = Registry(base / "registry")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.platform()}",
        "size_mib": args.size_mib,
        "shards": args.shards,
        "runs": [],
    }
    try:
        model = base / "model"
        names = make_safetensors_model(model, args.size_mib << 20, args.shards)
        pushed = build(model, base / "build", registry.host, formats)
        shutil.rmtree(model)
        runs: list[dict[str, Any]] = report["runs"]
        for fmt in formats:
            image = pushed[fmt]
            for pattern in patterns:
                drop()
                unpack = unpack_run(base / f"u-{len(runs)}", image, names, pattern)
                shutil.rmtree(
                    base / f"u-{len(runs)}", ignore_errors=True
                )  # a model's worth of disk
                drop()
                lazy = lazy_run(base / f"l-{len(runs)}", image, names, pattern, registry)
                shutil.rmtree(base / f"l-{len(runs)}", ignore_errors=True)
                run = {"format": fmt, "pattern": pattern, "lazy": lazy, "unpack": unpack}
                run["all_bytes_ratio"] = lazy["all_bytes_s"] / unpack["all_bytes_s"]
                run["warm_vs_plain"] = lazy["warm_read_mib_s"] / unpack["warm_read_mib_s"]
                runs.append(run)
                say(
                    f"{fmt:24} {pattern:11} lazy {lazy['all_bytes_s']:6.2f} s "
                    f"(cpu {lazy['cpu_busy_s']:5.1f}, FUSE {lazy['fuse_cpu_s']:4.1f}) "
                    f"unpack {unpack['all_bytes_s']:6.2f} s "
                    f"(cpu {unpack['cpu_busy_s']:5.1f}) ratio {run['all_bytes_ratio']:.2f}; "
                    f"first byte {lazy['first_byte_fresh_s']:.3f} s; warm/plain "
                    f"{run['warm_vs_plain']:.2f}; FUSE RSS {lazy['fuse_rss_peak_mb']:.0f} MB; "
                    f"fetched/blob {lazy['fetched_over_blob']:.3f}, payload fetched/payload "
                    f"{lazy['payload_fetched_ratio']:.3f}"
                )
            drop()
            standby = first_byte_warm_standby(base / f"s-{fmt.replace('/', '-')}", image, registry)
            report.setdefault("first_byte", {})[fmt] = standby
            say(
                f"{fmt:24} first byte, warm standby {standby['first_byte_standby_s']:.3f} s, "
                f"config.json cost {100 * standby['config_fetched_fraction']:.3f} % of the blob"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(render(report))
        print(render(report))
        say(f"JSON: {args.out}, table: {args.out.with_suffix('.md')}")
    finally:
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
