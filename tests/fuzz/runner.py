"""Run targets in child processes (atheris.Fuzz never returns) and read libFuzzer's output.

One target's run is a loop of children: each fuzzes for the time left with
the persistent corpus and the seeds; a child that stops on a finding is
recorded (kind, signature, the input libFuzzer wrote) and, unless asked to
stop, a new child goes on with that signature let pass (CSI_OCI_FUZZ_KNOWN),
so one bug does not hide the next. Hangs and out-of-memory stops cannot be
let pass by signature; the loop ends after the same one three times.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import (
    CACHE,
    DICT_DIR_ENV,
    FINDING_MARK,
    HANG_ENV,
    KNOWN_ENV,
    REPO_ROOT,
    SCRATCH_ENV,
)

DEFAULT_TIMEOUT = 25  # libFuzzer -timeout: a backstop behind the harness's CPU timer
DEFAULT_RSS_MB = 1024
MAX_CHILDREN = 40

_STATUS = re.compile(
    r"^#(\d+)\s+(INITED|NEW|REDUCE|pulse|DONE|RELOAD)\s+(?:cov: (\d+) )?(?:ft: (\d+) )?"
    r"(?:corp: (\d+)/\S+ )?.*?exec/s: (\d+) rss: (\d+)Mb"
)
_EXECUTED = re.compile(r"^stat::number_of_executed_units:\s*(\d+)")
_PEAK_RSS = re.compile(r"^stat::peak_rss_mb:\s*(\d+)")
_WRITTEN = re.compile(r"Test unit written to (\S+)")
_ERROR = re.compile(r"==\d+== ERROR: libFuzzer: (.+)$")
_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


@dataclass
class Finding:
    kind: str  # exception | hang | memory | containment | timeout | oom | crash
    signature: str
    artifact: str | None = None
    exception: str = ""
    message: str = ""
    log: str = ""


@dataclass
class TargetReport:
    target: str
    executions: int = 0
    seconds: float = 0.0
    exec_per_s: float = 0.0
    cov: int | None = None
    ft: int | None = None
    corpus: int | None = None
    peak_rss_mb: int | None = None
    children: int = 0
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChildResult:
    executions: int = 0
    cov: int | None = None
    ft: int | None = None
    corpus: int | None = None
    peak_rss_mb: int | None = None
    finding: Finding | None = None
    returncode: int | None = None


def parse_output(text: str, log_path: str = "") -> ChildResult:
    """What one child's libFuzzer/atheris output says."""
    result = ChildResult()
    harness: dict[str, Any] | None = None
    artifact = None
    error = None
    lines = text.splitlines()
    frame = None
    for index, line in enumerate(lines):
        if m := _STATUS.match(line):
            result.executions = max(result.executions, int(m.group(1)))
            if m.group(3):
                result.cov = int(m.group(3))
            if m.group(4):
                result.ft = int(m.group(4))
            if m.group(5):
                result.corpus = int(m.group(5))
            result.peak_rss_mb = max(result.peak_rss_mb or 0, int(m.group(7)))
        elif m := _EXECUTED.match(line):
            result.executions = max(result.executions, int(m.group(1)))
        elif m := _PEAK_RSS.match(line):
            result.peak_rss_mb = max(result.peak_rss_mb or 0, int(m.group(1)))
        elif line.startswith(FINDING_MARK):
            try:
                harness = json.loads(line[len(FINDING_MARK) :])
            except ValueError:
                harness = {"kind": "exception", "signature": line[len(FINDING_MARK) :]}
        elif m := _WRITTEN.search(line):
            artifact = m.group(1)
        elif m := _ERROR.search(line):
            error = m.group(1).strip()
        elif "=== Timeout:" in line and frame is None:
            for follow in lines[index + 1 : index + 6]:
                if fm := _FRAME.search(follow):
                    frame = f"{_relative(fm.group(1))}:{fm.group(2)} ({fm.group(3)})"
                    break
    if harness is not None:
        result.finding = Finding(
            kind=str(harness.get("kind", "exception")),
            signature=str(harness.get("signature", "?")),
            artifact=artifact,
            exception=str(harness.get("exception", "")),
            message=str(harness.get("message", "")),
            log=log_path,
        )
    elif error is not None or artifact is not None:
        kind = "crash"
        if error and error.startswith("timeout"):
            kind = "timeout"
        elif error and error.startswith("out-of-memory"):
            kind = "oom"
        elif artifact and Path(artifact).name.startswith(("timeout-", "oom-", "slow-unit-")):
            kind = Path(artifact).name.split("-")[0]
        signature = kind + (f" at {frame}" if frame else "")
        result.finding = Finding(kind, signature, artifact, message=error or "", log=log_path)
    return result


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path


@dataclass
class Options:
    seconds: float
    corpus_root: Path = CACHE / "fuzz-corpus"
    artifacts_root: Path = CACHE / "fuzz-findings"
    logs_root: Path = CACHE / "fuzz-logs"
    timeout: int = DEFAULT_TIMEOUT
    rss_limit_mb: int = DEFAULT_RSS_MB
    hang_seconds: float | None = None
    stop_on_finding: bool = False
    max_children: int = MAX_CHILDREN
    extra: list[str] = field(default_factory=list)  # more libFuzzer flags


