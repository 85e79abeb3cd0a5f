"""Unit tests of csi_oci/attributes.py: volume attributes -> VolumeSpec."""

from __future__ import annotations

import pytest

from csi_oci.errors import InvalidArgument
from csi_oci.spec.attributes import (
    KNOWN_KEYS,
    Mode,
    Platform,
    PullPolicy,
    VolumeSpec,
    default_pull_policy,
    node_platform,
    normalize_sub_path,
    parse_platform,
    parse_volume_attributes,
)
from csi_oci.spec.reference import parse_reference

D256 = "sha256:" + "c" * 64


def spec(**attrs: str) -> VolumeSpec:
    return parse_volume_attributes(attrs)


# -- defaults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "policy"),
    [
        ("busybox", PullPolicy.ALWAYS),
        ("busybox:latest", PullPolicy.ALWAYS),
        ("ghcr.io/org/model", PullPolicy.ALWAYS),
        ("busybox:1.36", PullPolicy.IF_NOT_PRESENT),
        ("ghcr.io/org/model:v1", PullPolicy.IF_NOT_PRESENT),
        (f"busybox@{D256}", PullPolicy.IF_NOT_PRESENT),
        (f"busybox:latest@{D256}", PullPolicy.IF_NOT_PRESENT),
        ("busybox:Latest", PullPolicy.IF_NOT_PRESENT),  # tags are case-sensitive
    ],
)
def test_default_pull_policy(image, policy):
    assert spec(image=image).pull_policy is policy
    assert default_pull_policy(parse_reference(image)) is policy


def test_defaults():
    s = spec(image="ghcr.io/org/model:v1")
    assert s.reference == parse_reference("ghcr.io/org/model:v1")
    assert s.mode is Mode.AUTO
    assert s.sub_path == ""
    assert s.platform == node_platform()
    assert s.canonical() == {
        "image": "ghcr.io/org/model:v1",
        "pullPolicy": "IfNotPresent",
        "mode": "auto",
        "subPath": "",
        "platform": str(node_platform()),
    }
    # include and signaturePolicy appear only when set (prefetch only in lazy
    # mode), so records from before they existed still match
    assert set(s.canonical()) == set(KNOWN_KEYS) - {"include", "prefetch", "signaturePolicy"}


def test_signature_policy_names_a_rule_and_is_recorded():
    s = spec(image="ghcr.io/org/model:v1", signaturePolicy=" strict ")
    assert s.signature_rule == "strict"
    assert s.canonical()["signaturePolicy"] == "strict"
    for bad in ("x" * 129, "a\nb", "tab\there"):
        with pytest.raises(InvalidArgument, match="signaturePolicy"):
            spec(image="ghcr.io/org/model:v1", signaturePolicy=bad)


def test_node_platform_is_linux_in_oci_spelling():
    plat = node_platform()
    assert plat.os == "linux"
    assert plat.architecture not in ("x86_64", "aarch64", "armv7l", "i686")


def test_empty_values_mean_default():
    s = spec(image="busybox", pullPolicy="", mode="  ", subPath="", platform=" ")
    assert s == spec(image="busybox")


# -- explicit values ----------------------------------------------------------------


@pytest.mark.parametrize("policy", ["Always", "IfNotPresent", "Never", " Never "])
def test_explicit_pull_policy(policy):
    s = spec(image=f"busybox@{D256}", pullPolicy=policy)
    assert s.pull_policy == PullPolicy(policy.strip())


@pytest.mark.parametrize("mode", ["auto", "unpack"])
def test_explicit_mode(mode):
    assert spec(image="busybox", mode=mode).mode == Mode(mode)


def test_explicit_everything_and_canonical():
    s = spec(
        image="  oci://reg.example.com:5000/team/model:v3  ",
        pullPolicy="Never",
        mode="unpack",
        subPath="./weights//fp16/",
        platform="linux/arm64/v8",
    )
    assert s == VolumeSpec(
        reference=parse_reference("reg.example.com:5000/team/model:v3"),
        pull_policy=PullPolicy.NEVER,
        mode=Mode.UNPACK,
        sub_path="weights/fp16",
        platform=Platform("linux", "arm64", "v8"),
    )
    assert s.canonical() == {
        "image": "reg.example.com:5000/team/model:v3",
        "pullPolicy": "Never",
        "mode": "unpack",
        "subPath": "weights/fp16",
        "platform": "linux/arm64/v8",
    }
    # The canonical form parses back to the same spec.
    assert parse_volume_attributes(s.canonical()) == s


