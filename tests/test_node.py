"""NodePublish/NodeUnpublish end to end: real registry, real skopeo pushes,
real `csi-oci serve` process, real bind mounts (needs root)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from csi_oci.csi.v1 import csi_pb2
from tests.support.driver import MOUNT_CAP, Driver, mount_options, settled, tree_of, wait_for
from tests.support.faultproxy import FaultProxy, stall_body
from tests.support.images import Dir, File, Image, Layer, Opaque, Symlink, Whiteout, push_image
from tests.support.registry import TEST_PASSWORD, TEST_USER

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")

LAYER1 = [
    Dir("etc"),
    File("etc/os-release", b"ID=test\n"),
    File("etc/removed", b"gone in layer 2"),
    Dir("data"),
    File("data/lower1", b"lower"),
    Dir("data/sub"),
    File("data/sub/deep", b"deep lower"),
    Dir("usr/lib"),
    Symlink("lib", "usr/lib"),
    File("usr/lib/libx.so", b"\x7fELF"),
    Dir("models"),
    File("models/config.json", b'{"hidden_size": 8}'),
]
LAYER2 = [
    Whiteout("etc/removed"),
    File("data/new", b"upper"),
    Opaque("data"),  # after a sibling of the same layer: hides only lower content
    File("lib/via-symlink", b"written through lib -> usr/lib"),
]
LAYER3 = [File("models/weights.bin", os.urandom(300_000)), File("top.txt", b"top")]


def expected_tree() -> dict[str, object]:
    return {
        "etc": "dir",
        "etc/os-release": b"ID=test\n",
        "data": "dir",
        "data/new": b"upper",
        "usr": "dir",
        "usr/lib": "dir",
        "usr/lib/libx.so": b"\x7fELF",
        "usr/lib/via-symlink": b"written through lib -> usr/lib",
        "lib": "->usr/lib",
        "models": "dir",
        "models/config.json": b'{"hidden_size": 8}',
        "models/weights.bin": LAYER3[0].data,
        "top.txt": b"top",
    }


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory) -> dict[str, str]:
    """Push the test images once; returns name -> reference."""
    tmp = tmp_path_factory.mktemp("images")
    img = Image(
        [
            Layer(LAYER1, compression="gzip", members=2),
            Layer(LAYER2, compression="zstd", members=2),
            Layer(LAYER3, compression="none"),
        ]
    )
    push_image(registry, img, "node/multi:v1", tmp)
    amd = Image([Layer([File("arch", b"amd64")])], architecture="amd64")
    arm = Image([Layer([File("arch", b"arm64")])], architecture="arm64", variant="v8")
    push_image(registry, [amd, arm], "node/multiarch:v1", tmp)
    # Docker schema 2 has no zstd layer type: the same tree with gzip layers.
    docker_img = Image(
        [
            Layer(LAYER1, compression="gzip"),
            Layer(LAYER2, compression="gzip"),
            Layer(LAYER3, compression="none"),
        ]
    )
    push_image(registry, docker_img, "node/docker:v1", tmp / "v2s2", format="v2s2")
    push_image(registry, [amd, arm], "node/dockerlist:v1", tmp / "v2s2list", format="v2s2")
    small = Image([Layer([Dir("models"), File("models/m.txt", b"m")])])
    push_image(registry, small, "node/small:v1", tmp)
    return {
        "multi": f"{registry.host}/node/multi:v1",
        "multiarch": f"{registry.host}/node/multiarch:v1",
        "docker": f"{registry.host}/node/docker:v1",
        "dockerlist": f"{registry.host}/node/dockerlist:v1",
        "small": f"{registry.host}/node/small:v1",
        "multi_digest": f"{registry.host}/node/multi@{img.manifest_digest}",
    }


def target_in(tmp_path: Path, name: str = "vol") -> Path:
    """A kubelet-shaped target path whose parent exists (kubelet creates it)."""
    parent = tmp_path / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def blob_gets(registry, repo: str) -> int:
    """Blob downloads by csi-oci as the registry's access log records them."""
    return sum(
        1
        for line in registry.log_text().splitlines()
        if f'"GET /v2/{repo}/blobs/' in line and "csi-oci" in line
    )


