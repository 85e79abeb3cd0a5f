"""csi-oci on a real Kubernetes v1.30 node (hack/e2e-kube): what pods see.

Every scenario creates its objects with kubectl and checks results from the
outside: sha256 of every file as read inside the pod against the bytes that
were pushed, pod events, the host's mount table, the node store on the host
(/var/lib/csi-oci, the DaemonSet's hostPath) and the node plugin's /metrics.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import File, Image, Layer, push_image
from tests.support.lazyfixtures import estargz_blob, make_layer_tar, push_lazy_image
from tests.support.producers import Pushed, modctl_push
from tests.support.registry import TEST_PASSWORD, TEST_USER, Registry
from tests.support.signing import cosign_sign_key

from . import kube
from .conftest import SignaturePolicy, wait_driver_ready, wait_policy_mounted
from .forward import Forwarder
from .kube import NS, apply, delete, exec_pod, inline, reader_pod, sha256_tree, wait_running

pytestmark = pytest.mark.e2e

STORE = Path("/var/lib/csi-oci/images/sha256")
PODS_DIR = "/var/lib/kubelet/pods"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_files(seed: str, big: int = 3 * 2**20) -> dict[str, bytes]:
    """A small "model": config, tokenizer and two weight shards of random bytes."""
    rand = os.urandom
    return {
        "models/config.json": json.dumps({"seed": seed, "hidden_size": 64}).encode(),
        "models/tokenizer.json": json.dumps({"vocab": [seed] * 100}).encode(),
        "models/weights-00001-of-00002.safetensors": rand(big),
        "models/weights-00002-of-00002.safetensors": rand(big // 3),
    }


def push_model(registry: Registry, repo_tag: str, files: dict[str, bytes], tmp: Path) -> str:
    image = Image([Layer([File(name, data) for name, data in files.items()])])
    return push_image(registry, image, repo_tag, tmp)


def ref(fwd: Forwarder, repo_tag: str) -> str:
    return f"{fwd.host}/{repo_tag}"


def volume_mount_path(pod: str, volume: str = "model") -> str:
    return f"{PODS_DIR}/{kube.pod_uid(pod)}/volumes/kubernetes.io~csi/{volume}/mount"


@pytest.fixture(scope="module")
def model(registry: Registry, tmp_path_factory) -> tuple[str, dict[str, str]]:
    """One model image for the basic scenarios: (repo:tag, {path: sha256})."""
    files = model_files("basic")
    push_model(registry, "models/tiny:v1", files, tmp_path_factory.mktemp("model"))
    return "models/tiny:v1", {name: _sha(data) for name, data in files.items()}


@pytest.fixture(autouse=True)
def _cleanup_pods(driver: str) -> Iterator[None]:
    yield
    kube.kubectl("delete", "pods", "--all", "-n", NS, "--wait=true", timeout=300)


def static_pv_and_claim(claim: str, attributes: dict[str, str]) -> tuple[dict, dict]:
    """A read-only CSI PersistentVolume `e2e-<claim>` and the claim `claim` bound to it."""
    pv = f"e2e-{claim}"
    return (
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "csi": {
                    "driver": kube.DRIVER,
                    "volumeHandle": pv,
                    "readOnly": True,
                    "volumeAttributes": attributes,
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": NS},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )


def test_static_pv_pvc_pod_reads_every_file(model, anon: Forwarder) -> None:
    repo_tag, expected = model
    apply(
        *static_pv_and_claim("static-tiny", {"image": ref(anon, repo_tag)}),
        reader_pod(
            "static", {"persistentVolumeClaim": {"claimName": "static-tiny", "readOnly": True}}
        ),
    )
    try:
        wait_running("static")
        assert sha256_tree("static", "/models") == expected
        # Read-only inside the pod, whatever the container asks.
        out = exec_pod("static", "touch /models/x 2>&1; echo rc=$?")
        assert "Read-only file system" in out and "rc=1" in out
    finally:
        # A PV's attributes are immutable: a later run on the same cluster (a new
        # forwarder port) must be able to create it again.
        delete("pod", "static")
        delete("pvc", "static-tiny")
        delete("pv", "e2e-static-tiny", ns=None)


def test_inline_ephemeral_volume(model, anon: Forwarder) -> None:
    repo_tag, expected = model
    apply(reader_pod("inline", inline({"image": ref(anon, repo_tag), "subPath": "models"})))
    wait_running("inline")
    # subPath: the volume root is the image's models/ directory.
    assert sha256_tree("inline", "/models") == {
        name.removeprefix("models/"): digest for name, digest in expected.items()
    }


def test_dynamic_pvc_from_storageclass(model, anon: Forwarder) -> None:
    repo_tag, expected = model
    apply(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": "e2e-oci-tiny"},
            "provisioner": kube.DRIVER,
            "parameters": {"image": ref(anon, repo_tag)},
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "dynamic-tiny", "namespace": NS},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "e2e-oci-tiny",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
        reader_pod(
            "dynamic", {"persistentVolumeClaim": {"claimName": "dynamic-tiny", "readOnly": True}}
        ),
    )
    wait_running("dynamic")
    assert sha256_tree("dynamic", "/models") == expected
    pvc = kube.get("pvc", "dynamic-tiny")
    assert pvc is not None and pvc["status"]["phase"] == "Bound"
    pv = kube.get("pv", pvc["spec"]["volumeName"], ns=None)
    assert pv is not None and pv["spec"]["csi"]["driver"] == kube.DRIVER
    assert pv["spec"]["csi"]["volumeAttributes"]["image"] == ref(anon, repo_tag)


def test_two_pods_one_image_one_pull(registry: Registry, anon: Forwarder, tmp_path: Path) -> None:
    files = model_files("shared")
    digest = push_model(registry, "models/shared:v1", files, tmp_path)
    before = kube.metrics().get("csi_oci_pulls_total", 0.0)
    volume = inline({"image": ref(anon, "models/shared:v1")})
    apply(reader_pod("shared-a", volume), reader_pod("shared-b", volume))
    wait_running("shared-a")
    wait_running("shared-b")
    expected = {name: _sha(data) for name, data in files.items()}
    assert sha256_tree("shared-a", "/models") == expected
    assert sha256_tree("shared-b", "/models") == expected
    assert kube.metrics().get("csi_oci_pulls_total", 0.0) - before == 1
    # One tree in the host's store for the image, bind-mounted into both pods.
    assert (STORE / digest.removeprefix("sha256:") / "rootfs").is_dir()


def test_modelpack_artifact(registry: Registry, anon: Forwarder, tmp_path: Path) -> None:
    files = {
        "config.json": b'{"architectures": ["E2E"]}',
        "model.safetensors": os.urandom(2 * 2**20),
        "README.md": b"# e2e ModelPack\n",
    }
    modctl_push(registry, "models/modelpack:v1", tmp_path, files)
    apply(reader_pod("modelpack", inline({"image": ref(anon, "models/modelpack:v1")})))
    wait_running("modelpack")
    assert sha256_tree("modelpack", "/models") == {n: _sha(d) for n, d in files.items()}


def test_estargz_image_lazy_mode(registry: Registry, anon: Forwarder, tmp_path: Path) -> None:
    files = {"models/config.json": b'{"lazy": true}', "models/weights.bin": os.urandom(4 * 2**20)}
    blob = estargz_blob(make_layer_tar(files, dirs=["models"]), tmp_path)
    push_lazy_image(registry, [blob], "models/lazy:v1", tmp_path)
    volume = inline({"image": ref(anon, "models/lazy:v1"), "mode": "lazy", "subPath": "models"})
    apply(reader_pod("lazy", volume))
    wait_running("lazy")
    got = sha256_tree("lazy", "/models")
    assert got == {n.removeprefix("models/"): _sha(d) for n, d in files.items()}
    # Served by the lazy server (FUSE), not an unpacked tree.
    mount = volume_mount_path("lazy")
    fstypes = [line.split(" - ")[1].split()[0] for line in _mountinfo(mount)]
    assert fstypes and all(t.startswith("fuse") for t in fstypes), fstypes
    kube.wait_until(  # /metrics serves a snapshot refreshed every few seconds
        "csi_oci_volumes_published counts the volume",
        lambda: kube.metrics().get("csi_oci_volumes_published", 0) >= 1,
        20,
    )


def _mountinfo(point: str) -> list[str]:
    return [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == point
    ]


def _dockerconfig_secret(name: str, host: str, user: str, password: str) -> dict:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = {"auths": {host: {"username": user, "password": password, "auth": auth}}}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
    }


def test_private_registry_with_dockerconfigjson_secret(
    basic_registry: Registry, basic: Forwarder, tmp_path: Path
) -> None:
    files = model_files("private", big=2**20)
    push_model(basic_registry, "private/model:v1", files, tmp_path)
    # Its own image: one the node already holds is served from the store
    # without asking the registry (pullPolicy IfNotPresent, as kubelet does
    # for container images before 1.33's ensureSecretPulledImages).
    push_model(basic_registry, "private/other:v1", model_files("other", big=1024), tmp_path)
    apply(
        _dockerconfig_secret("pull-ok", basic.host, TEST_USER, TEST_PASSWORD),
        _dockerconfig_secret("pull-wrong", basic.host, TEST_USER, "not-the-password"),
        reader_pod("private-ok", inline({"image": ref(basic, "private/model:v1")}, "pull-ok")),
        reader_pod(
            "private-wrong", inline({"image": ref(basic, "private/other:v1")}, "pull-wrong")
        ),
    )
    wait_running("private-ok")
    assert sha256_tree("private-ok", "/models") == {n: _sha(d) for n, d in files.items()}

    def auth_event() -> str | None:
        for message in kube.event_messages("private-wrong"):
            if "refused access to image" in message and "with the given credentials" in message:
                return message
        return None

    message = kube.wait_until("FailedMount event naming the credentials", auth_event, 120)
    assert basic.host in message and "nodePublishSecretRef" in message
    assert kube.pod_phase("private-wrong") == "Pending"


def test_delete_pod_unmounts_and_cleans_target_store_keeps_image(model, anon: Forwarder) -> None:
    repo_tag, _ = model
    apply(reader_pod("deleted", inline({"image": ref(anon, repo_tag)})))
    wait_running("deleted")
    uid = kube.pod_uid("deleted")
    target = volume_mount_path("deleted")
    assert _mountinfo(target), f"{target} is not a mount point on the host"
    store_trees = set(os.listdir(STORE))
    delete("pod", "deleted")
    pod_dir = f"{PODS_DIR}/{uid}"
    kube.wait_until("pod directory gone", lambda: not os.path.exists(pod_dir), 120)
    assert kube.host_mounts_under(pod_dir) == []
    # The node store keeps the tree until garbage collection wants the space.
    assert set(os.listdir(STORE)) == store_trees
    kube.wait_until(  # a snapshot, refreshed every few seconds
        "csi_oci_store_images counts the tree",
        lambda: kube.metrics().get("csi_oci_store_images", 0) >= 1,
        20,
    )


READ_LOOP = (
    "while true; do"
    " if find /models -type f -exec sha256sum {} + > /tmp/sums.new 2>>/tmp/errors;"
    " then mv /tmp/sums.new /tmp/sums; date +%s > /tmp/ok; fi;"
    " sleep 0.5; done"
)


def _sums(pod: str) -> dict[str, str]:
    out = exec_pod(pod, "cat /tmp/sums")
    return {
        file.removeprefix("/models/"): digest
        for digest, _, file in (line.partition("  ") for line in out.splitlines())
    }


def test_driver_restart_while_pods_read(
    model, registry: Registry, anon: Forwarder, tmp_path: Path
) -> None:
    repo_tag, expected = model
    lazy_files = {"models/weights.bin": os.urandom(2 * 2**20), "models/config.json": b"{}"}
    blob = estargz_blob(make_layer_tar(lazy_files, dirs=["models"]), tmp_path)
    push_lazy_image(registry, [blob], "models/lazy-restart:v1", tmp_path)
    lazy_volume = inline({"image": ref(anon, "models/lazy-restart:v1"), "mode": "lazy"})
    apply(
        reader_pod("reads-unpacked", inline({"image": ref(anon, repo_tag)}), command=READ_LOOP),
        # A container sees a lazy volume bound again after the restart only
        # through HostToContainer propagation (docs/modes-and-cache.md).
        reader_pod("reads-lazy", lazy_volume, command=READ_LOOP, propagation="HostToContainer"),
    )
    wait_running("reads-unpacked")
    wait_running("reads-lazy")
    old = kube.node_pod()["metadata"]["name"]
    delete("pod", old, ns="csi-oci")
    wait_driver_ready()
    assert kube.node_pod()["metadata"]["name"] != old
    restarted = time.time()

    def lazy_reads_again() -> bool:
        return int(exec_pod("reads-lazy", "cat /tmp/ok")) > restarted

    kube.wait_until("lazy volume readable again", lazy_reads_again, 60, every=1)
    # Unpacked volumes are plain bind mounts: not one failed read.
    assert exec_pod("reads-unpacked", "cat /tmp/errors") == ""
    assert _sums("reads-unpacked") == expected
    assert _sums("reads-lazy") == {n: _sha(d) for n, d in lazy_files.items()}


def test_pull_longer_than_kubelets_call_timeout(
    registry: Registry, slow: Forwarder, tmp_path: Path
) -> None:
    # ~36 MiB of random bytes through a 256 KiB/s registry: ~2.4 minutes.
    files = {"models/big.bin": os.urandom(36 * 2**20), "models/config.json": b"{}"}
    push_model(registry, "models/slow:v1", files, tmp_path)
    started = time.monotonic()
    apply(reader_pod("slow", inline({"image": ref(slow, "models/slow:v1")})))
    wait_running("slow", timeout=600)
    elapsed = time.monotonic() - started
    assert elapsed > 120, f"the pull took only {elapsed:.0f}s: not slower than kubelet's timeout"
    assert sha256_tree("slow", "/models") == {n: _sha(d) for n, d in files.items()}
    events = kube.event_messages("slow")
    assert any("in progress" in e for e in events), events


def _kubelet_volume_stats(pvc: str) -> dict[str, float]:
    """kubelet's kubelet_volume_stats_* for one PVC of the test namespace (its /metrics)."""
    node = kube.node_pod()["spec"]["nodeName"]
    text = kube.kubectl("get", "--raw", f"/api/v1/nodes/{node}/proxy/metrics")
    found = {}
    for line in text.splitlines():
        if not line.startswith("kubelet_volume_stats_"):
            continue
        name_labels, _, value = line.rpartition(" ")
        if f'persistentvolumeclaim="{pvc}"' in name_labels and f'namespace="{NS}"' in name_labels:
            found[name_labels.split("{", 1)[0]] = float(value)
    return found


