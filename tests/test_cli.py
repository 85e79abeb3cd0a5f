"""`csi-oci pull | mount | umount | status` as a user runs them (root for mounts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from csi_oci import cli as cli_module
from tests.support.driver import Driver, mount_options
from tests.support.images import Dir, File, Image, Layer, push_image

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def cli(state, *args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "csi_oci.cli", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"csi-oci {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_pull_mount_status_umount(registry, tmp_path):
    img = Image(
        [Layer([Dir("models"), File("models/w.bin", b"weights" * 1000)], compression="zstd")]
    )
    digest = push_image(registry, img, "cli/model:v1", tmp_path)
    ref = f"{registry.host}/cli/model:v1"
    state = tmp_path / "state"

    out = cli(state, "pull", ref).stdout
    assert digest in out
    target = tmp_path / "mnt"
    cli(state, "mount", ref, str(target), "--sub-path", "models")
    try:
        assert (target / "w.bin").read_bytes() == b"weights" * 1000
        assert {"ro", "nosuid", "nodev"} <= (mount_options(target) or set())
        status = json.loads(cli(state, "status").stdout)
        assert status["images"][0]["digest"] == digest
        assert status["images"][0]["volumes"] == 1
        assert status["volumes"][0]["target_path"] == str(target)
    finally:
        cli(state, "umount", str(target))
    assert not target.exists()
    cli(state, "umount", str(target))  # idempotent
    status = json.loads(cli(state, "status").stdout)
    assert status["images"][0]["volumes"] == 0, "refcount drops with the volume record"


def test_errors_are_one_clear_line(registry, tmp_path):
    proc = cli(tmp_path / "s", "pull", f"{registry.host}/cli/absent:v1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("csi-oci: error:")
    assert "not found" in proc.stderr
    proc = cli(tmp_path / "s", "pull", "BAD REF", check=False)
    assert proc.returncode == 1 and "invalid image reference" in proc.stderr


@pytest.mark.slow
def test_refcounts_survive_a_restart_and_cli_refuses_a_busy_state_dir(registry, tmp_path):
    img = Image([Layer([File("f", b"x")])])
    digest = push_image(registry, img, "cli/shared:v1", tmp_path)
    d = Driver(tmp_path / "drv")
    try:
        targets = [tmp_path / f"t{i}" for i in range(2)]
        for i, t in enumerate(targets):
            d.publish(t, {"image": f"{registry.host}/cli/shared:v1"}, volume_id=f"v{i}")
        d.restart(hard=True)
        status = json.loads(cli(d.state_dir, "status").stdout)
        assert {i["digest"]: i["volumes"] for i in status["images"]}[digest] == 2
        proc = cli(d.state_dir, "pull", f"{registry.host}/cli/shared:v1", check=False)
        assert proc.returncode == 1 and "in use by another csi-oci process" in proc.stderr
        for i, t in enumerate(targets):
            d.unpublish(t, volume_id=f"v{i}")
    finally:
        d.stop()


@pytest.mark.parametrize("command", ["serve", "lazy-server", "pull", "mount", "gc"])
def test_every_subcommand_help_renders(command, capsys):
    # Options shared by the subcommands suppress their defaults there; a help
    # text that still said %(default)s made --help crash with KeyError.
    with pytest.raises(SystemExit) as exc:
        cli_module.main([command, "--help"])
    assert exc.value.code == 0
    assert "--state-dir" in capsys.readouterr().out
