"""Pieces the benchmark's modules share: cache dropping, a stopwatch that
also counts the machine's CPU, and a timed publish through a real `csi-oci serve`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.driver import Driver

REPO = Path(__file__).resolve().parent.parent


def drop_caches() -> bool:
    """Flush and drop the page cache (True when the kernel allowed it)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cpu_seconds() -> dict[str, float]:
    """System-wide CPU seconds so far (every core, every process) from /proc/stat.

    Busy time covers the registry, the kernel's copies and writeback, not
    only the tool: what the whole machine spent on a pull.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return {
        "busy": (user + nice + system + irq + softirq) / hz,
        "idle": (idle + iowait) / hz,
        "steal": steal / hz,
    }


class Stopwatch:
    """Wall seconds and the machine's CPU seconds over a `with` block."""

    # Called with True as the timed window opens and False as it closes:
    # bench/profile.py switches a system-wide profiler on for exactly the
    # window (not the tool's start-up or the check of its output).
    on_window: Callable[[bool], None] | None = None

    def __enter__(self) -> Stopwatch:
        if Stopwatch.on_window is not None:
            Stopwatch.on_window(True)
        self._cpu = cpu_seconds()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started
        end = cpu_seconds()
        self.cpu = {f"cpu_{k}_s": end[k] - self._cpu[k] for k in end}
        if Stopwatch.on_window is not None:
            Stopwatch.on_window(False)


def timed_publish(
    ref: str,
    work: Path,
    attrs: dict[str, str] | None = None,
    check: Callable[[Path], None] | None = None,
    log_filter: Callable[[str], bool] | None = None,
) -> float:
    """Seconds for one NodePublishVolume of `ref` by a fresh driver and state dir."""
    drv = Driver(work / "driver")
    parent = work / "pod" / "volumes" / "model"
    parent.mkdir(parents=True)
    target = parent / "mount"
    try:
        started = time.perf_counter()
        drv.publish(target, {"image": ref, **(attrs or {})}, timeout=3600)
        elapsed = time.perf_counter() - started
        if check is not None:
            check(target)
        drv.unpublish(target)
    finally:
        code = drv.stop(timeout=300)
        if code != 0:
            print(f"  driver exited {code}:\n{drv.log_text()[-2000:]}")
        if log_filter is not None:
            for line in drv.log_text().splitlines():
                if log_filter(line):
                    print("   ", line[11:200])
    return elapsed
