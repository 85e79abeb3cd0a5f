"""This machine's limits, measured in the same run as the pulls (hack/bench).

Each number is what one piece of a pull costs on its own: hashing, inflating,
the registry sending over loopback, the page cache taking writes. A pull can
be no faster than its slowest serial stage, so the ratios in the report say
how close csi-oci is to the machine rather than to another tool.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard

from bench.lib import Stopwatch

MIB = 1 << 20


def _rate(nbytes: int, fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return nbytes / MIB / (time.perf_counter() - started)


def _best(reps: int, fn: Callable[[], float]) -> float:
    """The best of a few tries: a limit is what the machine can do, not its average."""
    return max(fn() for _ in range(reps))


def sha256_rates(data: bytes) -> dict[str, float]:
    """MiB/s of sha256 on one core, and on every core at once (threads:
    hashlib releases the GIL on large buffers)."""
    one = _best(3, lambda: _rate(len(data), lambda: hashlib.sha256(data).digest()))
    cores = os.cpu_count() or 1

    def all_cores() -> float:
        threads = [
            threading.Thread(target=lambda: hashlib.sha256(data).digest()) for _ in range(cores)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return cores * len(data) / MIB / (time.perf_counter() - started)

    return {"sha256_one_core": one, f"sha256_{cores}_cores": _best(3, all_cores)}


def _inflate_all(make: Callable[[], Any], blob: bytes) -> int:
    d = make()
    out = 0
    view = memoryview(blob)
    for i in range(0, len(blob), 4 * MIB):
        out += len(d.decompress(view[i : i + 4 * MIB]))
    return out


def inflate_rates(sample: bytes) -> dict[str, float]:
    """Output MiB/s of each gzip decoder, and of zstd, on one core.

    `sample` is the start of the model's tar, so the data (half random, half
    low-entropy) compresses as the benchmark's layers do.
    """
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)
    gzipped = gz.compress(sample) + gz.flush()
    decoders: dict[str, Callable[[], Any]] = {"gzip_zlib": lambda: zlib.decompressobj(31)}
    try:
        from isal import isal_zlib

        decoders["gzip_isal"] = lambda: isal_zlib.decompressobj(31)
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        decoders["gzip_zlib_ng"] = lambda: zlib_ng.decompressobj(31)
    except ImportError:
        pass
    rates = {
        name: _best(2, lambda make=make: _rate(len(sample), lambda: _inflate_all(make, gzipped)))
        for name, make in decoders.items()
    }
    zstd_blob = zstandard.ZstdCompressor(level=3).compress(sample)
    rates["zstd"] = _best(
        2,
        lambda: _rate(
            len(sample),
            lambda: _inflate_all(lambda: zstandard.ZstdDecompressor().decompressobj(), zstd_blob),
        ),
    )
    return rates


def loopback_http(urls: list[str], sizes: list[int]) -> dict[str, float]:
    """MiB/s of curl fetching blobs from the registry to /dev/null (blobs warm):
    one stream, and one stream per core at once."""

    def fetch(url: str) -> None:
        subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)

    one = _best(2, lambda: _rate(sizes[0], lambda: fetch(urls[0])))
    cores = min(os.cpu_count() or 1, len(urls))

    def parallel() -> float:
        threads = [threading.Thread(target=fetch, args=(u,)) for u in urls[:cores]]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(sizes[:cores]) / MIB / (time.perf_counter() - started)

    return {"http_loopback_one_stream": one, f"http_loopback_{cores}_streams": _best(2, parallel)}


def disk_write(directory: Path, nbytes: int) -> dict[str, float]:
    """MiB/s of large sequential writes: into the page cache, and through fsync."""
    path = directory / "disk-write-test"
    buf = os.urandom(4 * MIB)

    def write(sync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(nbytes // len(buf)):
                os.write(fd, buf)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    try:
        cached = _rate(nbytes, lambda: write(False))
        os.sync()
        synced = _rate(nbytes, lambda: write(True))
    finally:
        path.unlink(missing_ok=True)
    return {"disk_write_page_cache": cached, "disk_write_fsync": synced}


def download_to_files(
    blobs: list[tuple[str, int]], scratch: Path, parallel: int = 3
) -> dict[str, float]:
    """Registry -> files on disk with nothing checked: curl, `parallel` at a time.

    Returns the rate (MiB/s of wall time) and what the whole machine spent
    for it (busy CPU seconds per GiB, registry and kernel included): every
    verified pull of these blobs pays that plus a sha256 of each byte.
    """
    dest = scratch / "download-test"
    nbytes = sum(size for _, size in blobs)
    args: list[str] = []
    for i, (url, _) in enumerate(blobs):
        args += [url, "-o", str(dest / f"blob-{i}")]
    best: tuple[float, float] | None = None
    for _ in range(2):
        dest.mkdir()
        os.sync()
        with Stopwatch() as clock:
            subprocess.run(
                [
                    "curl",
                    "-sSf",
                    "--no-progress-meter",
                    "--parallel",
                    "--parallel-max",
                    str(parallel),
                    *args,
                ],
                check=True,
                stdin=subprocess.DEVNULL,
            )
        shutil.rmtree(dest)
        os.sync()
        if best is None or clock.seconds < best[0]:
            best = (clock.seconds, clock.cpu["cpu_busy_s"])
    assert best is not None
    return {
        "download_to_files": nbytes / MIB / best[0],
        "download_to_files_cpu_s_per_gib": best[1] / (nbytes / (1 << 30)),
    }


def verified_pull_floor(limits: dict[str, float], cores: int) -> float:
    """MiB/s no verified pull of uncompressed data can beat on this machine.

    Per MiB it costs at least the unchecked download (the registry, the
    kernel's receive and page-cache copies, writeback: measured above) plus
    one sha256 pass; `cores` cores share that work. It is also no faster
    than the unchecked download's own wall time.
    """
    cpu_per_mib = limits["download_to_files_cpu_s_per_gib"] / 1024 + 1 / limits["sha256_one_core"]
    return min(limits["download_to_files"], cores / cpu_per_mib)


def measure(
    sample: bytes,
    urls: list[str],
    sizes: list[int],
    scratch: Path,
    *,
    disk_bytes: int,
    download: list[tuple[str, int]],
) -> dict[str, float]:
    limits: dict[str, float] = {}
    limits.update(sha256_rates(sample))
    limits.update(inflate_rates(sample))
    limits.update(loopback_http(urls, sizes))
    limits.update(disk_write(scratch, disk_bytes))
    limits.update(download_to_files(download, scratch))
    limits["verified_pull_floor"] = verified_pull_floor(limits, os.cpu_count() or 1)
    return limits
