"""What a user reads in `kubectl describe pod` when NodePublishVolume fails.

kubelet turns the gRPC status message into a pod event, so each failure is
driven for real (real driver, real loopback registry, real bind mounts) and
its code and wording asserted: one line, the image named, what failed and
what to do, and never a secret.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tarfile
from pathlib import Path

import grpc
import pytest

from tests.support.driver import Driver
from tests.support.faultproxy import FaultProxy, stall_body
from tests.support.images import Dir, File, Image, Layer, Raw, push_image
from tests.support.registry import TEST_USER, free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")

WRONG_PASSWORD = "not-the-password-7731"


@pytest.fixture(scope="module")
def model(registry, tmp_path_factory) -> dict[str, str]:
    """One small model pushed under two tags."""
    tmp = tmp_path_factory.mktemp("model")
    image = Image([Layer([Dir("models"), File("models/config.json", b"{}")])])
    push_image(registry, image, "wording/llama:v1", tmp)
    push_image(registry, image, "wording/llama:v2", tmp)
    return {"repo": f"{registry.host}/wording/llama", "digest": image.manifest_digest}


def target_in(tmp_path: Path, name: str = "vol") -> Path:
    parent = tmp_path / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def failure(driver: Driver, tmp_path: Path, attrs: dict[str, str], **kw) -> grpc.RpcError:
    target = target_in(tmp_path)
    with pytest.raises(grpc.RpcError) as info:
        driver.publish(target, attrs, **kw)
    assert not target.exists(), "a failed publish leaves no target behind"
    return info.value


def assert_event_text(err: grpc.RpcError, code: grpc.StatusCode, image: str) -> str:
    """What every failure owes the user; returns the message for the specific checks."""
    message = err.details()
    assert err.code() == code, message
    assert "\n" not in message and "\r" not in message, message
    assert image in message, f"the image is not named: {message}"
    assert WRONG_PASSWORD not in message
    assert len(message) < 1000, "kubelet's event would cut it"
    return message


def test_tag_not_found_lists_the_pushed_tags(driver, model, tmp_path):
    image = f"{model['repo']}:v3"
    err = failure(driver, tmp_path, {"image": image})
    message = assert_event_text(err, grpc.StatusCode.NOT_FOUND, image)
    assert message == (
        f"image {image} not found: tag v3 does not exist in {model['repo']}; pushed tags: "
        "v1, v2 (2 in all); fix the tag in the volume's image attribute"
    )


def test_repository_not_found(driver, registry, tmp_path):
    image = f"{registry.host}/wording/no-such-model:v1"
    err = failure(driver, tmp_path, {"image": image})
    message = assert_event_text(err, grpc.StatusCode.NOT_FOUND, image)
    assert message.startswith(
        f"image {image} not found: repository wording/no-such-model does not exist at "
        f"{registry.host}"
    )
    assert message.endswith("check the image name")


def test_manifest_unknown_for_a_pinned_digest(driver, model, tmp_path):
    missing = "sha256:" + "0" * 64
    image = f"{model['repo']}@{missing}"
    err = failure(driver, tmp_path, {"image": image})
    message = assert_event_text(err, grpc.StatusCode.NOT_FOUND, image)
    assert message == (
        f"image {image} not found: manifest {missing} is not in {model['repo']} (deleted, "
        "or pushed to another repository); check the digest"
    )


def test_platform_not_in_index_lists_the_platforms(driver, registry, tmp_path):
    arm = Image([Layer([File("arch", b"arm64")])], architecture="arm64", variant="v8")
    s390 = Image([Layer([File("arch", b"s390x")])], architecture="s390x")
    push_image(registry, [arm, s390], "wording/multiarch:v1", tmp_path)
    image = f"{registry.host}/wording/multiarch:v1"
    err = failure(driver, tmp_path, {"image": image, "platform": "linux/amd64"})
    message = assert_event_text(err, grpc.StatusCode.NOT_FOUND, image)
    assert message == (
        f"image {image} has no variant for platform linux/amd64 (this node's unless the volume "
        "sets platform); available platforms: linux/arm64/v8, linux/s390x; set the volume's "
        "platform attribute to one of them or push the image for this platform"
    )


@pytest.mark.parametrize(
    "kind", ["basic_registry", pytest.param("token_registry", marks=pytest.mark.slow)]
)
def test_auth_denied_says_which_registry_and_where_credentials_go(kind, request, driver, tmp_path):
    reg = request.getfixturevalue(kind)
    push_image(reg, Image([Layer([File("w", b"private")])]), "wording/private:v1", tmp_path)
    image = f"{reg.host}/wording/private:v1"

    err = failure(driver, tmp_path, {"image": image})
    message = assert_event_text(err, grpc.StatusCode.PERMISSION_DENIED, image)
    assert message.startswith(f"registry {reg.host} refused access to image {image} anonymously")
    assert "(HTTP 401" in message
    assert message.endswith(
        f"give credentials for {reg.host} in a nodePublishSecretRef Secret (type "
        "kubernetes.io/dockerconfigjson) or in the node's --docker-config"
    )

    auth = base64.b64encode(f"{TEST_USER}:{WRONG_PASSWORD}".encode()).decode()
    secret = {".dockerconfigjson": json.dumps({"auths": {reg.host: {"auth": auth}}})}
    err = failure(driver, tmp_path, {"image": image}, secrets=secret)
    message = assert_event_text(err, grpc.StatusCode.PERMISSION_DENIED, image)
    assert message.startswith(
        f"registry {reg.host} refused access to image {image} with the given credentials"
    )
    assert message.endswith(
        f"check the user, password or token for {reg.host} in the volume's "
        "nodePublishSecretRef or the node's --docker-config, and that it may pull "
        "wording/private"
    )
    assert auth not in message


@pytest.mark.slow
def test_registry_unreachable_names_host_error_and_retries(driver, tmp_path):
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    image = f"{host}/wording/model:v1"
    err = failure(driver, tmp_path, {"image": image})
    message = assert_event_text(err, grpc.StatusCode.UNAVAILABLE, image)
    assert re.fullmatch(
        rf"image {re.escape(image)}: cannot connect to registry {re.escape(host)}: connection "
        rf"refused \(6 attempts over \d+s\); check that {re.escape(host)} is the right registry "
        r"and reachable from the node \(DNS, firewall, proxy\), or list a mirror for it in "
        r"--registry-config",
        message,
    ), message


def test_digest_mismatch(driver, registry, tmp_path):
    layer = Layer([File("weights", os.urandom(100_000))], compression="none")
    push_image(registry, Image([layer]), "wording/corrupt:v1", tmp_path)
    blob = registry.blob_path(layer.digest)
    good = blob.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # inside the file's data: the tar still parses
    blob.write_bytes(bytes(bad))
    image = f"{registry.host}/wording/corrupt:v1"
    try:
        err = failure(driver, tmp_path, {"image": image})
    finally:
        blob.write_bytes(good)
    message = assert_event_text(err, grpc.StatusCode.DATA_LOSS, image)
    assert re.fullmatch(
        rf"image {re.escape(image)}: layer 1/1 \({layer.digest}\): digest mismatch: expected "
        rf"{layer.digest}, got sha256:[0-9a-f]{{64}}; the registry or a proxy served wrong "
        r"bytes, nothing was kept: re-push the image, or fix the registry or cache that "
        r"serves it",
        message,
    ), message


def test_hostile_layer(driver, registry, tmp_path):
    escape = tarfile.TarInfo("../escape.txt")
    escape.mode = 0o644
    layer = Layer([Raw(escape, b"outside")])
    push_image(registry, Image([layer]), "wording/hostile:v1", tmp_path)
    image = f"{registry.host}/wording/hostile:v1"
    err = failure(driver, tmp_path, {"image": image})
    message = assert_event_text(err, grpc.StatusCode.INVALID_ARGUMENT, image)
    assert message.startswith(f"image {image} has a layer csi-oci refuses: layer 1/1 (")
    assert "'../escape.txt'" in message
    assert message.endswith(
        "the image is malformed or unsafe: rebuild it with a standard image builder"
    )


def test_sub_path_missing_lists_the_top_level(driver, model, tmp_path):
    image = f"{model['repo']}:v1"
    err = failure(driver, tmp_path, {"image": image, "subPath": "weights"})
    message = assert_event_text(err, grpc.StatusCode.NOT_FOUND, image)
    assert message == (
        f"subPath 'weights' does not exist in image {image} ({model['digest']}); its top level "
        "holds: models/; fix the volume's subPath attribute"
    )


def test_pull_policy_never_without_the_image(driver, model, tmp_path):
    image = f"{model['repo']}:v9"
    attrs = {"image": image, "pullPolicy": "Never", "platform": "linux/amd64"}
    err = failure(driver, tmp_path, attrs)
    message = assert_event_text(err, grpc.StatusCode.FAILED_PRECONDITION, image)
    assert message == (
        f"image {image} (linux/amd64) is not present on this node and pullPolicy is Never; "
        "use pullPolicy IfNotPresent, or pull it onto the node first (csi-oci pull)"
    )


@pytest.mark.slow
def test_disk_full_names_sizes_and_the_budget_flags(registry, tmp_path):
    layer = Layer([File("weights.bin", os.urandom(3 << 20))], compression="gzip")
    push_image(registry, Image([layer]), "wording/big:v1", tmp_path)
    image = f"{registry.host}/wording/big:v1"
    d = Driver(tmp_path / "drv", extra_args=["--cache-max-bytes", "1Mi"])
    try:
        err = failure(d, tmp_path, {"image": image})
    finally:
        d.stop()
    message = assert_event_text(err, grpc.StatusCode.RESOURCE_EXHAUSTED, image)
    assert message.startswith(f"not enough space for image {image}: layer 1/1 (")
    assert "the node's image cache has room for 1.0 MiB more" in message
    assert "cache budget 1048576 bytes (--cache-max-bytes)" in message
    assert "free-space floor 0 bytes (--cache-min-free-bytes)" in message
    assert message.endswith(
        "raise --cache-max-bytes or free disk space on the node, or publish fewer files with "
        "the include attribute"
    )


@pytest.mark.slow
def test_pull_in_progress_shows_bytes_rate_and_eta(registry, tmp_path):
    layer = Layer([File("weights.bin", os.urandom(4 << 20))], compression="none")
    image_obj = Image([layer])
    push_image(registry, image_obj, "wording/slow:v1", tmp_path)
    # The first MiB arrives at once, then the registry stalls: the call's
    # budget (1.5 s) runs out mid-pull with a measurable rate.
    with FaultProxy(registry.url, stall_body(seconds=4, after_bytes=1 << 20)) as proxy:
        image = f"{proxy.host}/wording/slow:v1"
        d = Driver(tmp_path / "drv", extra_args=["--publish-wait", "1.5"])
        try:
            err = failure(d, tmp_path, {"image": image})
        finally:
            d.stop()
    message = assert_event_text(err, grpc.StatusCode.ABORTED, image)
    assert re.fullmatch(
        rf"pull of {re.escape(image)} in progress: [\d.]+ (B|KiB|MiB)/4\.0 MiB \(\d+%\), "
        rf"[\d.]+ (B|KiB|MiB)/s, ETA \d+s \({image_obj.manifest_digest}\); it continues in the "
        r"background and the next retry picks it up",
        message,
    ), message
