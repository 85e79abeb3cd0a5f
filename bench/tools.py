"""What hack/bench times: csi-oci through the CSI API, and the peers on the same images.

Every runner starts from nothing (empty state dir or output dir), returns the
seconds until the model's files are on disk (csi-oci: published and mounted),
and optionally checks every file's sha256 against the model, so a fast wrong
answer cannot win.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.lib import REPO, Stopwatch
from tests.support.driver import Driver

BIN = REPO / ".cache" / "bin"
EXTRACT_FLAGS = {
    "tar": [],
    "tar+gzip": ["-I", "pigz"],
    "estargz": ["-I", "pigz"],
    "tar+zstd": ["--zstd"],
    "zstd:chunked": ["--zstd"],
}


@dataclass
class Run:
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


def check_tree(root: Path, expected: dict[str, str]) -> None:
    """Every model file present under `root` with its sha256 (extra files are
    the formats' own: estargz's landmark and TOC entries)."""
    for name, want in expected.items():
        h = hashlib.sha256()
        with open(root / name, "rb", buffering=0) as f:
            buf = bytearray(4 << 20)
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])
        if h.hexdigest() != want:
            raise AssertionError(f"{root / name}: sha256 {h.hexdigest()} != {want}")


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux 4.0+: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# -- csi-oci -----------------------------------------------------------------------


def csi_oci_unpack(
    ref: str, work: Path, expected: dict[str, str] | None, driver_args: tuple[str, ...] = ()
) -> Run:
    """NodePublishVolume (mode unpack) by a fresh driver with an empty store.

    Also records the driver's RSS idle (after start, before the call) and
    peak (VmHWM during the pull).
    """
    drv = Driver(work / "driver", extra_args=list(driver_args))
    target = work / "pod" / "mount"
    target.parent.mkdir(parents=True)
    try:
        pid = drv.proc.pid if drv.proc else 0
        time.sleep(0.5)  # let start-up settle (the standby FUSE process is another pid)
        idle = proc_status(pid, "VmRSS")
        reset_peak(pid)
        with Stopwatch() as clock:
            drv.publish(target, {"image": ref, "mode": "unpack"}, timeout=3600)
        peak = proc_status(pid, "VmHWM")
        if expected is not None:
            check_tree(target, expected)
        drv.unpublish(target)
    finally:
        _stop(drv)
    return Run(clock.seconds, {"rss_idle_bytes": idle, "rss_peak_bytes": peak, **clock.cpu})


def csi_oci_unpack_no_diff_check(ref: str, work: Path, expected: dict[str, str] | None) -> Run:
    """The same publish with --no-verify-diff-ids: what checking the diff_ids costs."""
    return csi_oci_unpack(ref, work, expected, ("--no-verify-diff-ids",))


def read_all(root: Path, names: list[str]) -> None:
    """Read every file once (the repetitions that do not check sha256)."""
    buf = bytearray(4 << 20)
    for name in names:
        with open(root / name, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def csi_oci_lazy(
    ref: str, work: Path, expected: dict[str, str] | None, first: str, names: list[str]
) -> Run:
    """Lazy publish: seconds to the first byte of `first`, and to every file read.

    `seconds` is the time until every file was read through FUSE once (the
    default prefetch runs meanwhile, as it would for a pod).
    """
    drv = Driver(work / "driver")
    target = work / "pod" / "mount"
    target.parent.mkdir(parents=True)
    try:
        started = time.perf_counter()
        drv.publish(target, {"image": ref, "mode": "lazy"}, timeout=3600)
        with open(target / first, "rb") as f:
            f.read(1)
        first_byte = time.perf_counter() - started
        if expected is not None:
            check_tree(target, expected)  # reads every file once, verifying it
        else:
            read_all(target, names)
        seconds = time.perf_counter() - started
        drv.unpublish(target)
    finally:
        _stop(drv)
    return Run(seconds, {"first_byte_s": first_byte})


def _stop(drv: Driver) -> None:
    code = drv.stop(timeout=300)
    if code != 0:
        raise RuntimeError(f"driver exited {code}:\n{drv.log_text()[-2000:]}")


# -- peers -------------------------------------------------------------------------


def _run(cmd: list[str], **kw: object) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]!r}")


def _timed(fn: Callable[[], None]) -> Run:
    with Stopwatch() as clock:
        fn()
    return Run(clock.seconds, clock.cpu)


def oras_pull(ref: str, work: Path, expected: dict[str, str] | None) -> Run:
    """`oras pull` of an artifact: every titled layer written as its file."""
    dest = work / "out"
    dest.mkdir()
    run = _timed(lambda: _run([str(BIN / "oras"), "pull", "--plain-http", "-o", str(dest), ref]))
    if expected is not None:
        check_tree(dest, expected)
    return run


def extract_layout(layout: Path, dest: Path, packaging: str) -> None:
    """Extract the image's layers from an OCI layout, in order, with GNU tar."""
    import json

    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / digest.replace(":", "/")).read_text())
    for layer in manifest["layers"]:
        blob = layout / "blobs" / layer["digest"].replace(":", "/")
        _run(["tar", "-x", *EXTRACT_FLAGS[packaging], "-f", str(blob), "-C", str(dest)])


