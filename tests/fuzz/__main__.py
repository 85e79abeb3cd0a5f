"""``python -m tests.fuzz``: run, replay and seed the fuzz targets (run from the repo root).

    python -m tests.fuzz list
    python -m tests.fuzz seeds [--force]
    python -m tests.fuzz TARGET...|all [--seconds N] [--report out.json] [--jobs J]
            [--timeout S] [--rss-limit-mb M] [--hang-seconds S] [--corpus DIR]
            [--artifacts DIR] [--stop-on-finding] [-- LIBFUZZER_FLAGS...]
    python -m tests.fuzz replay TARGET FILE_OR_DIR... [--memory-mb M]

Exit status of a run: 0 no findings, 1 findings, 2 a target could not run.
``replay`` runs inputs in this process without atheris: each is "ok",
"refused" (a CsiOciError) or a "FINDING" (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from . import TARGETS


def _child(target: str, libfuzzer_args: list[str]) -> None:
    """Instrument the code under test, then hand over to libFuzzer (never returns)."""
    import importlib
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # the driver's warnings would drown libFuzzer's lines
    with atheris.instrument_imports(include=["csi_oci", "tarfile", "json", "oras"]):
        module = importlib.import_module(f"tests.fuzz.{TARGETS[target]}")
    from .common import DICT_DIR_ENV, guarded, write_dict

    flags = list(libfuzzer_args)
    if not any(f.startswith("-max_len=") for f in flags):
        flags.insert(0, f"-max_len={module.MAX_LEN}")
    dict_dir = os.environ.get(DICT_DIR_ENV)
    if dict_dir and module.DICT and not any(f.startswith("-dict=") for f in flags):
        flags.insert(0, f"-dict={write_dict(module.DICT, Path(dict_dir) / f'{target}.dict')}")
    atheris.Setup([sys.argv[0], *flags], guarded(module.target))
    atheris.Fuzz()


def _replay(target: str, paths: list[str], memory_mb: int) -> int:
    import logging
    import shutil
    import tempfile

    from .common import SCRATCH_ENV, outcome, scratch_root

    logging.disable(logging.CRITICAL)
    scratch = tempfile.mkdtemp(prefix=f"csi-oci-fuzz-replay-{target}-", dir=scratch_root())
    os.environ[SCRATCH_ENV] = scratch
    try:
        return _replay_files(target, paths, memory_mb, outcome)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _replay_files(target: str, paths: list[str], memory_mb: int, outcome: Any) -> int:
    import importlib
    import resource

    if memory_mb > 0:
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    module = importlib.import_module(f"tests.fuzz.{TARGETS[target]}")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    findings = 0
    for path in files:
        if path.name.endswith((".md", ".txt")) or path.name.startswith("."):
            continue
        status, detail = outcome(module.target, path.read_bytes())
        findings += status == "finding"
        first = detail.splitlines()[0] if detail else ""
        print(f"{'FINDING' if status == 'finding' else status:8} {path}  {first}")
        if status == "finding":
            print("\n".join("    " + line for line in detail.splitlines()[1:]))
    return 1 if findings else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        target = argv[1]
        rest = argv[2:]
        _child(target, rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]

    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("what", help="list | seeds | replay | all | TARGET")
    p.add_argument("args", nargs="*", help="more targets; replay: TARGET FILE_OR_DIR...")
    p.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    p.add_argument("--report", type=Path, help="write the figures as JSON here")
    p.add_argument("--jobs", type=int, default=1, help="targets run at once (default 1)")
    p.add_argument("--timeout", type=int, default=None, help="libFuzzer -timeout (s)")
    p.add_argument("--rss-limit-mb", type=int, default=None, help="libFuzzer -rss_limit_mb")
    p.add_argument("--hang-seconds", type=float, default=None, help="per-input CPU limit")
    p.add_argument("--corpus", type=Path, help="corpus root (default .cache/fuzz-corpus)")
    p.add_argument("--artifacts", type=Path, help="findings root (default .cache/fuzz-findings)")
    p.add_argument("--logs", type=Path, help="child logs root (default .cache/fuzz-logs)")
    p.add_argument("--stop-on-finding", action="store_true", help="one finding ends a target")
    p.add_argument("--force", action="store_true", help="seeds: regenerate")
    p.add_argument("--memory-mb", type=int, default=4096, help="replay: address-space limit")
    a = p.parse_args(argv)

    if a.what == "list":
        print("\n".join(TARGETS))
        return 0
    if a.what == "seeds":
        from .seeds import ensure

        counts = ensure(force=a.force)
        print("\n".join(f"{t:22} {n} seeds" for t, n in counts.items()))
        return 0
    if a.what == "replay":
        if len(a.args) < 2 or a.args[0] not in TARGETS:
            p.error(f"replay TARGET FILE_OR_DIR...; targets: {', '.join(TARGETS)}")
        return _replay(a.args[0], a.args[1:], a.memory_mb)
    names = [a.what, *a.args]
    targets = list(TARGETS) if "all" in names else list(dict.fromkeys(names))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target {' '.join(unknown)!r}; targets: {', '.join(TARGETS)}")

    from .runner import Options, run_all, table, write_report
    from .seeds import ensure

    ensure(log=lambda msg: print(msg, flush=True))
    opts = Options(seconds=a.seconds, stop_on_finding=a.stop_on_finding, extra=extra)
    if a.timeout is not None:
        opts.timeout = a.timeout
    if a.rss_limit_mb is not None:
        opts.rss_limit_mb = a.rss_limit_mb
    opts.hang_seconds = a.hang_seconds
    if a.corpus is not None:
        opts.corpus_root = a.corpus
    if a.artifacts is not None:
        opts.artifacts_root = a.artifacts
    if a.logs is not None:
        opts.logs_root = a.logs
    reports = run_all(targets, opts, a.jobs, say=lambda msg: print(msg, flush=True))
    print(table(reports))
    if a.report is not None:
        write_report(a.report, reports, opts)
    if any(r.error for r in reports):
        return 2
    return 1 if any(r.findings for r in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())
