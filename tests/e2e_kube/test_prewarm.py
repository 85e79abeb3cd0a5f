"""Pre-warm on a real Kubernetes (hack/e2e-kube): ImageCache objects, the node plugin
pulling and pinning ahead of pods, its status entry, the controller's summary.

Registry traffic is read from the test registry's own access log (every GET of a
blob by csi-oci), publish times from the driver's per-RPC log line, pins and
trees from the node store on the host (/var/lib/csi-oci, the DaemonSet's hostPath).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import File, Image, Layer, push_image
from tests.support.lazyfixtures import estargz_blob, make_layer_tar, push_lazy_image
from tests.support.registry import TEST_PASSWORD, TEST_USER, Registry

from . import kube
from .forward import Forwarder
from .kube import NS, apply, inline, reader_pod, sha256_tree, wait_running, wait_until

pytestmark = pytest.mark.e2e

STATE = Path("/var/lib/csi-oci")
STORE = STATE / "images" / "sha256"
GROUP = "oci.csi.dev/v1alpha1"
WARM_LABEL = "e2e.csi-oci/warm"


def push_model(registry: Registry, repo_tag: str, size: int, tmp: Path) -> tuple[str, dict]:
    files = {
        "models/config.json": json.dumps({"repo": repo_tag}).encode(),
        "models/weights.safetensors": os.urandom(size),
    }
    image = Image([Layer([File(name, data) for name, data in files.items()])])
    return push_image(registry, image, repo_tag, tmp), files


def image_cache(name: str, image: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": GROUP,
        "kind": "ImageCache",
        "metadata": {"name": name},
        "spec": {"image": image, **spec},
    }


def node_name() -> str:
    return str(kube.node_pod()["spec"]["nodeName"])


def entry(name: str) -> dict[str, Any] | None:
    """This node's entry in the ImageCache's status.nodes."""
    obj = kube.get("imagecache", name, ns=None)
    nodes = ((obj or {}).get("status") or {}).get("nodes") or []
    mine = [e for e in nodes if e.get("node") == node_name()]
    return mine[0] if mine else None


def phase_is(name: str, phase: str) -> Any:
    found = entry(name)
    return found if found and found.get("phase") == phase else None


def summary_of(name: str) -> dict[str, Any]:
    obj = kube.get("imagecache", name, ns=None) or {}
    return obj.get("status") or {}


def publish_seconds(pod: str) -> float:
    """NodePublishVolume's duration for the pod's volume, from the driver's RPC log line."""
    uid = kube.pod_uid(pod)
    logs = kube.kubectl("logs", "-n", "csi-oci", kube.node_pod()["metadata"]["name"], "-c",
                        "csi-oci", "--since=10m")  # fmt: skip
    pattern = re.compile(r"rpc=NodePublishVolume code=OK duration=([0-9.]+)s")
    found = [
        float(m.group(1))
        for line in logs.splitlines()
        if uid in line and (m := pattern.search(line))
    ]
    assert found, f"no NodePublishVolume line for pod {pod} ({uid})"
    return found[-1]


def node_cli(*args: str) -> str:
    """`csi-oci <args>` in the node plugin's csi-oci container (read-only commands)."""
    pod = kube.node_pod()["metadata"]["name"]
    return kube.kubectl("exec", "-n", "csi-oci", pod, "-c", "csi-oci", "--", "csi-oci",
                        *args, "--state-dir", str(STATE))  # fmt: skip


def pins() -> dict[str, list[str]]:
    path = STATE / "pins.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture(autouse=True)
def _cleanup(driver: str) -> Iterator[None]:
    yield
    kube.kubectl("delete", "pods", "--all", "-n", NS, "--wait=true", timeout=300)
    kube.kubectl("delete", "imagecaches", "--all", "--wait=true", timeout=120)
    kube.kubectl("label", "node", node_name(), f"{WARM_LABEL}-", check=False)


