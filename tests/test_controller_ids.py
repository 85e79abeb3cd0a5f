"""Unit tests of the pure volume-id helpers in csi_oci/controller.py."""

from __future__ import annotations

import re

import pytest

from csi_oci.csi.controller import is_our_volume_id, volume_id_for

DRIVER = "oci.csi.example.com"
ID_RE = re.compile(r"^oci-[0-9a-f]{40}-[0-9a-f]{8}$")


def test_volume_id_shape_and_determinism():
    vid = volume_id_for(DRIVER, "pvc-0b7a1c2d")
    assert ID_RE.match(vid)
    assert vid == volume_id_for(DRIVER, "pvc-0b7a1c2d")
    assert len(vid) == 4 + 40 + 1 + 8  # well under the CSI 128-byte advice


def test_volume_id_depends_on_name_and_driver():
    names = ["pvc-1", "pvc-2", "", "a" * 1000, "ünïcødé", "pvc-1 "]
    ids = {volume_id_for(DRIVER, n) for n in names}
    assert len(ids) == len(names)
    other = volume_id_for("other.csi.example.com", "pvc-1")
    mine = volume_id_for(DRIVER, "pvc-1")
    assert other != mine
    # Same name part, different check value.
    assert other.split("-")[1] == mine.split("-")[1]
    assert other.split("-")[2] != mine.split("-")[2]


@pytest.mark.parametrize("name", ["pvc-1", "", "x" * 300, "with-many-dashes-in-it", "ünï"])
def test_own_ids_recognised(name):
    assert is_our_volume_id(DRIVER, volume_id_for(DRIVER, name))


@pytest.mark.parametrize(
    "volume_id",
    [
        "fake-vol-id-abc",
        "fake-vol-id",
        "",
        "oci",
        "oci--",
        "pvc-1",
        "oci-" + "0" * 40 + "-00000000",
        "oci-" + "0" * 40 + "-",
        "oci-" + "0" * 39 + "-abcdef01",
    ],
)
def test_foreign_ids_rejected(volume_id):
    assert not is_our_volume_id(DRIVER, volume_id)


def test_other_drivers_ids_rejected():
    vid = volume_id_for("other.csi.example.com", "pvc-1")
    assert is_our_volume_id("other.csi.example.com", vid)
    assert not is_our_volume_id(DRIVER, vid)
    assert not is_our_volume_id(DRIVER.upper(), volume_id_for(DRIVER, "pvc-1"))


def test_tampered_ids_rejected():
    vid = volume_id_for(DRIVER, "pvc-1")
    prefix, digest, check = vid.split("-")
    flip = {"0": "1"}

    def swap(c: str) -> str:
        return flip.get(c, "0")

    tampered = [
        f"{prefix}-{swap(digest[0])}{digest[1:]}-{check}",  # name digest changed
        f"{prefix}-{digest[:-1]}{swap(digest[-1])}-{check}",
        f"{prefix}-{digest}-{check[:-1]}{swap(check[-1])}",  # check value changed
        f"{prefix}-{digest}-{check.upper()}" if check != check.upper() else f"x{vid}",
        f"OCI-{digest}-{check}",
        f"oci-{digest}-{check}-extra",
        f"oci-{digest}{check}",
        f"oci-{digest}-{check} ",
        f" {vid}",
        f"oci-{digest.upper()}-{check}" if digest != digest.upper() else f"x{vid}",
        vid.replace("-", "_"),
        vid + "0",
        vid[:-1],
    ]
    for t in tampered:
        assert t != vid
        assert not is_our_volume_id(DRIVER, t), t
    # A valid check value does not transfer to another digest.
    other_digest = volume_id_for(DRIVER, "pvc-2").split("-")[1]
    assert not is_our_volume_id(DRIVER, f"oci-{other_digest}-{check}")
