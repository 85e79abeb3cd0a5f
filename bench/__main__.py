"""The pull benchmark: csi-oci against its peers and this machine's limits.

    hack/bench                      # 4 GiB model, 3 repetitions (~45 min here)
    hack/bench --size-mib 512 --reps 1 --packagings raw,tar

Separate from the tests: performance is measured here, never asserted.
Makes a synthetic model (safetensors-like shards of random and low-entropy
data plus small JSON files), pushes it to a loopback CNCF distribution
registry in each packaging (raw ModelPack artifact, tar, tar+gzip, tar+zstd,
eStargz, zstd:chunked), then times, with the page cache dropped before
each run and the runs of all tools interleaved:

  * csi-oci: NodePublishVolume by a fresh `csi-oci serve` with an empty store
    (mode unpack), and for the lazy formats a lazy publish (first byte of
    config.json, then every file read once through FUSE);
  * the peers: `oras pull` (artifact), `oras cp` / `skopeo copy` to an OCI
    layout followed by `tar -x`, `crane export | tar -x` (images);
  * the machine: sha256 on one and on all cores, gzip (zlib, isal, zlib-ng)
    and zstd inflate per core, registry -> curl over loopback, disk writes.

Every tool's output is checked file by file against the model's sha256.
Writes bench.json, bench.md and bench.png to --out-dir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import limits as bench_limits
from bench import report as bench_report
from bench.lib import drop_caches
from bench.models import LAZY_PACKAGINGS, PACKAGINGS, Pushed, build_and_push, make_model
from bench.tools import (
    Run,
    Runner,
    clean,
    csi_oci_lazy,
    csi_oci_unpack,
    csi_oci_unpack_no_diff_check,
    peers_for,
    warm,
)
from tests.support.registry import Registry

REPO = Path(__file__).resolve().parent.parent


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (
        f"{os.cpu_count()} x {cpu}, {mem:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def plan(
    args: argparse.Namespace, pushed: dict[str, Pushed], names: list[str]
) -> list[tuple[str, str, Runner]]:
    """(packaging, tool, runner) for one repetition, in the order they run."""

    def lazy(ref: str, work: Path, expected: dict[str, str] | None) -> Run:
        return csi_oci_lazy(ref, work, expected, "config.json", names)

    steps: list[tuple[str, str, Runner]] = []
    for packaging in pushed:
        steps.append((packaging, bench_report.CSI, csi_oci_unpack))
        if packaging in bench_report.DIFF_CHECKED:
            # What the diff_id check (a sha256 the peers skip) costs, measured.
            steps.append((packaging, bench_report.CSI_NO_DIFF, csi_oci_unpack_no_diff_check))
        if packaging in LAZY_PACKAGINGS and not args.no_lazy:
            steps.append((packaging, bench_report.LAZY, lazy))
        if not args.no_peers:
            steps += [(packaging, name, fn) for name, fn in peers_for(packaging).items()]
    return steps


def run_all(
    args: argparse.Namespace,
    registry: Registry,
    pushed: dict[str, Pushed],
    expected: dict[str, str],
    base: Path,
) -> tuple[list[dict[str, Any]], bool]:
    runs: list[dict[str, Any]] = []
    dropped = True
    steps = plan(args, pushed, sorted(expected))
    partial = args.out_dir / "bench-runs.partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    for rep in range(args.reps):
        for packaging, tool, runner in steps:
            work = base / "runs" / f"{rep}-{len(runs)}"
            work.mkdir(parents=True)
            dropped = (not args.no_drop_caches and drop_caches()) and dropped
            warm([registry.blob_path(d) for d in pushed[packaging].digests])
            # Files are checked on the first repetition (a second read of 4 GiB
            # per run would double the benchmark's time; the code paths do not
            # change between repetitions).
            result = runner(pushed[packaging].ref, work, expected if rep == 0 else None)
            clean(work)
            runs.append(
                {
                    "packaging": packaging,
                    "tool": tool,
                    "rep": rep,
                    "seconds": result.seconds,
                    "extra": result.extra,
                }
            )
            partial.write_text(json.dumps(runs))  # a crash later keeps what was measured
            extra = ", ".join(f"{k} {v:.3g}" for k, v in result.extra.items())
            say(f"rep {rep + 1} {packaging:13} {tool:24} {result.seconds:7.2f} s  {extra}")
    return runs, dropped


def measure_limits(
    registry: Registry,
    pushed: dict[str, Pushed],
    base: Path,
    expected: dict[str, str],
    sample_bytes: int,
) -> dict[str, float]:
    """Limits on samples of this run's data: the first half of a random shard
    and of a low-entropy one; the two largest blobs over loopback."""
    shards = sorted(n for n in expected if n.endswith(".safetensors"))
    sample = b""
    for name in shards[:2]:
        with open(base / "model" / name, "rb") as f:
            sample += f.read(sample_bytes // 2)
    repo_of = {
        d: x.ref.split("/", 1)[1].rsplit(":", 1)[0] for x in pushed.values() for d in x.digests
    }
    blobs = sorted(repo_of, key=lambda d: registry.blob_path(d).stat().st_size)[-2:]
    # The download floor fetches what a raw pull fetches (else the biggest blobs).
    fetched = list(pushed["raw"].digests) if "raw" in pushed else blobs
    warm([registry.blob_path(d) for d in {*blobs, *fetched}])

    def url(d: str) -> str:
        return f"http://{registry.host}/v2/{repo_of[d]}/blobs/{d}"

    sizes = [registry.blob_path(d).stat().st_size for d in blobs]
    return bench_limits.measure(
        sample,
        [url(d) for d in blobs],
        sizes,
        base,
        disk_bytes=4 * sample_bytes,
        download=[(url(d), registry.blob_path(d).stat().st_size) for d in fetched],
    )


def main() -> int:
    p = argparse.ArgumentParser(
        prog="hack/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size-mib", type=int, default=4096, help="model size (default 4096)")
    p.add_argument("--shards", type=int, default=8, help="weight files (default 8)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--packagings", default=",".join(PACKAGINGS))
    p.add_argument("--no-peers", action="store_true", help="time csi-oci only")
    p.add_argument("--no-lazy", action="store_true", help="skip the lazy runs")
    p.add_argument("--no-drop-caches", action="store_true", help="keep the page cache (smoke runs)")
    p.add_argument(
        "--limit-sample-mib", type=int, default=256, help="data per machine-limit measure"
    )
    p.add_argument("--out-dir", type=Path, default=REPO / ".cache" / "bench")
    p.add_argument("--workdir", type=Path, default=None, help="scratch (default: a temp dir)")
    p.add_argument(
        "--render", type=Path, default=None, help="only re-render bench.md/png from a bench.json"
    )
    args = p.parse_args()
    if args.render is not None:
        return render(json.loads(args.render.read_text()), args.out_dir)
    packagings = tuple(x for x in args.packagings.split(",") if x)
    unknown = set(packagings) - set(PACKAGINGS)
    if unknown:
        p.error(f"unknown packagings {sorted(unknown)}; known: {', '.join(PACKAGINGS)}")

    base = Path(tempfile.mkdtemp(prefix="csi-oci-bench-", dir=args.workdir))
    registry = Registry(base / "registry")
    try:
        total = args.size_mib << 20
        say(f"writing a {args.size_mib} MiB model in {args.shards} shards")
        expected = make_model(base / "model", total, args.shards)
        pushed = build_and_push(registry.host, base / "model", base / "build", packagings, say)
        model_bytes = sum((base / "model" / n).stat().st_size for n in expected)
        say("measuring machine limits")
        limits = measure_limits(registry, pushed, base, expected, args.limit_sample_mib << 20)
        for name, value in limits.items():
            say(
                f"limit {name}: {value:.2f} CPU s/GiB"
                if name.endswith("_per_gib")
                else f"limit {name}: {value:.0f} MiB/s"
            )
        runs, dropped = run_all(args, registry, pushed, expected, base)
    finally:
        registry.stop()
        clean(base)

    summary = bench_report.summarize(runs, model_bytes)
    cores = os.cpu_count() or 1
    rat = bench_report.ratios(summary, limits, cores)
    report = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "cores": cores,
            "model_mib": args.size_mib,
            "shards": args.shards,
            "files": len(expected),
            "reps": args.reps,
            "page_cache_dropped": dropped,
            "command": "hack/bench " + shlex.join(sys.argv[1:]),
            "blob_bytes": {k: v.blob_bytes for k, v in pushed.items()},
        },
        "limits": limits,
        "results": summary,
        "ratios": rat,
        "runs": runs,
    }
    return render(report, args.out_dir)


def render(report: dict[str, Any], out_dir: Path) -> int:
    """Ratios, targets, markdown and chart from a report's results and limits."""
    report["ratios"] = bench_report.ratios(
        report["results"], report["limits"], report["meta"]["cores"]
    )
    report["targets"] = bench_report.targets(report["results"], report["ratios"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    md = bench_report.markdown(report)
    (out_dir / "bench.md").write_text(md)
    bench_report.chart(report, out_dir / "bench.png")
    print(md)
    say(f"wrote {out_dir}/bench.json, bench.md, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