def test_prewarm_pulls_before_any_pod_then_the_pod_publishes_from_the_node(
    registry: Registry, anon: Forwarder, tmp_path: Path
) -> None:
    repo = "prewarm/llm"
    digest, files = push_model(registry, f"{repo}:v1", 24 * 2**20, tmp_path)
    image = f"{anon.host}/{repo}:v1"
    started = time.monotonic()
    apply(image_cache("llm", image, nodeSelector={"matchLabels": {"kubernetes.io/os": "linux"}}))
    ready = wait_until("ImageCache llm ready on the node", lambda: phase_is("llm", "Ready"), 300)
    warm_seconds = time.monotonic() - started
    assert ready["digest"] == digest and ready["percent"] == 100 and ready["pinned"] is True
    # Before any pod: the tree is in the store and pinned; each blob fetched once.
    assert (STORE / digest.removeprefix("sha256:") / "rootfs").is_dir()
    assert pins().get("imagecache/llm") == [digest]
    wait_until(  # /metrics serves a snapshot refreshed every few seconds
        "csi_oci_prewarm_entries{phase=Ready} and pinned bytes",
        lambda: (
            kube.metrics('phase="Ready"').get("csi_oci_prewarm_entries", 0) >= 1
            and kube.metrics().get("csi_oci_prewarm_pinned_bytes", 0) >= 24 * 2**20
        ),
        30,
    )
    fetched = registry.blob_gets(repo)
    assert fetched and set(fetched.values()) == {1}, fetched
    # The controller's summary, as kubectl get prints it.
    wait_until(
        "kubectl get imagecaches shows 1/1",
        lambda: "1/1" in kube.kubectl("get", "imagecaches", "llm", "--no-headers"),
        60,
    )
    row = kube.kubectl("get", "imagecaches", "llm", "--no-headers").split()
    assert row[1] == image and row[2] == digest and row[3] == "1/1", row
    # A pod of the same image: no blob traffic, published in well under a second.
    apply(reader_pod("warm", inline({"image": image})))
    wait_running("warm")
    assert sha256_tree("warm", "/models") == {
        n: hashlib.sha256(d).hexdigest() for n, d in files.items()
    }
    warm_publish = publish_seconds("warm")
    assert registry.blob_gets(repo) == fetched
    # The same size of model, not pre-warmed, for comparison.
    cold_digest, _ = push_model(registry, f"{repo}-cold:v1", 24 * 2**20, tmp_path)
    apply(reader_pod("cold", inline({"image": f"{anon.host}/{repo}-cold:v1"})))
    wait_running("cold")
    cold_publish = publish_seconds("cold")
    print(
        f"\nprewarm: ImageCache created -> Ready {warm_seconds:.1f}s; publish with pre-warm "
        f"{warm_publish:.3f}s, without {cold_publish:.3f}s (24 MiB model)"
    )
    assert warm_publish < 1.0, warm_publish
    # `csi-oci ls` on the node names the pin.
    listing = node_cli("ls")
    assert any(digest in line and "pinned by imagecache/llm" in line
               for line in listing.splitlines()), listing  # fmt: skip
    # Deleting the ImageCache unpins: with no pod left, nothing keeps the tree
    # (eviction itself, honouring pins, is tests/test_prewarm.py's: `csi-oci gc`
    # refuses to run beside a serving driver).
    kube.kubectl("delete", "pod", "warm", "-n", NS, "--wait=true", timeout=120)
    kube.kubectl("delete", "imagecache", "llm", "--wait=true")
    wait_until("pin of llm dropped", lambda: "imagecache/llm" not in pins(), 60)
    status = json.loads(node_cli("status"))
    (tree,) = [i for i in status["images"] if i["digest"] == digest]
    assert tree["volumes"] == 0
    assert "pinned by" not in node_cli("ls")
    assert cold_digest in {i["digest"] for i in status["images"]}


