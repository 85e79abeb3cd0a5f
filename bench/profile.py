"""Where the machine's CPU goes while csi-oci and `oras pull` fetch the raw artifact.

    .venv/bin/python -m bench.profile                 # 4 GiB, as hack/bench
    .venv/bin/python -m bench.profile --size-mib 1024

The raw artifact is the packaging whose benchmark target (1.2x `oras pull`)
is missed; this shows why with a profile rather than a guess. It pushes the
model to a loopback registry like hack/bench, then for each tool drops the
page cache, re-reads the registry's blobs, and records every CPU with
`perf record -a` (the software cpu-clock: this VM has no hardware counters)
during exactly the timed window (bench.lib.Stopwatch.on_window). The report
gives CPU seconds by process or thread (the driver's pipeline threads carry
their stage's name), by shared object, and the hottest symbols, so each
tool's cost splits into hashing, the kernel's copies, the registry and
writeback. Installs perf (Debian linux-perf) when it is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from bench.lib import REPO, Stopwatch, drop_caches
from bench.models import Pusher, make_model, push_raw
from bench.tools import Run, clean, csi_oci_unpack, oras_pull, warm
from tests.support.registry import Registry

FREQ = 999  # samples per second per CPU
TOOLS = {"csi-oci publish": csi_oci_unpack, "oras pull": oras_pull}


def ensure_perf() -> str:
    perf = shutil.which("perf")
    if perf is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "linux-perf"]):
            subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, env=env)
        perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("perf is not available (Debian package linux-perf)")
    return perf


class WindowProfiler:
    """`perf record -a`, started paused and switched on only inside the window."""

    def __init__(self, perf: str, data: Path) -> None:
        self.perf = perf
        self.data = data
        self.ctl = data.with_suffix(".ctl")
        self.ack = data.with_suffix(".ack")

    def __enter__(self) -> WindowProfiler:
        for fifo in (self.ctl, self.ack):
            os.mkfifo(fifo)
        self.proc = subprocess.Popen(
            [self.perf, "record", "-a", "-F", str(FREQ), "-D", "-1", "-o", str(self.data),
             "--control", f"fifo:{self.ctl},{self.ack}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        # Opening a fifo blocks until perf opens the other end: perf is ready.
        self._ctl = open(self.ctl, "w")
        self._ack = open(self.ack)
        Stopwatch.on_window = self.switch
        return self

    def switch(self, on: bool) -> None:
        self._ctl.write("enable\n" if on else "disable\n")
        self._ctl.flush()
        self._ack.readline()  # perf acknowledges: the events are on (or off)

    def __exit__(self, *exc: object) -> None:
        Stopwatch.on_window = None
        self._ctl.close()
        self._ack.close()
        self.proc.send_signal(2)
        _, err = self.proc.communicate(timeout=120)
        if self.proc.returncode not in (0, -2):
            raise RuntimeError(f"perf record exited {self.proc.returncode}: {err[-1000:]!r}")


def samples_by(perf: str, data: Path, keys: str) -> list[tuple[int, list[str]]]:
    """(samples, key fields) rows of `perf report --sort keys`."""
    out = subprocess.run(
        [perf, "report", "-i", str(data), "--stdio", "-q", "-n", "--sort", keys,
         "--field-separator", "\t"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) >= 3 and fields[1].isdigit():
            rows.append((int(fields[1]), fields[2:]))
    return rows


def group_comm(comm: str) -> str:
    """Kernel worker threads by kind (kworker/u4:2 and kworker/1:1H are one kind)."""
    return re.sub(r"/[0-9u:H+-]+.*$", "/*", comm)


def busy(rows: list[tuple[int, list[str]]]) -> list[tuple[int, list[str]]]:
    """Without the idle task: cpu-clock samples idle CPUs too."""
    return [(n, k) for n, k in rows if k[0] != "swapper"]


def table(title: str, header: list[str], rows: list[tuple[float, list[str]]], total: float) -> str:
    lines = [f"#### {title}", "", "| " + " | ".join([*header, "CPU s", "share"]) + " |"]
    lines.append("|" + "---|" * (len(header) + 2))
    for cpu_s, keys in rows:
        cells = [*keys, f"{cpu_s:.2f}", f"{100 * cpu_s / total:.0f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(perf: str, data: Path, tool: str, run: Run, top: int) -> str:
    # One pass of perf over the data; the per-thread and per-library totals
    # are sums of its rows. A stripped binary (libcrypto) gives one row per
    # address: summed as one.
    by_comm: dict[str, float] = defaultdict(float)
    by_dso: dict[str, float] = defaultdict(float)
    by_sym: dict[tuple[str, str, str], float] = defaultdict(float)
    for n, (comm, dso, sym) in busy(samples_by(perf, data, "comm,dso,sym")):
        by_comm[group_comm(comm)] += n / FREQ
        by_dso[dso] += n / FREQ
        by_sym[(comm, dso, re.sub(r"^\[\.\] 0x[0-9a-f]+$", "(no symbols)", sym))] += n / FREQ
    syms = [(v, list(k)) for k, v in by_sym.items()]
    total = sum(by_comm.values())
    head = (
        f"### {tool}: {run.seconds:.2f} s, {total:.2f} CPU s sampled "
        f"(/proc/stat: {run.extra['cpu_busy_s']:.2f} busy, {run.extra['cpu_steal_s']:.2f} stolen)\n"
    )

    def ranked(d: dict[str, float]) -> list[tuple[float, list[str]]]:
        return sorted(((v, [k]) for k, v in d.items() if v / total >= 0.01), reverse=True)

    hottest = sorted(syms, reverse=True)[:top]
    return "\n".join(
        [
            head,
            table("by process or thread", ["comm"], ranked(by_comm), total),
            table("by shared object", ["object"], ranked(by_dso), total),
            table("hottest symbols", ["comm", "object", "symbol"], hottest, total),
        ]
    )


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size-mib", type=int, default=4096)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--top", type=int, default=15, help="symbols listed per tool")
    p.add_argument("--no-drop-caches", action="store_true", help="keep the page cache (smoke runs)")
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "bench" / "profile-raw.md")
    args = p.parse_args()
    perf = ensure_perf()
    base = Path(tempfile.mkdtemp(prefix="csi-oci-profile-"))
    registry = Registry(base / "registry")
    sections = [
        f"## Profile of the raw artifact ({args.size_mib} MiB, {args.shards} shards), "
        f"`perf record -a -F {FREQ}` over the timed window\n"
    ]
    try:
        make_model(base / "model", args.size_mib << 20, args.shards)
        pushed = push_raw(Pusher(registry.host), base / "model")
        for tool, runner in TOOLS.items():
            work = base / tool.split()[0]
            work.mkdir()
            if not args.no_drop_caches:
                drop_caches()
            warm([registry.blob_path(d) for d in pushed.digests])
            data = base / f"{work.name}.perf"
            with WindowProfiler(perf, data):
                run = runner(pushed.ref, work, None)
            clean(work)
            sections.append(report(perf, data, tool, run, args.top))
            print(sections[-1], flush=True)
    finally:
        registry.stop()
        clean(base)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(sections))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