def test_volume_stats_and_condition_reach_kubelet(
    registry: Registry, flaky: Forwarder, tmp_path: Path
) -> None:
    """NodeGetVolumeStats feeds kubelet_volume_stats_*; an abnormal condition (a lazy
    volume whose registry is gone) becomes kubelet's metric and a pod event."""
    files = {"models/config.json": b'{"stats": true}', "models/weights.bin": os.urandom(3 << 20)}
    blob = estargz_blob(make_layer_tar(files, dirs=["models"]), tmp_path)
    push_lazy_image(registry, [blob], "models/stats:v1", tmp_path)
    image = ref(flaky, "models/stats:v1")
    apply(
        *static_pv_and_claim("stats-lazy", {"image": image, "mode": "lazy", "prefetch": "none"}),
        reader_pod(
            "stats", {"persistentVolumeClaim": {"claimName": "stats-lazy", "readOnly": True}}
        ),
    )
    try:
        wait_running("stats")
        assert exec_pod("stats", "cat /models/models/config.json") == '{"stats": true}'
        # bytes and inodes of the tree the pod sees: /, models/ and the two files
        want_bytes = sum(len(d) for d in files.values())

        def counted() -> dict[str, float] | None:
            got = _kubelet_volume_stats("stats-lazy")
            return got if got.get("kubelet_volume_stats_used_bytes") == want_bytes else None

        got = kube.wait_until("kubelet_volume_stats_used_bytes of the PVC", counted, 90)
        assert got["kubelet_volume_stats_capacity_bytes"] == want_bytes
        assert got["kubelet_volume_stats_available_bytes"] == 0
        assert got["kubelet_volume_stats_inodes_used"] == 4
        assert got.get("kubelet_volume_stats_health_status_abnormal") == 0
        # The registry goes away; a read of bytes not fetched yet fails.
        flaky.refuse()
        out = exec_pod("stats", "cat /models/models/weights.bin > /dev/null 2>&1; echo rc=$?")
        assert "rc=0" not in out, out

        def abnormal_event() -> str | None:
            # (events outlive pods: an earlier run's "stats" pod named another registry)
            for message in kube.event_messages("stats"):
                if message.startswith(f"VolumeConditionAbnormal: Volume model: reads of {image} "):
                    return message
            return None

        message = kube.wait_until("VolumeConditionAbnormal event", abnormal_event, 120)
        assert f"reads of {image} fail since" in message, message
        assert f"cannot connect to registry {flaky.host}" in message, message
        kube.wait_until(
            "kubelet_volume_stats_health_status_abnormal is 1",
            lambda: (
                _kubelet_volume_stats("stats-lazy").get(
                    "kubelet_volume_stats_health_status_abnormal"
                )
                == 1
            ),
            60,
        )
        # The registry is back: the read works and the condition clears.
        flaky.refuse(False)
        assert _sha(_exec_bytes("stats", "/models/models/weights.bin")) == _sha(
            files["models/weights.bin"]
        )
        kube.wait_until(
            "kubelet_volume_stats_health_status_abnormal back to 0",
            lambda: (
                _kubelet_volume_stats("stats-lazy").get(
                    "kubelet_volume_stats_health_status_abnormal"
                )
                == 0
            ),
            60,
        )
    finally:
        flaky.refuse(False)
        delete("pod", "stats")
        delete("pvc", "stats-lazy")
        delete("pv", "e2e-stats-lazy", ns=None)