# -- the happy path -------------------------------------------------------------


def test_multilayer_whiteouts_opaque_and_all_compressions(driver, images, tmp_path):
    target = target_in(tmp_path)
    driver.publish(target, {"image": images["multi"]})
    try:
        assert tree_of(target) == expected_tree()
        opts = mount_options(target)
        assert opts is not None and {"ro", "nosuid", "nodev"} <= opts
        with pytest.raises(OSError):
            (target / "newfile").write_bytes(b"x")
    finally:
        driver.unpublish(target)
    assert not target.exists(), "the driver removes the target directory it created"
    assert mount_options(target) is None


def test_identical_republish_is_noop_and_incompatible_is_already_exists(driver, images, tmp_path):
    target = target_in(tmp_path)
    attrs = {"image": images["small"]}
    driver.publish(target, attrs)
    try:
        for _ in range(3):
            driver.publish(target, attrs)
        assert sum(1 for line in open("/proc/self/mountinfo") if f" {target} " in line) == 1
        err = rpc_error(driver.publish, target, {"image": images["multi"]})
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        err = rpc_error(driver.publish, target, attrs, volume_id="other-volume")
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        driver.unpublish(target)
    driver.unpublish(target)  # idempotent: not mounted, absent
    driver.unpublish(tmp_path / "never" / "existed")


def test_sub_path_and_missing_sub_path(driver, images, tmp_path):
    target = target_in(tmp_path)
    driver.publish(target, {"image": images["multi"], "subPath": "models"})
    try:
        assert sorted(os.listdir(target)) == ["config.json", "weights.bin"]
    finally:
        driver.unpublish(target)
    err = rpc_error(driver.publish, target, {"image": images["multi"], "subPath": "nope/there"})
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "nope/there" in err.details()
    assert not target.exists(), "a failed publish leaves no target behind"


def test_sub_path_through_symlink_stays_in_image(driver, images, tmp_path):
    target = target_in(tmp_path)
    driver.publish(target, {"image": images["multi"], "subPath": "lib"})
    try:
        assert sorted(os.listdir(target)) == ["libx.so", "via-symlink"]
    finally:
        driver.unpublish(target)


