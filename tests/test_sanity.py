"""The official CSI sanity suite (kubernetes-csi/csi-test csi-sanity v5.5.0)
against `csi-oci serve --mode all`, with a small image in a loopback registry.

The image reference reaches the node tests the only way csi-sanity allows:
`--csi.testvolumeparameters` -> CreateVolume parameters -> our thin controller
copies them into volume_context -> NodePublishVolume.

Every spec that applies must pass. Skips are expected only for capabilities
csi-oci does not advertise; the test checks each skip's reason against that
list (and README documents it), so a new, unexplained skip fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.support.driver import Driver
from tests.support.images import Dir, File, Image, Layer, push_image
from tests.support.registry import INSTALL_HINT

REPO = Path(__file__).resolve().parent.parent
SANITY_BIN = REPO / ".cache" / "bin" / "csi-sanity"

# Skip reasons csi-sanity prints, each for a capability csi-oci does not offer.
EXPECTED_SKIP_REASONS = (
    "ControllerExpandVolume not supported",
    "ControllerModifyVolume not supported",
    "Service does not have single node multi writer capability",
    "NodeStageVolume not supported",
    "NodeUnstageVolume not supported",
    "NodeExpandVolume not supported",
    "GroupControllerService not supported",
    "GetSnapshot not supported",
    "GetCapacity not supported",
    "ListVolumes not supported",
    "capacity of the volume is unknown",
    "Snapshot not supported",
    "Volume Cloning not supported",
    "Modify volume not supported",
    "Modify Volume not supported",
    "ControllerPublishVolume not supported",
    "Controller Publish, UnpublishVolume not supported",
    "ControllerUnpublishVolume not supported",
    "CreateSnapshot not supported",
    "ListSnapshots not supported",
    "DeleteSnapshot not supported",
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="csi-sanity's node tests mount (root)")


def sanity_binary() -> Path:
    found = SANITY_BIN if SANITY_BIN.exists() else shutil.which("csi-sanity")
    if not found:
        pytest.fail(f"csi-sanity not found: {INSTALL_HINT}", pytrace=False)
    return Path(found)


@pytest.mark.slow
def test_csi_sanity(registry, tmp_path):
    img = Image([Layer([Dir("models"), File("models/config.json", b'{"sanity": true}')])])
    push_image(registry, img, "sanity/tiny:v1", tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(f"image: {registry.host}/sanity/tiny:v1\n")
    driver = Driver(tmp_path / "driver", mode="all")
    junit = tmp_path / "junit.xml"
    try:
        proc = subprocess.run(
            [
                str(sanity_binary()),
                f"--csi.endpoint=unix://{driver.socket}",
                f"--csi.testvolumeparameters={params}",
                f"--csi.mountdir={tmp_path / 'mnt'}",
                f"--csi.stagingdir={tmp_path / 'staging'}",
                f"--ginkgo.junit-report={junit}",
                "--ginkgo.no-color",
                "--ginkgo.timeout=15m",
            ],
            capture_output=True,
            text=True,
            timeout=20 * 60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        assert driver.stop() == 0
    summary = summarize(junit)
    (REPO / ".cache").mkdir(exist_ok=True)
    (REPO / ".cache" / "csi-sanity-summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\ncsi-sanity: {summary['counts']}")
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert summary["counts"].get("failed", 0) == 0
    assert summary["counts"].get("passed", 0) >= 31, summary["counts"]
    unexplained = [
        name
        for name, reason in summary["skipped"]
        if not any(r in reason for r in EXPECTED_SKIP_REASONS)
    ]
    assert unexplained == [], f"skips without a documented reason: {unexplained}"
    # the lifecycle specs that matter most for kubelet must have run, not skipped
    passed = " ".join(summary["passed"])
    for spec in (
        "Node Service should work",
        "should be idempotent",
        "should remove target path",
        # GET_VOLUME_STATS: each of its specs runs
        "NodeGetVolumeStats should fail when no volume id is provided",
        "NodeGetVolumeStats should fail when no volume path is provided",
        "NodeGetVolumeStats should fail when volume is not found",
        "NodeGetVolumeStats should fail when volume does not exist on the specified path",
    ):
        assert spec in passed, spec


def summarize(junit: Path) -> dict[str, object]:
    root = ET.parse(junit).getroot()
    counts: dict[str, int] = {}
    passed: list[str] = []
    skipped: list[tuple[str, str]] = []
    for case in root.iter("testcase"):
        status = case.get("status", "")
        counts[status] = counts.get(status, 0) + 1
        name = case.get("name", "").removeprefix("[It] ")
        if status == "passed":
            passed.append(name)
        elif status == "skipped":
            node = case.find("skipped")
            skipped.append((name, (node.get("message", "") if node is not None else "")))
    return {"counts": counts, "passed": passed, "skipped": skipped}