def _exec_bytes(pod: str, path: str) -> bytes:
    return base64.b64decode(exec_pod(pod, f"base64 {path}"))


def _driver_pid() -> int:
    """The host pid of the node plugin's `csi-oci serve` (the csi-oci container)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"serve" in args
            and b"--mode=node" in args
            and b"--endpoint=unix:///csi/csi.sock" in args
        ):
            found.append(int(proc.name))
    assert len(found) == 1, found
    return found[0]


def _restarts(pod: dict, container: str) -> int:
    for status in pod["status"].get("containerStatuses") or []:
        if status["name"] == container:
            return int(status.get("restartCount", 0))
    raise AssertionError(f"no container {container} in {pod['metadata']['name']}")


def test_liveness_probe_restarts_a_driver_whose_socket_stops_answering(model, anon) -> None:
    """The real livenessprobe sidecar calls Probe on the socket; a driver that stops
    answering (SIGSTOP: the socket accepts, nothing replies) is restarted by kubelet,
    and published volumes keep serving meanwhile."""
    import signal

    repo_tag, expected = model
    apply(reader_pod("alive", inline({"image": ref(anon, repo_tag)})))
    wait_running("alive")
    pod = kube.node_pod()
    name, before = pod["metadata"]["name"], _restarts(pod, "csi-oci")
    pid = _driver_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        kube.wait_until(
            "kubelet restarts the csi-oci container",
            lambda: _restarts(kube.node_pod(), "csi-oci") > before,
            300,
            every=5,
        )
    finally:
        try:  # if kubelet did not kill it, let it run again
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    events = kube.event_messages(name, ns="csi-oci")
    assert any(e.startswith("Unhealthy: Liveness probe failed") for e in events), events
    wait_driver_ready()
    assert _driver_pid() != pid
    # The unpacked volume was a bind mount all along.
    assert sha256_tree("alive", "/models") == expected
    # And the restarted driver publishes again.
    apply(reader_pod("alive-after", inline({"image": ref(anon, repo_tag)})))
    wait_running("alive-after")
    assert sha256_tree("alive-after", "/models") == expected


def test_daemonset_upgrade_while_pods_read(
    model, registry: Registry, anon: Forwarder, tmp_path: Path
) -> None:
    """A rolling update of the node plugin to a new image while pods read: unpacked
    volumes never fail a read; lazy volumes (HostToContainer) read again once the new
    lazy-server binds them, with the same bytes."""
    repo_tag, expected = model
    lazy_files = {"models/weights.bin": os.urandom(2 * 2**20), "models/config.json": b"{}"}
    blob = estargz_blob(make_layer_tar(lazy_files, dirs=["models"]), tmp_path)
    push_lazy_image(registry, [blob], "models/lazy-upgrade:v1", tmp_path)
    lazy_volume = inline({"image": ref(anon, "models/lazy-upgrade:v1"), "mode": "lazy"})
    apply(
        reader_pod("up-unpacked", inline({"image": ref(anon, repo_tag)}), command=READ_LOOP),
        reader_pod("up-lazy", lazy_volume, command=READ_LOOP, propagation="HostToContainer"),
    )
    wait_running("up-unpacked")
    wait_running("up-lazy")
    ds = kube.get("daemonset", "csi-oci-node", ns="csi-oci")
    assert ds is not None
    containers = {c["name"]: c["image"] for c in ds["spec"]["template"]["spec"]["containers"]}
    old_image = containers["csi-oci"]
    new_image = f"{old_image}-next"
    old_pod = kube.node_pod()["metadata"]["name"]
    targets = [f"{name}={new_image}" for name in ("csi-oci", "lazy-server") if name in containers]
    kube.kubectl("set", "image", "-n", "csi-oci", "daemonset/csi-oci-node", *targets)
    try:
        wait_driver_ready()
        pod = kube.node_pod()
        assert pod["metadata"]["name"] != old_pod
        images = {c["name"]: c["image"] for c in pod["spec"]["containers"]}
        assert images["csi-oci"] == new_image
        upgraded = time.time()

        def lazy_reads_again() -> bool:
            return int(exec_pod("up-lazy", "cat /tmp/ok")) > upgraded

        kube.wait_until("lazy volume readable after the upgrade", lazy_reads_again, 90, every=1)
        assert exec_pod("up-unpacked", "cat /tmp/errors") == ""
        assert _sums("up-unpacked") == expected
        assert _sums("up-lazy") == {n: _sha(d) for n, d in lazy_files.items()}
        # The upgraded driver publishes new volumes.
        apply(reader_pod("up-after", inline({"image": ref(anon, repo_tag)})))
        wait_running("up-after")
        assert sha256_tree("up-after", "/models") == expected
    finally:
        back = [f"{name}={old_image}" for name in ("csi-oci", "lazy-server") if name in containers]
        kube.kubectl("set", "image", "-n", "csi-oci", "daemonset/csi-oci-node", *back)
        wait_driver_ready()


def test_signed_model_runs_unsigned_stays_pending_until_signed(
    registry: Registry, anon: Forwarder, signature_policy: SignaturePolicy, tmp_path: Path
) -> None:
    """Signatures at mount, configured as a user does (chart values signatures.policy
    and signatures.files, conftest): the rule covers <anon>/signed/ only.  A model
    signed by the trusted key runs; an unsigned one stays Pending with a FailedMount
    event naming the rule and the digest, and nothing of it is pulled; signed later,
    kubelet's next mount retry publishes it."""
    policy = signature_policy
    wait_policy_mounted(policy)
    signed_files = model_files("signed", big=2**20)
    later_files = model_files("signed-later", big=2**20)
    signed_digest = push_model(registry, "signed/model:v1", signed_files, tmp_path)
    later_digest = push_model(registry, "signed/later:v1", later_files, tmp_path)
    # cosign signs through the registry's own address: only the digest binds.
    cosign_sign_key(
        registry, Pushed(f"{registry.host}/signed/model:v1", signed_digest), tmp_path, policy.key
    )
    later = ref(anon, "signed/later:v1")
    assert later.startswith(policy.prefix + "/")
    apply(
        reader_pod("signed", inline({"image": ref(anon, "signed/model:v1")})),
        reader_pod("unsigned", inline({"image": later})),
    )
    wait_running("signed")
    assert sha256_tree("signed", "/models") == {n: _sha(d) for n, d in signed_files.items()}

    def refused() -> str | None:
        # (events outlive pods: an earlier run's "unsigned" pod named another digest)
        for message in kube.event_messages("unsigned"):
            if message.startswith("FailedMount:") and later_digest in message:
                return message
        return None

    message = kube.wait_until("FailedMount event naming the signature rule", refused, 120)
    assert "rpc error: code = PermissionDenied desc = " in message, message
    assert (
        f"image {later} ({later_digest}) refused by signature rule '{policy.rule}': "
        "no cosign signature found"
    ) in message, message
    assert "wanted a cosign signature by key e2e-release.pub" in message, message
    assert kube.pod_phase("unsigned") == "Pending"
    # Refused before the pull: the node store has no tree of it.
    assert not (STORE / later_digest.removeprefix("sha256:")).exists()
    # Signed now: kubelet retries the mount (backoff from 0.5 s, doubling) and it runs.
    signed_at = time.monotonic()
    cosign_sign_key(
        registry, Pushed(f"{registry.host}/signed/later:v1", later_digest), tmp_path, policy.key
    )
    wait_running("unsigned", timeout=240)
    print(f"unsigned pod running {time.monotonic() - signed_at:.1f} s after signing")
    assert sha256_tree("unsigned", "/models") == {n: _sha(d) for n, d in later_files.items()}