def _oras_copy(ref: str, layout: Path, work: Path) -> None:
    _run([str(BIN / "oras"), "cp", "--from-plain-http", "--to-oci-layout", ref, f"{layout}:t"])


def _skopeo_copy(ref: str, layout: Path, work: Path) -> None:
    auth = work / "auth.json"
    auth.write_text('{"auths":{}}')
    _run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "-q",
            "--src-tls-verify=false",
            f"docker://{ref}",
            f"oci:{layout}:t",
        ],
        env=dict(os.environ, REGISTRY_AUTH_FILE=str(auth)),
    )


def copy_extract(
    packaging: str, copy: Callable[[str, Path, Path], None]
) -> Callable[[str, Path, dict[str, str] | None], Run]:
    """Copy the image to an OCI layout (blobs verified), then `tar -x` its layers."""

    def run(ref: str, work: Path, expected: dict[str, str] | None) -> Run:
        layout, dest = work / "layout", work / "out"
        dest.mkdir()

        def go() -> None:
            copy(ref, layout, work)
            extract_layout(layout, dest, packaging)

        run = _timed(go)
        if expected is not None:
            check_tree(dest, expected)
        return run

    return run


def crane_export(ref: str, work: Path, expected: dict[str, str] | None) -> Run:
    """`crane export IMAGE - | tar -x`: the flattened filesystem, streamed."""
    dest = work / "out"
    dest.mkdir()

    def go() -> None:
        crane = subprocess.Popen(
            [str(BIN / "crane"), "export", "--insecure", ref, "-"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        tar = subprocess.run(
            ["tar", "-x", "-f", "-", "-C", str(dest)], stdin=crane.stdout, capture_output=True
        )
        assert crane.stdout is not None and crane.stderr is not None
        crane.stdout.close()
        err = crane.stderr.read()
        if crane.wait() != 0 or tar.returncode != 0:
            raise RuntimeError(f"crane export | tar -x failed: {err[-2000:]!r} {tar.stderr!r}")

    run = _timed(go)
    if expected is not None:
        check_tree(dest, expected)
    return run


Runner = Callable[[str, Path, "dict[str, str] | None"], Run]


def peers_for(packaging: str) -> dict[str, Runner]:
    """The peers that can consume a packaging (skopeo 1.9 and crane take the
    ModelPack config for an image config, so only oras pulls the raw artifact)."""
    if packaging == "raw":
        return {"oras pull": oras_pull}
    return {
        # An image has no titled layers, so `oras pull` would write nothing.
        "oras cp + tar -x": copy_extract(packaging, _oras_copy),
        "skopeo copy + tar -x": copy_extract(packaging, _skopeo_copy),
        "crane export + tar -x": crane_export,
    }


# -- helpers for the harness ---------------------------------------------------------


def warm(paths: list[Path]) -> None:
    """Read files into the page cache (the registry's blobs after a cache drop:
    the benchmark measures the pull, not this VM's disk)."""

    def one(path: Path) -> None:
        buf = bytearray(8 << 20)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    threads = [threading.Thread(target=one, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