def test_spec_is_hashable_and_comparable():
    a = spec(image="busybox:1", subPath="a/b")
    b = spec(image="docker.io/library/busybox:1", subPath="./a/b/")
    assert a == b and hash(a) == hash(b)
    assert a != spec(image="busybox:1", subPath="a")


# -- bad values ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["always", "ALWAYS", "IfNotPresent!", "Sometimes"])
def test_bad_pull_policy(policy):
    with pytest.raises(InvalidArgument, match="invalid pullPolicy") as exc:
        spec(image="busybox", pullPolicy=policy)
    assert repr(policy) in str(exc.value)
    assert "Always, IfNotPresent or Never" in str(exc.value)


@pytest.mark.parametrize("mode", ["Auto", "fuse", "lazy2", "UNPACK"])
def test_bad_mode(mode):
    with pytest.raises(InvalidArgument, match="invalid mode") as exc:
        spec(image="busybox", mode=mode)
    assert repr(mode) in str(exc.value)


def test_lazy_mode_takes_include():
    assert spec(image="busybox", mode="lazy").mode.value == "lazy"
    lazy = spec(image="busybox", mode="lazy", include="*.json")
    assert lazy.include == ("*.json",) and lazy.canonical()["include"] == "*.json"


@pytest.mark.parametrize("image", [None, "", "   "])
def test_missing_image(image):
    attrs = {} if image is None else {"image": image}
    with pytest.raises(InvalidArgument, match="'image' is required"):
        parse_volume_attributes(attrs)


def test_bad_image_reference():
    with pytest.raises(InvalidArgument, match="must be lowercase") as exc:
        spec(image="Busybox")
    assert "'Busybox'" in str(exc.value)
    with pytest.raises(InvalidArgument, match="invalid digest"):
        spec(image="busybox@sha256:xyz")


def test_image_key_is_case_sensitive():
    with pytest.raises(InvalidArgument, match="'image' is required"):
        parse_volume_attributes({"Image": "busybox"})


# -- subPath ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("", ""),
        (".", ""),
        ("./", ""),
        ("a", "a"),
        ("a/b/c", "a/b/c"),
        ("./a//b/./c/", "a/b/c"),
        ("  models/llm  ", "models/llm"),
        ("..a/b..", "..a/b.."),
        ("a/.hidden", "a/.hidden"),
    ],
)
def test_sub_path_normalised(text, normal):
    assert normalize_sub_path(text) == normal
    assert spec(image="busybox", subPath=text).sub_path == normal


@pytest.mark.parametrize("text", ["..", "../x", "a/../b", "a/..", "./../etc", "a/b/../../.."])
def test_sub_path_dotdot_refused(text):
    with pytest.raises(InvalidArgument, match=r"must not contain '\.\.'") as exc:
        spec(image="busybox", subPath=text)
    assert repr(text) in str(exc.value)


@pytest.mark.parametrize("text", ["/", "/etc", "/a/b", " /a"])
def test_sub_path_absolute_refused(text):
    with pytest.raises(InvalidArgument, match="must be relative") as exc:
        spec(image="busybox", subPath=text)
    assert repr(text) in str(exc.value)


def test_sub_path_nul_refused():
    with pytest.raises(InvalidArgument, match="NUL"):
        normalize_sub_path("a/b\0c")


# -- platform ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "plat"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("linux/arm64/v8", Platform("linux", "arm64", "v8")),
        ("linux/arm/v7", Platform("linux", "arm", "v7")),
        ("windows/amd64", Platform("windows", "amd64")),
        (" linux/s390x ", Platform("linux", "s390x")),
    ],
)
def test_parse_platform(text, plat):
    assert parse_platform(text) == plat
    assert spec(image="busybox", platform=text).platform == plat
    assert str(plat) == text.strip()


@pytest.mark.parametrize(
    "text", ["linux", "linux/", "/amd64", "linux/arm/v7/x", "linux//v7", "a/b/"]
)
def test_parse_platform_invalid(text):
    with pytest.raises(InvalidArgument, match="invalid platform") as exc:
        spec(image="busybox", platform=text)
    assert repr(text) in str(exc.value)


# -- unknown keys -------------------------------------------------------------------


def test_unknown_keys_ignored():
    attrs = {
        "image": "busybox:1",
        "csi.storage.k8s.io/pod.name": "web-0",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/pod.uid": "1234",
        "csi.storage.k8s.io/serviceAccount.name": "default",
        "csi.storage.k8s.io/ephemeral": "true",
        "storage.kubernetes.io/csiProvisionerIdentity": "123-csi-oci",
        "somethingElse": "../../etc",
    }
    assert parse_volume_attributes(attrs) == spec(image="busybox:1")
