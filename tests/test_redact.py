"""Unit tests of csi_oci/redact.py: CSI messages rendered for logs without secrets."""

from __future__ import annotations

import pytest

from csi_oci.csi.redact import is_secret_key, one_line, redacted_copy
from csi_oci.csi.v1 import csi_pb2
from csi_oci.telemetry.urls import REDACTED

DOCKERCONFIG = '{"auths":{"reg.example.com":{"auth":"YWxpY2U6c2VjcmV0LXB3LTEyMzQ="}}}'
DOCKERCONFIG_AUTH = "YWxpY2U6c2VjcmV0LXB3LTEyMzQ="
PASSWORD = "hunter2-very-secret"
SA_TOKENS = '{"sts.example.com":{"token":"eyJhbGciOiJSUzI1NiJ9.payload.signature","exp":1}}'
TOKEN_PART = "eyJhbGciOiJSUzI1NiJ9"
SECRET_VALUES = (DOCKERCONFIG_AUTH, PASSWORD, TOKEN_PART, "signature", "secret-pw-1234")


def mount_cap() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4", mount_flags=["ro", "noatime"]),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY
        ),
    )


def publish_request() -> csi_pb2.NodePublishVolumeRequest:
    return csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-3f2a9c",
        target_path="/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/model/mount",
        readonly=True,
        volume_capability=mount_cap(),
        publish_context={"attached": "yes"},
        secrets={".dockerconfigjson": DOCKERCONFIG, "password": PASSWORD, "username": "alice"},
        volume_context={
            "image": "reg.example.com/team/model:v1",
            "subPath": "weights",
            "csi.storage.k8s.io/pod.name": "web-0",
            "csi.storage.k8s.io/serviceAccount.tokens": SA_TOKENS,
            "csi.storage.k8s.io/ephemeral": "true",
        },
    )


def assert_no_secret(text: str) -> None:
    for value in SECRET_VALUES:
        assert value not in text


def test_node_publish_request_one_line():
    req = publish_request()
    line = one_line(req)
    assert "\n" not in line
    assert_no_secret(line)
    # Even the non-secret-looking value inside a csi_secret map is hidden.
    assert "alice" not in line
    # Key names stay, so a reader sees that secrets were passed.
    for key in (".dockerconfigjson", "password", "username", "serviceAccount.tokens"):
        assert key in line
    assert line.count(REDACTED) == 4
    # Non-secret fields stay.
    for kept in (
        "csi-3f2a9c",
        "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/model/mount",
        "readonly: true",
        "reg.example.com/team/model:v1",
        "weights",
        "web-0",
        "csi.storage.k8s.io/ephemeral",
        "attached",
        "noatime",
        "MULTI_NODE_READER_ONLY",
        "ext4",
    ):
        assert kept in line


def test_original_message_not_modified():
    req = publish_request()
    before = req.SerializeToString(deterministic=True)
    one_line(req)
    copy = redacted_copy(req)
    assert req.SerializeToString(deterministic=True) == before
    assert req.secrets["password"] == PASSWORD
    assert req.volume_context["csi.storage.k8s.io/serviceAccount.tokens"] == SA_TOKENS
    assert copy is not req
    assert type(copy) is type(req)
    assert copy.secrets["password"] == REDACTED
    assert copy.secrets[".dockerconfigjson"] == REDACTED
    assert copy.volume_context["csi.storage.k8s.io/serviceAccount.tokens"] == REDACTED
    assert copy.volume_context["image"] == "reg.example.com/team/model:v1"
    assert copy.volume_id == req.volume_id