def test_index_platform_selection(driver, images, tmp_path):
    for platform, want in (
        ("linux/amd64", b"amd64"),
        ("linux/arm64", b"arm64"),
        ("linux/arm64/v8", b"arm64"),
    ):
        target = target_in(tmp_path, platform.replace("/", "-"))
        driver.publish(
            target, {"image": images["multiarch"], "platform": platform}, volume_id=platform
        )
        try:
            assert (target / "arch").read_bytes() == want
        finally:
            driver.unpublish(target, volume_id=platform)
    err = rpc_error(
        driver.publish,
        target_in(tmp_path, "s390x"),
        {"image": images["multiarch"], "platform": "linux/s390x"},
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "linux/s390x" in err.details() and "linux/arm64" in err.details()


def test_docker_schema2_manifest_and_list(driver, images, tmp_path):
    target = target_in(tmp_path, "docker")
    driver.publish(target, {"image": images["docker"]})
    try:
        assert tree_of(target) == expected_tree()
    finally:
        driver.unpublish(target)
    target = target_in(tmp_path, "dockerlist")
    driver.publish(target, {"image": images["dockerlist"], "platform": "linux/arm64"})
    try:
        assert (target / "arch").read_bytes() == b"arm64"
    finally:
        driver.unpublish(target)


def test_digest_pinned_reference_and_oci_prefix(driver, images, tmp_path):
    target = target_in(tmp_path)
    driver.publish(target, {"image": "oci://" + images["multi_digest"]})
    try:
        assert (target / "top.txt").read_bytes() == b"top"
    finally:
        driver.unpublish(target)


def test_inline_volume_readonly_false_single_node_writer_is_accepted(driver, images, tmp_path):
    """kubelet sends SINGLE_NODE_WRITER and readonly=false for inline volumes."""
    target = target_in(tmp_path)
    attrs = {
        "image": images["small"],
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/pod.name": "p",
        "csi.storage.k8s.io/serviceAccount.tokens": '{"": {"token": "SA-TOKEN-VALUE"}}',
    }
    driver.publish(target, attrs, readonly=False)
    try:
        assert {"ro", "nosuid", "nodev"} <= (mount_options(target) or set())
    finally:
        driver.unpublish(target)
    assert "SA-TOKEN-VALUE" not in driver.log_text()


# -- refusals ---------------------------------------------------------------------


def test_request_validation(driver, images, tmp_path):
    target = str(target_in(tmp_path))
    node = driver.node
    cases = [
        csi_pb2.NodePublishVolumeRequest(target_path=target, volume_capability=MOUNT_CAP),
        csi_pb2.NodePublishVolumeRequest(volume_id="v", volume_capability=MOUNT_CAP),
        csi_pb2.NodePublishVolumeRequest(volume_id="v", target_path=target),
        csi_pb2.NodePublishVolumeRequest(
            volume_id="v", target_path=target, volume_capability=MOUNT_CAP
        ),
    ]
    for req in cases:
        assert rpc_error(node.NodePublishVolume, req).code() == grpc.StatusCode.INVALID_ARGUMENT
    block = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=MOUNT_CAP.access_mode
    )
    err = rpc_error(driver.publish, Path(target), {"image": images["small"]}, capability=block)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "block" in err.details()
    for bad in ("UPPER/case:v1", "reg.example.com/repo:bad tag", "repo@sha256:123", ""):
        err = rpc_error(driver.publish, Path(target), {"image": bad})
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    err = rpc_error(driver.publish, Path(target), {"image": images["small"], "mode": "fast"})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "auto, unpack or lazy" in err.details()
    for req in (
        csi_pb2.NodeUnpublishVolumeRequest(target_path=target),
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="v"),
    ):
        assert rpc_error(node.NodeUnpublishVolume, req).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_repository_and_tag_are_not_found(driver, registry, tmp_path):
    for ref in (
        f"{registry.host}/node/does-not-exist:v1",
        f"{registry.host}/node/small:no-such-tag",
    ):
        err = rpc_error(driver.publish, target_in(tmp_path), {"image": ref})
        assert err.code() == grpc.StatusCode.NOT_FOUND, ref
        assert "not found" in err.details()


def test_pull_policy_never_with_absent_image(driver, registry, tmp_path):
    err = rpc_error(
        driver.publish,
        target_in(tmp_path),
        {"image": f"{registry.host}/node/absent:v9", "pullPolicy": "Never"},
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not present on this node" in err.details() and "Never" in err.details()


def test_pull_policy_never_with_cached_image_needs_no_registry(driver, images, tmp_path):
    target = target_in(tmp_path)
    driver.publish(target, {"image": images["small"]})
    driver.unpublish(target)
    driver.publish(target, {"image": images["small"], "pullPolicy": "Never"})
    driver.unpublish(target)


@pytest.mark.slow
def test_dead_registry_is_unavailable(driver, tmp_path):
    err = rpc_error(driver.publish, target_in(tmp_path), {"image": "127.0.0.1:9/x/y:v1"})
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot connect" in err.details()


def test_corrupted_blob_publishes_nothing_and_does_not_poison(driver, registry, tmp_path):
    payload = os.urandom(200_000)
    layer = Layer([File("weights", payload)], compression="gzip")
    img = Image([layer])
    push_image(registry, img, "node/corrupt:v1", tmp_path)
    blob = registry.blob_path(layer.digest)
    good = blob.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    blob.write_bytes(bytes(bad))
    target = target_in(tmp_path)
    ref = f"{registry.host}/node/corrupt:v1"
    try:
        err = rpc_error(driver.publish, target, {"image": ref})
        assert err.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT)
        assert layer.digest in err.details()
        assert not target.exists() and mount_options(target) is None
        hexd = img.manifest_digest.split(":")[1]
        assert not (driver.state_dir / "images" / "sha256" / hexd).exists()
        assert list((driver.state_dir / "staging").iterdir()) == []
    finally:
        blob.write_bytes(good)
    driver.publish(target, {"image": ref})  # the failure cached nothing
    try:
        assert (target / "weights").read_bytes() == payload
    finally:
        driver.unpublish(target)


