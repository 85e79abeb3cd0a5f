"""RegistryClient against real registries: schemes, manifests, errors."""

from __future__ import annotations

import pytest

from csi_oci.errors import IntegrityError, NotFound, RegistryError
from csi_oci.oci.manifest import OCI_MANIFEST, Descriptor
from csi_oci.oci.registry import RegistryClient
from csi_oci.spec.reference import parse_reference
from tests.support.images import File, Image, Layer, push_image


@pytest.mark.parametrize(
    ("ref", "scheme"),
    [
        ("127.0.0.1:5000/a/b:v1", "http"),
        ("localhost:5000/a/b:v1", "http"),
        ("[::1]:5000/a/b:v1", "http"),
        ("registry.example.com/a/b:v1", "https"),
        ("10.0.0.5:5000/a/b:v1", "https"),
        ("busybox", "https"),
    ],
)
def test_plain_http_only_for_loopback(ref, scheme):
    client = RegistryClient(parse_reference(ref))
    assert client.connections[-1].endpoint.base_url.startswith(f"{scheme}://")


def test_manifest_by_tag_and_digest_and_blob(registry, tmp_path):
    img = Image([Layer([File("a", b"1")])])
    digest = push_image(registry, img, "reg/client:v1", tmp_path)
    client = RegistryClient(parse_reference(f"{registry.host}/reg/client:v1"))
    by_tag = client.get_manifest("v1")
    assert by_tag.digest == digest and by_tag.media_type == OCI_MANIFEST
    assert client.get_manifest(digest).data == by_tag.data
    config = Descriptor("", img.config_digest, len(img.config_bytes), {})
    assert client.get_blob_bytes(config, "config", 1 << 20) == img.config_bytes
    with pytest.raises(RegistryError, match="more than"):
        client.get_blob_bytes(config, "config", 10)
    wrong_size = Descriptor("", img.config_digest, len(img.config_bytes) + 1, {})
    with pytest.raises(IntegrityError):
        client.get_blob_bytes(wrong_size, "config", 1 << 20)
    with pytest.raises(NotFound, match="tag 'nope'"):
        client.get_manifest("nope")
    with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
        client.get_manifest("sha256:" + "1" * 64)