def test_create_volume_request_secrets():
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-1234",
        capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30),
        volume_capabilities=[mount_cap(), mount_cap()],
        parameters={
            "image": "ghcr.io/org/model:v2",
            "csi.storage.k8s.io/provisioner-secret-name": "regcred",
            "registryPassword": PASSWORD,
        },
        secrets={"username": "bob", ".dockercfg": DOCKERCONFIG},
        mutable_parameters={"pullPolicy": "Always", "authToken": "secret-pw-1234"},
    )
    line = one_line(req)
    assert_no_secret(line)
    assert "bob" not in line
    for kept in ("pvc-1234", "ghcr.io/org/model:v2", "1073741824", "pullPolicy", "Always"):
        assert kept in line
    copy = redacted_copy(req)
    assert dict(copy.secrets) == {"username": REDACTED, ".dockercfg": REDACTED}
    # Keys naming secrets are redacted in plain string maps too...
    assert copy.parameters["csi.storage.k8s.io/provisioner-secret-name"] == REDACTED
    assert copy.parameters["registryPassword"] == REDACTED
    assert copy.mutable_parameters["authToken"] == REDACTED
    # ...and the others are kept.
    assert copy.parameters["image"] == "ghcr.io/org/model:v2"
    assert copy.mutable_parameters["pullPolicy"] == "Always"
    assert len(copy.volume_capabilities) == 2


def test_nested_messages():
    resp = csi_pb2.CreateVolumeResponse(
        volume=csi_pb2.Volume(
            volume_id="oci-abc",
            volume_context={"image": "busybox", "dockerconfigjson": DOCKERCONFIG},
            accessible_topology=[csi_pb2.Topology(segments={"zone": "a", "token": PASSWORD})],
        )
    )
    line = one_line(resp)
    assert_no_secret(line)
    assert "oci-abc" in line and "busybox" in line and "zone" in line

    confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse(
        confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context={"csi.storage.k8s.io/serviceAccount.tokens": SA_TOKENS, "a": "b"},
            parameters={"password": PASSWORD},
        )
    )
    copy = redacted_copy(confirmed)
    assert copy.confirmed.volume_context["csi.storage.k8s.io/serviceAccount.tokens"] == REDACTED
    assert copy.confirmed.volume_context["a"] == "b"
    assert copy.confirmed.parameters["password"] == REDACTED
    assert confirmed.confirmed.parameters["password"] == PASSWORD

    # Repeated nested messages.
    listing = csi_pb2.ListVolumesResponse(
        entries=[
            csi_pb2.ListVolumesResponse.Entry(
                volume=csi_pb2.Volume(volume_id=f"v{i}", volume_context={"token": PASSWORD})
            )
            for i in range(3)
        ]
    )
    line = one_line(listing)
    assert_no_secret(line)
    assert all(f"v{i}" in line for i in range(3))
    assert line.count(REDACTED) == 3


@pytest.mark.parametrize(
    "msg",
    [
        csi_pb2.NodeStageVolumeRequest(volume_id="v", secrets={"k": PASSWORD}),
        csi_pb2.DeleteVolumeRequest(volume_id="v", secrets={"k": PASSWORD}),
        csi_pb2.ControllerPublishVolumeRequest(volume_id="v", secrets={"k": PASSWORD}),
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="v", secrets={"k": PASSWORD}),
        csi_pb2.NodeExpandVolumeRequest(volume_id="v", secrets={"k": PASSWORD}),
    ],
)
def test_every_csi_secret_map_redacted(msg):
    line = one_line(msg)
    assert PASSWORD not in line
    assert 'key: "k"' in line and REDACTED in line


def test_message_without_secrets_unchanged():
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id="v1", target_path="/t")
    assert one_line(req) == 'volume_id: "v1" target_path: "/t"'
    assert redacted_copy(req) == req
    assert one_line(csi_pb2.ProbeRequest()) == ""


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("Password", True),
        ("registryPassword", True),
        (".dockerconfigjson", True),
        (".dockercfg", True),
        ("csi.storage.k8s.io/serviceAccount.tokens", True),
        ("authToken", True),
        ("auth", True),
        ("client-secret", True),
        ("credentials", True),
        ("image", False),
        ("subPath", False),
        ("pullPolicy", False),
        ("csi.storage.k8s.io/pod.name", False),
        ("username", False),
    ],
)
def test_is_secret_key(key, secret):
    assert is_secret_key(key) is secret


def test_error_text_is_one_line_without_url_secrets():
    from csi_oci.csi.redact import one_line_text

    text = (
        "cannot fetch https://user:pa55@blobs.example/x?X-Amz-Signature=abc123&X-Amz-Date=1\n"
        "  caused by: reset"
    )
    flat = one_line_text(text)
    assert flat == "cannot fetch https://***@blobs.example/x?*** caused by: reset"
    assert len(one_line_text("x" * 5000)) == 1000
