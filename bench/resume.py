"""Resume efficiency: a large blob pulled through a proxy that cuts the connection.

Separate from the tests: measured here, never asserted.

    .venv/bin/python -m bench.resume --size-mib 1024 --cuts 5

Pushes one raw blob (an ORAS file artifact) to a loopback CNCF distribution
registry, puts tests/support/faultproxy.py in front of it cutting the
connection at `--cuts` random offsets, publishes through `csi-oci serve`, and
reports the bytes the proxy sent divided by the blob size (1.0 means nothing
was downloaded twice), the requests made, and the time next to a clean run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.lib import timed_publish
from tests.support.artifacts import oras_files, push_artifact
from tests.support.faultproxy import Cut, FaultProxy
from tests.support.registry import Registry

REPO = Path(__file__).resolve().parent.parent


class CutLargeBodies(Cut):
    """Cut only the big blob: a 2-byte config cannot be cut after any progress."""

    def on_response(self, ctx, status, length, plan):  # noqa: ANN001, ANN201
        if length is None or length < (1 << 20):
            return False
        return super().on_response(ctx, status, length, plan)


def publish(proxy: FaultProxy, repo_tag: str, work: Path) -> float:
    return timed_publish(
        f"{proxy.host}/{repo_tag}",
        work,
        log_filter=lambda line: "retrying" in line or "giving up" in line,
    )


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.resume",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--cuts", type=int, default=5)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "bench-resume.json")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="csi-oci-bench-resume-"))
    registry = Registry(base / "registry")
    proxy = FaultProxy(registry.url)
    try:
        data = os.urandom(args.size_mib << 20)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        push_artifact(registry, oras_files({"model.safetensors": data}), "bench/resume:v1")
        size = len(data)
        del data
        clean = publish(proxy, "bench/resume:v1", base / "clean")
        clean_bytes = proxy.bytes_sent(digest)
        proxy.reset_stats()
        proxy.set_scenario(CutLargeBodies(times=args.cuts, seed=args.seed))
        faulty = publish(proxy, "bench/resume:v1", base / "cut")
        sent = proxy.bytes_sent(digest)
        ranges = [r.range for r in proxy.requests if r.key == digest and r.method == "GET"]
        report = {
            "size_bytes": size,
            "cuts": args.cuts,
            "clean_seconds": clean,
            "clean_bytes_ratio": clean_bytes / size,
            "cut_seconds": faulty,
            "cut_bytes_sent": sent,
            "cut_bytes_ratio": sent / size,
            "blob_requests": len(ranges),
            "ranges": ranges,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"blob {size} bytes; clean publish {clean:.2f}s; with {args.cuts} cuts {faulty:.2f}s")
        print(
            f"bytes sent by the proxy / blob size: {sent / size:.4f} "
            f"({len(ranges)} requests; Range headers: {ranges})"
        )
        print(f"JSON: {args.out}")
    finally:
        proxy.stop()
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
