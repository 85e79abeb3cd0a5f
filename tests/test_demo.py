"""The quick-start demo (``python -m hack.demo``) runs end to end against the real driver.

Only the demo is run here, not hack/quickstart: the install step needs apt
and network access, and CI has already run hack/install-deps.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="the demo bind-mounts the volume, which needs root",
)


@pytest.mark.slow
def test_demo_runs_end_to_end():
    proc = subprocess.Popen(
        [sys.executable, "-m", "hack.demo"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the demo then unmounts and stops the driver and registry.
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(
            f"hack/demo.py did not finish within {TIMEOUT}s:\n{out.decode(errors='replace')}"
        )
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"hack/demo.py exited {proc.returncode}:\n{text}"
    for name in ("config.json", "tokenizer.json", "model.safetensors", "README.md"):
        assert f"-- {name} " in text, f"{name} not shown in the mounted tree:\n{text}"
    assert "all 4 files match" in text, text
    mount_line = next(line for line in text.splitlines() if "mount options" in line)
    options = set(mount_line.rsplit(" ", 1)[-1].split(","))
    assert {"ro", "nosuid", "nodev"} <= options, mount_line
    assert "EROFS" in text, text
    assert "demo: OK" in text, text