def test_prewarm_waits_for_the_node_label_and_lets_go_when_it_goes(
    registry: Registry, anon: Forwarder, tmp_path: Path
) -> None:
    repo = "prewarm/labelled"
    digest, _ = push_model(registry, f"{repo}:v1", 2 * 2**20, tmp_path)
    apply(
        image_cache(
            "labelled", f"{anon.host}/{repo}:v1",
            nodeSelector={"matchLabels": {WARM_LABEL: "yes"}},
        )
    )  # fmt: skip
    time.sleep(20)  # two label reads and many reconciliations: nothing may happen
    assert entry("labelled") is None
    assert not registry.blob_gets(repo)
    assert "imagecache/labelled" not in pins()
    kube.kubectl("label", "node", node_name(), f"{WARM_LABEL}=yes", "--overwrite")
    ready = wait_until("labelled ready", lambda: phase_is("labelled", "Ready"), 180)
    assert ready["digest"] == digest
    assert pins().get("imagecache/labelled") == [digest]
    kube.kubectl("label", "node", node_name(), f"{WARM_LABEL}-")
    wait_until("entry removed", lambda: entry("labelled") is None, 60)
    assert "imagecache/labelled" not in pins()
    wait_until("summary 0/0", lambda: summary_of("labelled").get("ready") == "0/0", 60)


def test_prewarm_status_shows_progress_and_failures(
    registry: Registry, slow: Forwarder, anon: Forwarder, tmp_path: Path
) -> None:
    repo = "prewarm/slow"
    push_model(registry, f"{repo}:v1", 12 * 2**20, tmp_path)  # ~48 s at 256 KiB/s
    apply(
        image_cache("slow", f"{slow.host}/{repo}:v1"),
        image_cache("missing", f"{anon.host}/{repo}:nope"),  # the repository exists
    )
    seen: list[int] = []

    def pulling_midway() -> bool:
        found = entry("slow")
        if found and found.get("phase") == "Pulling":
            seen.append(int(found.get("percent", 0)))
        return any(0 < p < 100 for p in seen)

    wait_until("slow ImageCache Pulling with a percent between 0 and 100", pulling_midway, 120, 1)
    failed = wait_until("missing ImageCache Failed", lambda: phase_is("missing", "Failed"), 120)
    assert "not found" in failed["message"] and "tag nope does not exist" in failed["message"]
    ready = wait_until("slow ready", lambda: phase_is("slow", "Ready"), 300)
    assert ready["percent"] == 100
    assert all(a <= b for a, b in itertools.pairwise(seen)), seen  # only forward
    wait_until("summary 0/1", lambda: summary_of("missing").get("ready") == "0/1", 60)