def run_target(target: str, opts: Options, say: Any = print) -> TargetReport:
    """Fuzz one target for opts.seconds (wall time, children included)."""
    from .seeds import seed_dir

    # The target module (and so csi_oci) is imported by the children only: this
    # process may run for hours while csi_oci changes under it.
    report = TargetReport(target)
    corpus = opts.corpus_root / target
    artifacts = opts.artifacts_root / target
    logs = opts.logs_root / target
    for folder in (corpus, artifacts, logs):
        folder.mkdir(parents=True, exist_ok=True)
    known_fd, known_name = tempfile.mkstemp(prefix=f"csi-oci-fuzz-known-{target}-", suffix=".txt")
    os.close(known_fd)
    known = Path(known_name)
    repeats: dict[str, int] = {}
    started = time.monotonic()
    try:
        while report.children < opts.max_children:
            left = opts.seconds - (time.monotonic() - started)
            if left < 1:
                break
            report.children += 1
            log_path = logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{report.children}.log"
            args = [
                f"-max_total_time={max(1, int(left))}",
                f"-timeout={opts.timeout}",
                f"-rss_limit_mb={opts.rss_limit_mb}",
                f"-artifact_prefix={artifacts}/",
                "-print_final_stats=1",
                "-print_pcs=0",
                *opts.extra,
                str(corpus),
                str(seed_dir(target)),
            ]
            scratch = tempfile.mkdtemp(prefix=f"csi-oci-fuzz-{target}-", dir=_tmpfs())
            env = dict(
                os.environ, **{KNOWN_ENV: str(known), DICT_DIR_ENV: str(logs), SCRATCH_ENV: scratch}
            )
            if opts.hang_seconds is not None:
                env[HANG_ENV] = str(opts.hang_seconds)
            cmd = [sys.executable, "-m", "tests.fuzz", "_child", target, "--", *args]
            try:
                child = _run_child(cmd, env, log_path, deadline=left + opts.timeout + 60)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            result = parse_output(child[1], str(log_path))
            result.returncode = child[0]
            report.executions += result.executions
            for name in ("cov", "ft", "corpus"):
                if getattr(result, name) is not None:
                    setattr(report, name, getattr(result, name))
            if result.peak_rss_mb is not None:
                report.peak_rss_mb = max(report.peak_rss_mb or 0, result.peak_rss_mb)
            finding = result.finding
            if finding is None:
                if child[0] not in (0, None) and result.executions == 0:
                    report.error = f"child exited {child[0]} without fuzzing; see {log_path}"
                    break
                continue
            repeats[finding.signature] = repeats.get(finding.signature, 0) + 1
            if repeats[finding.signature] == 1:
                report.findings.append(finding)
                say(f"fuzz {target}: {finding.kind}: {finding.signature} -> {finding.artifact}")
            if opts.stop_on_finding:
                break
            if finding.kind in ("exception", "hang", "memory", "containment"):
                with known.open("a") as f:
                    f.write(finding.signature + "\n")
            elif repeats[finding.signature] >= 3:
                say(f"fuzz {target}: {finding.signature} again; stopping this target")
                break
    finally:
        known.unlink(missing_ok=True)
    report.seconds = round(time.monotonic() - started, 1)
    report.exec_per_s = round(report.executions / report.seconds, 1) if report.seconds else 0.0
    return report


def _tmpfs() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _run_child(
    cmd: list[str], env: dict[str, str], log_path: Path, deadline: float
) -> tuple[int | None, str]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, log_path.read_text(errors="replace")


def _run_safely(target: str, opts: Options, say: Any) -> TargetReport:
    try:
        return run_target(target, opts, say)
    except Exception as exc:  # one broken target must not lose the others' figures
        say(f"fuzz {target}: could not run: {type(exc).__name__}: {exc}")
        return TargetReport(target, error=f"{type(exc).__name__}: {exc}")


def run_all(
    targets: list[str], opts: Options, jobs: int = 1, say: Any = print
) -> list[TargetReport]:
    if jobs <= 1:
        return [_run_safely(t, opts, say) for t in targets]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda t: _run_safely(t, opts, say), targets))


def table(reports: list[TargetReport]) -> str:
    head = ("target", "execs", "seconds", "exec/s", "cov", "ft", "corpus", "rss MB", "findings")
    rows = [head]
    for r in reports:
        rows.append(
            (
                r.target,
                str(r.executions),
                f"{r.seconds:.0f}",
                f"{r.exec_per_s:.0f}",
                str(r.cov if r.cov is not None else "-"),
                str(r.ft if r.ft is not None else "-"),
                str(r.corpus if r.corpus is not None else "-"),
                str(r.peak_rss_mb if r.peak_rss_mb is not None else "-"),
                str(len(r.findings)) + (" (error)" if r.error else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    for r in reports:
        for f in r.findings:
            out.append(f"  {r.target}: {f.kind}: {f.signature}")
            out.append(f"      input: {f.artifact}")
        if r.error:
            out.append(f"  {r.target}: ERROR {r.error}")
    return "\n".join(out)


def write_report(path: Path, reports: list[TargetReport], opts: Options) -> None:
    data = {
        "seconds_per_target": opts.seconds,
        "timeout": opts.timeout,
        "rss_limit_mb": opts.rss_limit_mb,
        "targets": {r.target: r.as_dict() for r in reports},
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
