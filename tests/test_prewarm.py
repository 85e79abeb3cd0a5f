"""Pre-warm's pure parts: the ImageCache as the node reads it, label selectors, the
controller's summary, and pins that outlive a call (eviction honours them, across
processes). The API calls and the node's reconciliation run against a real
Kubernetes in tests/e2e_kube (test_prewarm_* scenarios)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from csi_oci.errors import InvalidArgument
from csi_oci.prewarm.cache import LabelSelector, WarmMode, parse_image_cache, parse_selector
from csi_oci.prewarm.summary import summarize
from csi_oci.storage.pins import StorePins
from tests.support.images import File, Image, Layer, push_image


def cache(name="llm", **spec):
    return {
        "apiVersion": "oci.csi.dev/v1alpha1",
        "kind": "ImageCache",
        "metadata": {"name": name, "uid": "u-1", "generation": 1},
        "spec": {"image": "registry.example.com/models/llm:v1", **spec},
    }


def test_an_image_cache_is_parsed_like_volume_attributes():
    spec = parse_image_cache(
        cache(
            include=["*.json", "weights/*"],
            mode="lazy",
            pullSecrets=["models-pull"],
            platform="linux/arm64",
            refresh="30m",
            signaturePolicy="models",
            nodeSelector={"matchLabels": {"gpu": "a100"}},
        )
    )
    assert str(spec.reference) == "registry.example.com/models/llm:v1"
    assert spec.include == ("*.json", "weights/*")
    assert spec.mode is WarmMode.LAZY
    assert spec.pull_secrets == ("models-pull",)
    assert str(spec.platform) == "linux/arm64"
    assert spec.refresh == 1800
    assert spec.signature_rule == "models"
    assert parse_image_cache(cache(refresh="5s")).refresh == 60  # at most once a minute
    assert parse_image_cache(cache()).refresh is None


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"image": ""}, "spec.image is required"),
        ({"image": "UPPER/Case:x"}, "invalid"),
        ({"mode": "fast"}, "spec.mode"),
        ({"refresh": "1d"}, "spec.refresh"),
        ({"include": ["../etc"]}, "include pattern"),
        ({"pullSecrets": ["../x"]}, "not a Secret name"),
        ({"pullSecrets": [f"s{i}" for i in range(17)]}, "at most 16"),
        ({"platform": "linux"}, "invalid platform"),
        ({"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Gt"}]}}, "operator"),
        ({"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}, "needs values"),
        ({"nodeSelector": {"matchLabels": {"a": 1}}}, "matchLabels"),
    ],
)
def test_bad_image_caches_name_the_field(spec, error):
    with pytest.raises(InvalidArgument, match=error):
        parse_image_cache(cache(**spec))


def test_label_selectors_follow_kubernetes():
    labels = {"gpu": "a100", "zone": "eu-1", "spot": ""}
    assert LabelSelector().matches(labels)
    sel = parse_selector
    assert sel({"matchLabels": {"gpu": "a100"}}).matches(labels)
    assert not sel({"matchLabels": {"gpu": "h100"}}).matches(labels)
    exprs = [
        ({"key": "zone", "operator": "In", "values": ["eu-1", "eu-2"]}, True),
        ({"key": "zone", "operator": "NotIn", "values": ["eu-1"]}, False),
        ({"key": "missing", "operator": "NotIn", "values": ["x"]}, True),
        ({"key": "spot", "operator": "Exists"}, True),
        ({"key": "missing", "operator": "Exists"}, False),
        ({"key": "spot", "operator": "DoesNotExist"}, False),
        ({"key": "missing", "operator": "In", "values": ["x"]}, False),
    ]
    for expr, want in exprs:
        assert sel({"matchExpressions": [expr]}).matches(labels) is want, expr
    both = sel({"matchLabels": {"gpu": "a100"}, "matchExpressions": [exprs[1][0]]})
    assert not both.matches(labels)


def test_summary_counts_ready_nodes_out_of_selected_ones():
    nodes = {"n1": {"gpu": "a100"}, "n2": {"gpu": "a100"}, "n3": {"gpu": "t4"}}
    obj = cache(nodeSelector={"matchLabels": {"gpu": "a100"}})
    assert summarize(obj, nodes) == {
        "selectedNodes": 2, "readyNodes": 0, "ready": "0/2", "digest": ""
    }  # fmt: skip
    digest = "sha256:" + "a" * 64
    obj["status"] = {
        "nodes": [
            {"node": "n1", "phase": "Ready", "digest": digest},
            {"node": "n2", "phase": "Pulling"},
            {"node": "gone", "phase": "Ready", "digest": "sha256:" + "b" * 64},  # deleted node
            {"node": "n3", "phase": "Ready", "digest": digest},  # no longer selected
        ]
    }
    assert summarize(obj, nodes) == {
        "selectedNodes": 2, "readyNodes": 1, "ready": "1/2", "digest": digest
    }  # fmt: skip
    obj["status"]["nodes"][1] = {"node": "n2", "phase": "Ready", "digest": "sha256:" + "c" * 64}
    assert summarize(obj, nodes)["digest"] == "mixed"


def test_pins_survive_restarts_and_keep_trees_from_eviction(tmp_path, registry):
    """A tree pinned by an ImageCache is not evicted by `csi-oci gc --all` (another
    process); releasing the owner makes it evictable."""
    state = tmp_path / "state"
    digests = []
    cli = [sys.executable, "-m", "csi_oci.cli"]
    for n in range(2):
        image = Image([Layer([File(f"weights-{n}.bin", os.urandom(50_000))])])
        digests.append(push_image(registry, image, f"prewarm/pin{n}:v1", tmp_path))
        ref = f"{registry.host}/prewarm/pin{n}:v1"
        subprocess.run([*cli, "pull", "--state-dir", str(state), ref], check=True,
                       capture_output=True)  # fmt: skip
    pins = StorePins(state / "pins.json")
    pins.hold("imagecache/llm", [digests[0]])
    listing = subprocess.run([*cli, "ls", "--state-dir", str(state)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    assert "pinned by imagecache/llm" in listing.splitlines()[0] + listing.splitlines()[1]
    subprocess.run([*cli, "gc", "--all", "--state-dir", str(state)], check=True,
                   capture_output=True)  # fmt: skip
    left = {p.name for p in (state / "images" / "sha256").iterdir()}
    assert left == {digests[0].removeprefix("sha256:")}
    assert StorePins(state / "pins.json").keys() == {digests[0]}
    assert pins.release_all_but(set(), "imagecache/") == ["imagecache/llm"]
    subprocess.run([*cli, "gc", "--all", "--state-dir", str(state)], check=True,
                   capture_output=True)  # fmt: skip
    assert not list((state / "images" / "sha256").iterdir())