def test_prewarm_lazy_fills_the_layer_files_and_private_images_use_pull_secrets(
    registry: Registry, basic_registry: Registry, anon: Forwarder, basic: Forwarder,
    tmp_path: Path,
) -> None:  # fmt: skip
    """mode lazy: the image's lazy server fills every layer byte before a pod; the pod's
    lazy mount then reads with no registry traffic. pullSecrets: a Secret in the
    driver's namespace opens a private registry; without it, Failed says why."""
    files = {"models/config.json": b'{"lazy": 1}', "models/weights.bin": os.urandom(6 << 20)}
    blob = estargz_blob(make_layer_tar(files, dirs=["models"]), tmp_path)
    lazy_digest = push_lazy_image(registry, [blob], "prewarm/lazy:v1", tmp_path).digest
    lazy_image = f"{anon.host}/prewarm/lazy:v1"
    apply(image_cache("lazy", lazy_image, mode="lazy"))
    ready = wait_until("lazy pre-warm ready", lambda: phase_is("lazy", "Ready"), 240)
    assert ready["digest"] == lazy_digest and ready["percent"] == 100
    sent = registry.blob_bytes_sent("prewarm/lazy")
    assert sent >= len(blob.blob)
    apply(reader_pod("lazy-warm", inline({"image": lazy_image, "mode": "lazy"})))
    wait_running("lazy-warm")
    assert sha256_tree("lazy-warm", "/models") == {
        n: hashlib.sha256(d).hexdigest() for n, d in files.items()
    }
    assert registry.blob_bytes_sent("prewarm/lazy") == sent  # every byte was local
    # The private registry: the Secret lives in the driver's namespace.
    private_digest, _ = push_model(basic_registry, "prewarm/private:v1", 1 << 20, tmp_path)
    private = f"{basic.host}/prewarm/private:v1"
    auth = base64.b64encode(f"{TEST_USER}:{TEST_PASSWORD}".encode()).decode()
    config = {"auths": {basic.host: {"auth": auth}}}
    apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "e2e-prewarm-pull", "namespace": "csi-oci"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
        },
        image_cache("private", private, pullSecrets=["e2e-prewarm-pull"]),
        image_cache("private-nosecret", private),
    )
    try:
        ready = wait_until("private ready", lambda: phase_is("private", "Ready"), 120)
        assert ready["digest"] == private_digest
        failed = wait_until(
            "private without a secret Failed", lambda: phase_is("private-nosecret", "Failed"), 120
        )
        assert "refused access" in failed["message"], failed
    finally:
        kube.delete("secret", "e2e-prewarm-pull", ns="csi-oci")


def test_prewarm_that_cannot_fit_fails_and_evicts_nothing_pinned(
    registry: Registry, anon: Forwarder, tmp_path: Path
) -> None:
    """Two 150 MiB models under the e2e cache budget (256 MiB, conftest.py): the
    first is pinned; the second is refused with the puller's words, and the first
    stays in the store, pinned."""
    first, _ = push_model(registry, "prewarm/big-a:v1", 150 << 20, tmp_path)
    push_model(registry, "prewarm/big-b:v1", 150 << 20, tmp_path)
    apply(image_cache("big-a", f"{anon.host}/prewarm/big-a:v1"))
    wait_until("big-a ready", lambda: phase_is("big-a", "Ready"), 300)
    apply(image_cache("big-b", f"{anon.host}/prewarm/big-b:v1"))
    failed = wait_until("big-b Failed", lambda: phase_is("big-b", "Failed"), 300)
    assert "not enough space for image" in failed["message"], failed
    assert "raise --cache-max-bytes" in failed["message"]
    assert pins().get("imagecache/big-a") == [first]
    assert (STORE / first.removeprefix("sha256:") / "rootfs").is_dir()
    assert phase_is("big-a", "Ready")


def test_prewarm_refresh_follows_a_moved_tag_keeping_the_old_tree_until_the_new_one_is_in(
    registry: Registry, slow: Forwarder, tmp_path: Path
) -> None:
    """refresh: the tag is resolved again; the new digest is pulled (slowly, through
    the throttled forwarder) while the old tree stays pinned and reported Ready."""
    repo = "prewarm/moving"
    old, _ = push_model(registry, f"{repo}:latest", 1 << 20, tmp_path)
    apply(image_cache("moving", f"{slow.host}/{repo}:latest", refresh="60s"))
    wait_until("moving ready", lambda: phase_is("moving", "Ready"), 120)
    new, _ = push_model(registry, f"{repo}:latest", 6 << 20, tmp_path)  # ~24 s at 256 KiB/s
    pulling = wait_until(
        "the refresh pulls the new digest", lambda: phase_is("moving", "Pulling"), 150, 1
    )
    assert pulling["digest"] == old  # still what is ready
    assert sorted(pins()["imagecache/moving"]) == sorted([old, new])  # both, meanwhile
    assert (STORE / old.removeprefix("sha256:") / "rootfs").is_dir()
    ready = wait_until("moving ready again", lambda: phase_is("moving", "Ready"), 180)
    assert ready["digest"] == new
    assert pins()["imagecache/moving"] == [new]
