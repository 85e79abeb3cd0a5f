"""Unit tests of csi_oci/reference.py: image reference parsing and host rules."""

from __future__ import annotations

import pytest

from csi_oci.errors import InvalidArgument
from csi_oci.spec.reference import (
    DOCKER_HUB,
    DOCKER_HUB_API,
    Reference,
    is_loopback_host,
    parse_reference,
    validate_digest,
)

D256 = "sha256:" + "a" * 64
D512 = "sha512:" + "0123456789abcdef" * 8


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("library/busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None),
        ("bitnami/redis:7.2", "docker.io", "bitnami/redis", "7.2", None),
        ("user/a/b/c", "docker.io", "user/a/b/c", "latest", None),
        ("ghcr.io/org/model:v1", "ghcr.io", "org/model", "v1", None),
        ("reg.example.com:5000/team/model", "reg.example.com:5000", "team/model", "latest", None),
        ("reg.example.com:5000/team/model:v2", "reg.example.com:5000", "team/model", "v2", None),
        ("localhost/model", "localhost", "model", "latest", None),
        ("localhost:5000/model:t", "localhost:5000", "model", "t", None),
        ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000", "a/b", "c", None),
        ("[::1]:5000/model", "[::1]:5000", "model", "latest", None),
        ("[fe80::1]/model", "[fe80::1]", "model", "latest", None),
        ("host:5000/model", "host:5000", "model", "latest", None),
        ("oci://ghcr.io/org/model:v1", "ghcr.io", "org/model", "v1", None),
        ("oci://busybox", "docker.io", "library/busybox", "latest", None),
        ("  busybox:1.0  ", "docker.io", "library/busybox", "1.0", None),
        (f"busybox@{D256}", "docker.io", "library/busybox", None, D256),
        (f"busybox:1.36@{D256}", "docker.io", "library/busybox", "1.36", D256),
        (f"reg.example.com:5000/m@{D512}", "reg.example.com:5000", "m", None, D512),
        (f"localhost:5000/m:v@{D256}", "localhost:5000", "m", "v", D256),
        ("a_b/c__d/e-f/g.h:TAG_x.y-z", "docker.io", "a_b/c__d/e-f/g.h", "TAG_x.y-z", None),
        ("m:" + "t" * 128, "docker.io", "library/m", "t" * 128, None),
        ("My-Registry.Example.com/x", "My-Registry.Example.com", "x", "latest", None),
    ],
)
def test_parse_valid(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert ref == Reference(registry, repository, tag, digest)


def test_str_and_properties():
    ref = parse_reference("busybox")
    assert str(ref) == "docker.io/library/busybox:latest"
    assert ref.name == "docker.io/library/busybox"
    assert ref.api_host == DOCKER_HUB_API == "registry-1.docker.io"
    assert ref.registry == DOCKER_HUB
    assert ref.manifest_key == "latest"

    pinned = parse_reference(f"ghcr.io/org/m:v1@{D256}")
    assert str(pinned) == f"ghcr.io/org/m:v1@{D256}"
    assert pinned.api_host == "ghcr.io"
    assert pinned.manifest_key == D256

    digest_only = parse_reference(f"reg:5000/m@{D256}")
    assert str(digest_only) == f"reg:5000/m@{D256}"
    assert digest_only.tag is None
    assert digest_only.manifest_key == D256

    assert Reference("r.io", "m", None, None).manifest_key == "latest"


def test_str_round_trips():
    for text in ["busybox", "ghcr.io/a/b:c", f"localhost:5000/x@{D256}", f"q.io/x:y@{D512}"]:
        ref = parse_reference(text)
        assert parse_reference(str(ref)) == ref


def test_with_digest():
    ref = parse_reference("ghcr.io/org/m:v1")
    pinned = ref.with_digest(D256)
    assert pinned == Reference("ghcr.io", "org/m", "v1", D256)
    assert ref.digest is None  # frozen, unchanged
    with pytest.raises(InvalidArgument, match="invalid digest"):
        ref.with_digest("sha256:../../etc")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("oci://", "empty"),
        ("Busybox", "must be lowercase"),
        ("docker.io/Library/busybox", "must be lowercase"),
        ("ghcr.io/Org/model", "must be lowercase"),
        ("busybox:", "bad tag"),
        ("busybox:-bad", "bad tag"),
        ("busybox:.bad", "bad tag"),
        ("busybox:a+b", "bad tag"),
        ("busybox:" + "t" * 129, "bad tag"),
        ("busy box", "whitespace"),
        ("busybox:1\tx", "whitespace"),
        ("busy\nbox", "whitespace"),
        ("a" * 1025, "too long"),
        ("busybox@sha256:xyz", "invalid digest"),
        ("busybox@sha256:" + "A" * 64, "invalid digest"),
        ("busybox@sha256:" + "a" * 63, "invalid digest"),
        ("busybox@sha256:" + "a" * 65, "invalid digest"),
        ("busybox@md5:" + "a" * 32, "invalid digest"),
        ("busybox@sha1:" + "a" * 40, "invalid digest"),
        ("busybox@sha256", "invalid digest"),
        ("busybox@", "invalid digest"),
        ("busybox@sha256:../../../etc/passwd", "invalid digest"),
        ("busybox@sha256:" + "a" * 30 + "/" + "a" * 33, "invalid digest"),
        ("busybox@sha256:" + "a" * 31 + ".." + "a" * 31, "invalid digest"),
        ("busybox@sha512:" + "a" * 64, "invalid digest"),
        ("bad_host.example.com/x", "bad registry host"),
        ("-bad.example.com/x", "bad registry host"),
        ("reg.example.com:99999999/x", "bad registry host"),
        ("reg.example.com:port/x", "bad registry host"),
        ("localhost/", "must be lowercase"),
        ("a//b", "must be lowercase"),
        ("a/b/", "must be lowercase"),
        ("/busybox", "must be lowercase"),
        ("a..b", "must be lowercase"),
        ("-a/b", "must be lowercase"),
        ("a/b_", "must be lowercase"),
        ("ghcr.io/../etc", "must be lowercase"),
    ],
)
def test_parse_invalid(text, match):
    with pytest.raises(InvalidArgument, match=match) as exc:
        parse_reference(text)
    if text.strip() and match != "empty" and len(text) < 200:
        assert repr(text) in str(exc.value)


