"""A short, bounded fuzz run of every target (tests/fuzz), and the saved reproducers.

* Every target fuzzes for a few seconds (two at a time, fresh corpus: the
  seeds only) and must report no finding; it must also have run clearly
  more inputs than its seeds, so a target that breaks before fuzzing (or
  rejects everything at once) cannot pass.
* Every input saved under tests/fuzz/regressions/<target>/ is replayed
  through its target: it must succeed or raise a CsiOciError, never anything
  else, never hang (CPU timer), never exhaust memory (address-space limit).

Long runs: hack/fuzz (600 s per target by default).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fuzz import TARGETS

REPO = Path(__file__).resolve().parents[1]
REGRESSIONS = REPO / "tests" / "fuzz" / "regressions"
SECONDS = 3.5  # per target
MIN_MUTATED = 100  # executions beyond the seed corpus


def _fuzz(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.fuzz", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory) -> dict:
    seeds = _fuzz("seeds", timeout=600)  # made by the reference tools once, then cached
    assert seeds.returncode == 0, seeds.stdout + seeds.stderr
    words = [line.split() for line in seeds.stdout.splitlines()]
    counts = {w[0]: int(w[1]) for w in words if len(w) == 3 and w[0] in TARGETS}
    tmp = tmp_path_factory.mktemp("fuzz")
    proc = _fuzz(
        "all",
        "--seconds",
        str(SECONDS),
        "--jobs",
        "2",
        "--stop-on-finding",
        "--corpus",
        str(tmp / "corpus"),
        "--artifacts",
        str(tmp / "findings"),
        "--logs",
        str(tmp / "logs"),
        "--report",
        str(tmp / "report.json"),
        timeout=300,
    )
    report = tmp / "report.json"
    assert report.is_file(), f"no report; exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return {"report": json.loads(report.read_text()), "seeds": counts, "output": proc.stdout}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.slow
def test_target_runs_without_findings(fuzz_run, target):
    r = fuzz_run["report"]["targets"][target]
    assert r["error"] is None, r["error"]
    floor = fuzz_run["seeds"][target] + MIN_MUTATED
    assert r["executions"] > floor, (
        f"{target} ran {r['executions']} inputs in {r['seconds']} s, not more than its "
        f"{fuzz_run['seeds'][target]} seeds + {MIN_MUTATED}:\n{fuzz_run['output']}"
    )
    findings = "\n".join(
        f"  {f['kind']}: {f['signature']}\n    {f['message']}\n    input: {f['artifact']}"
        f"\n    log: {f['log']}"
        for f in r["findings"]
    )
    assert not r["findings"], f"{target}: the fuzzer found\n{findings}"


def _regression_targets() -> list[str]:
    return [t for t in TARGETS if (REGRESSIONS / t).is_dir() and any((REGRESSIONS / t).iterdir())]


def test_regressions_are_laid_out_by_target():
    folders = (
        {p.name for p in REGRESSIONS.iterdir() if p.is_dir()} if REGRESSIONS.is_dir() else set()
    )
    assert folders <= set(TARGETS), f"unknown targets in {REGRESSIONS}: {folders - set(TARGETS)}"


@pytest.fixture(scope="module")
def replays() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every target's reproducers, replayed (one process per target, four at a time)."""
    targets = _regression_targets()
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = pool.map(lambda t: _fuzz("replay", t, str(REGRESSIONS / t), timeout=120), targets)
        return dict(zip(targets, done, strict=True))


@pytest.mark.parametrize("target", _regression_targets())
def test_regressions_replay_cleanly(replays, target):
    proc = replays[target]
    assert proc.returncode == 0, f"{target} reproducers still fail:\n{proc.stdout}\n{proc.stderr}"