@pytest.mark.slow
def test_wrong_diff_id_in_config_is_refused(driver, registry, tmp_path):
    layer = Layer([File("f", b"content")], compression="gzip")
    img = Image(
        [layer], config_extra={"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}
    )
    push_image(registry, img, "node/baddiff:v1", tmp_path)
    target = target_in(tmp_path)
    err = rpc_error(driver.publish, target, {"image": f"{registry.host}/node/baddiff:v1"})
    assert err.code() == grpc.StatusCode.DATA_LOSS and "diff_id" in err.details()
    # The blob matched its digest: the image is inconsistent, not the registry wrong.
    assert "config (rootfs.diff_ids) and this layer disagree" in err.details(), err.details()
    assert "served wrong bytes" not in err.details()
    assert not target.exists()

    # --no-verify-diff-ids: the layer's own digest still pins its bytes.
    unchecked = Driver(tmp_path / "drv", extra_args=["--no-verify-diff-ids"])
    try:
        unchecked.publish(target, {"image": f"{registry.host}/node/baddiff:v1"})
        assert (target / "f").read_bytes() == b"content"
        unchecked.unpublish(target)
    finally:
        unchecked.stop()


# -- credentials ----------------------------------------------------------------------


def dockerconfig(host: str, user: str, password: str) -> dict[str, str]:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {".dockerconfigjson": json.dumps({"auths": {host: {"auth": auth}}})}


@pytest.mark.parametrize("kind", ["basic_registry", "token_registry"])
def test_private_registry_credentials(kind, request, driver, tmp_path):
    reg = request.getfixturevalue(kind)
    img = Image([Layer([File("secret-model", b"weights")])])
    push_image(reg, img, "private/model:v1", tmp_path)
    ref = f"{reg.host}/private/model:v1"
    target = target_in(tmp_path)

    err = rpc_error(driver.publish, target, {"image": ref})
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "anonymously" in err.details()

    wrong = dockerconfig(reg.host, TEST_USER, "not-the-password")
    err = rpc_error(driver.publish, target, {"image": ref}, secrets=wrong)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "credentials" in err.details() and "not-the-password" not in err.details()

    driver.publish(target, {"image": ref}, secrets=dockerconfig(reg.host, TEST_USER, TEST_PASSWORD))
    try:
        assert (target / "secret-model").read_bytes() == b"weights"
    finally:
        driver.unpublish(target)
    target2 = target_in(tmp_path, "plain")
    secrets = {"username": TEST_USER, "password": TEST_PASSWORD}
    driver.publish(target2, {"image": ref, "pullPolicy": "Always"}, secrets=secrets)
    driver.unpublish(target2)
    if kind == "token_registry":
        assert reg.token_server.tokens_issued > 0
    log = driver.log_text()
    assert TEST_PASSWORD not in log and "not-the-password" not in log
    assert base64.b64encode(f"{TEST_USER}:{TEST_PASSWORD}".encode()).decode() not in log


# -- concurrency, long pulls, restarts --------------------------------------------------


def test_ten_concurrent_publishes_share_one_download(driver, registry, tmp_path):
    layers = [
        Layer([File(f"shard-{i}", os.urandom(2_000_000))], compression="none") for i in range(3)
    ]
    push_image(registry, Image(layers), "node/concurrent:v1", tmp_path)
    ref = f"{registry.host}/node/concurrent:v1"
    before = blob_gets(registry, "node/concurrent")
    targets = [target_in(tmp_path, f"c{i}") for i in range(10)]
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            driver.publish(targets[i], {"image": ref}, volume_id=f"vol-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    try:
        for t in targets:
            assert sorted(os.listdir(t)) == ["shard-0", "shard-1", "shard-2"]
        # one GET per layer blob plus the config blob, whatever the concurrency
        got = settled(lambda: blob_gets(registry, "node/concurrent") - before, len(layers) + 1)
        assert got == len(layers) + 1
    finally:
        for i, t in enumerate(targets):
            driver.unpublish(t, volume_id=f"vol-{i}")


@pytest.mark.slow
def test_long_pull_returns_aborted_with_progress_then_joins(registry, tmp_path):
    layers = [
        Layer([File(f"part-{i}", os.urandom(8_000_000))], compression="gzip") for i in range(4)
    ]
    push_image(registry, Image(layers), "node/long:v1", tmp_path)
    ref = f"{registry.host}/node/long:v1"
    d = Driver(tmp_path / "drv", extra_args=["--publish-wait", "0"])
    try:
        target = target_in(tmp_path)
        before = blob_gets(registry, "node/long")
        err = rpc_error(d.publish, target, {"image": ref})
        assert err.code() == grpc.StatusCode.ABORTED
        assert "retry" in err.details() and "sha256:" in err.details()
        for _ in range(600):
            try:
                d.publish(target, {"image": ref})
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
                import time

                time.sleep(0.05)
        assert len(os.listdir(target)) == 4
        got = settled(lambda: blob_gets(registry, "node/long") - before, len(layers) + 1)
        assert got == len(layers) + 1
        d.unpublish(target)
    finally:
        d.stop()


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
@pytest.mark.slow
def test_restart_between_publish_and_unpublish(registry, images, tmp_path, hard):
    d = Driver(tmp_path / "drv")
    try:
        target = target_in(tmp_path)
        attrs = {"image": images["small"]}
        d.publish(target, attrs)
        d.restart(hard=hard)
        assert (target / "models" / "m.txt").read_bytes() == b"m", "a restart unmounts nothing"
        before = blob_gets(registry, "node/small")
        d.publish(target, attrs)  # no-op decided from mountinfo + the record on disk
        assert blob_gets(registry, "node/small") == before
        err = rpc_error(d.publish, target, {"image": images["multi"]})
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        d.unpublish(target)
        assert not target.exists() and mount_options(target) is None
    finally:
        d.stop()


@pytest.mark.slow
def test_sigterm_shuts_down_cleanly_and_stale_socket_is_replaced(tmp_path):
    d = Driver(tmp_path / "drv", mode="controller")
    assert d.stop() == 0
    assert not d.socket.exists()
    import socket as socketlib

    stale = socketlib.socket(socketlib.AF_UNIX)
    stale.bind(str(d.socket))
    stale.close()  # a socket file with nobody listening, as after a crash
    d.start()
    d.identity.Probe(csi_pb2.ProbeRequest())
    assert d.stop() == 0


@pytest.mark.slow
def test_kill_during_pull_leaves_nothing_a_later_pull_trips_on(registry, tmp_path):
    layers = [
        Layer([File(f"part-{i}", os.urandom(16_000_000))], compression="gzip") for i in range(4)
    ]
    img = Image(layers)
    push_image(registry, img, "node/killed:v1", tmp_path)
    # Through the proxy every blob stalls after its first MiB, so the kill
    # lands mid-pull however fast the machine is; the pull after the restart
    # goes to the registry itself (same digests, so the same store entries).
    proxy = FaultProxy(registry.url, stall_body(seconds=20, after_bytes=1 << 20))
    proxy.__enter__()
    ref = f"{proxy.host}/node/killed:v1"
    d = Driver(tmp_path / "drv", extra_args=["--publish-wait", "0"])
    try:
        target = target_in(tmp_path)
        err = rpc_error(d.publish, target, {"image": ref})
        assert err.code() == grpc.StatusCode.ABORTED
        staging = d.state_dir / "staging"
        assert wait_for(lambda: any(staging.iterdir()), timeout=10), "pull under way when killed"
        d.restart(hard=True)  # kill -9 mid-pull, then start again
        assert list(staging.iterdir()) == [], "leftover staging is swept at start"
        assert not list((d.state_dir / "blobs" / "sha256").glob("*.partial"))
        assert not (d.state_dir / "images" / "sha256" / img.manifest_digest.split(":")[1]).exists()
        assert not target.exists() and mount_options(target) is None
        for _ in range(600):
            try:
                d.publish(target, {"image": f"{registry.host}/node/killed:v1"})
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
                threading.Event().wait(0.05)
        assert sorted(os.listdir(target)) == [f"part-{i}" for i in range(4)]
        for i, layer in enumerate(layers):
            assert (target / f"part-{i}").read_bytes() == layer_payload(layer)
        d.unpublish(target)
    finally:
        d.stop()
        proxy.__exit__(None, None, None)


def layer_payload(layer: Layer) -> bytes:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(layer.tar_bytes)) as tf:
        member = tf.getmembers()[0]
        return tf.extractfile(member).read()


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB tmpfs to serve as a state dir that fills up."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_full_disk_is_resource_exhausted_and_leaves_nothing(registry, tmp_path, small_disk):
    layers = [
        Layer([File(f"shard-{i}", os.urandom(12_000_000))], compression="none") for i in range(3)
    ]
    img = Image(layers)
    push_image(registry, img, "node/toobig:v1", tmp_path)
    small = Image([Layer([File("fits", b"small model")])])
    push_image(registry, small, "node/fits:v1", tmp_path)
    d = Driver(tmp_path / "drv", state_dir=small_disk / "state")
    try:
        target = target_in(tmp_path)
        err = rpc_error(d.publish, target, {"image": f"{registry.host}/node/toobig:v1"})
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        # refused up front (sizes named) or, when sizes are unknown, by ENOSPC mid-pull
        assert "no space left" in err.details() or "needs" in err.details()
        assert not target.exists() and mount_options(target) is None
        assert list((d.state_dir / "staging").iterdir()) == []
        assert not list((d.state_dir / "blobs" / "sha256").glob("*.partial"))
        assert list((d.state_dir / "images" / "sha256").iterdir()) == []
        # the node keeps working for images that fit
        d.publish(target, {"image": f"{registry.host}/node/fits:v1"})
        assert (target / "fits").read_bytes() == b"small model"
        d.unpublish(target)
    finally:
        d.stop()


@pytest.mark.slow
def test_reboot_before_flush_discards_torn_trees_and_blobs(registry, tmp_path):
    """A tree or blob renamed into the store whose flush never happened before the
    node went down (its pending-sync marker holds another boot id) is removed at
    start and pulled again; one flushed in time is kept."""
    img = Image([Layer([File("w", b"weights")])])
    push_image(registry, img, "node/reboot:v1", tmp_path)
    ref = f"{registry.host}/node/reboot:v1"
    d = Driver(tmp_path / "drv")
    target = target_in(tmp_path)
    try:
        d.publish(target, {"image": ref})
        d.unpublish(target)
    finally:
        d.stop()
    hexd = img.manifest_digest.split(":")[1]
    tree = d.state_dir / "images" / "sha256" / hexd
    pending = d.state_dir / "pending-sync"
    assert tree.is_dir() and list(pending.iterdir()) == [], "flushed in the background"
    (pending / f"image-{hexd}").write_text("a-previous-boot-id")  # as if the flush never ran
    (d.state_dir / "blobs" / "sha256" / ("f" * 64)).write_bytes(b"torn")
    (pending / f"blob-{'f' * 64}").write_text("a-previous-boot-id")
    d.start()
    try:
        assert not tree.exists(), "a possibly torn tree is not trusted"
        assert not (d.state_dir / "blobs" / "sha256" / ("f" * 64)).exists()
        d.publish(target, {"image": ref})
        assert (target / "w").read_bytes() == b"weights"
        d.unpublish(target)
    finally:
        d.stop()