def test_validate_digest():
    assert validate_digest(D256) == D256
    assert validate_digest(D512) == D512
    for bad in [
        "sha256:xyz",
        "md5:" + "a" * 32,
        "sha256:" + "a" * 63 + "/",
        "sha256:..",
        "SHA256:" + "a" * 64,
        "sha256" + "a" * 64,
        "",
        ":",
    ]:
        with pytest.raises(InvalidArgument, match="invalid digest"):
            validate_digest(bad)


@pytest.mark.parametrize(
    "text",
    ["sha256:" + "a" * 64 + "\n", "sha512:" + "b" * 128 + "\n"],
)
def test_validate_digest_refuses_trailing_newline(text):
    # `$` alone would match before a final newline.
    with pytest.raises(InvalidArgument, match="invalid digest"):
        validate_digest(text)


def test_leading_and_trailing_whitespace_is_stripped():
    assert parse_reference("\tbusybox:1\n") == parse_reference("busybox:1")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("127.0.0.1", True),
        ("127.1.2.3:80", True),
        ("localhost", True),
        ("localhost:5000", True),
        ("[::1]:5000", True),
        ("[::1]", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("10.0.0.1:5000", False),
        ("192.168.1.1:5000", False),
        ("example.com", False),
        ("example.com:5000", False),
        ("localhost.example.com", False),
        ("[fe80::1]:5000", False),
        ("0.0.0.0:5000", False),
        ("docker.io", False),
        ("", False),
    ],
)
def test_is_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize("alias", ["index.docker.io", "registry-1.docker.io"])
def test_docker_hub_aliases_normalise(alias):
    ref = parse_reference(f"{alias}/library/busybox:1.36")
    assert ref.registry == "docker.io" and ref.api_host == "registry-1.docker.io"
    assert str(ref) == "docker.io/library/busybox:1.36"
