"""Unit tests of csi_oci/manifest.py: media types, parsing, platform selection."""

from __future__ import annotations

import json

import pytest

from csi_oci.errors import InvalidArgument, NotFound, RegistryError, Unsupported
from csi_oci.oci.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    LAYER_COMPRESSION,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageManifest,
    detect_media_type,
    layer_compression,
    load_json,
    parse_config,
    parse_index,
    parse_manifest,
    select_platform,
)
from csi_oci.spec.attributes import Platform
from csi_oci.stream.inflate import Compression

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
D4 = "sha256:" + "4" * 64
D512 = "sha512:" + "5" * 128
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def dumps(obj: object) -> bytes:
    return json.dumps(obj).encode()


OCI_MANIFEST_DOC = {
    "schemaVersion": 2,
    "mediaType": OCI_MANIFEST,
    "config": {"mediaType": OCI_CONFIG, "digest": D1, "size": 1234},
    "layers": [
        {"mediaType": OCI_LAYER_GZ, "digest": D2, "size": 100},
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
            "digest": D3,
            "size": 200,
            "annotations": {"org.opencontainers.image.title": "weights.bin"},
        },
    ],
    "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
}

# As `docker manifest inspect -v` shows a Docker Hub image.
DOCKER_MANIFEST_DOC = {
    "schemaVersion": 2,
    "mediaType": DOCKER_MANIFEST,
    "config": {
        "mediaType": "application/vnd.docker.container.image.v1+json",
        "size": 1457,
        "digest": D1,
    },
    "layers": [
        {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": 2152262,
            "digest": D2,
        }
    ],
}


def plat(os_: str, arch: str, variant: str | None = None) -> dict:
    p = {"os": os_, "architecture": arch}
    if variant:
        p["variant"] = variant
    return p


def index_doc(media_type: str = OCI_INDEX, child_type: str = OCI_MANIFEST) -> dict:
    return {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": child_type,
                "digest": D1,
                "size": 500,
                "platform": plat("linux", "amd64"),
            },
            {
                "mediaType": child_type,
                "digest": D2,
                "size": 501,
                "platform": plat("linux", "arm", "v7"),
            },
            {
                "mediaType": child_type,
                "digest": D3,
                "size": 502,
                "platform": plat("linux", "arm64", "v8"),
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": D4,
                "size": 840,
                "platform": plat("unknown", "unknown"),
                "annotations": {
                    "vnd.docker.reference.digest": D1,
                    "vnd.docker.reference.type": "attestation-manifest",
                },
            },
        ],
    }


# -- detect_media_type -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "header", "expected"),
    [
        (OCI_MANIFEST_DOC, OCI_MANIFEST, OCI_MANIFEST),
        (OCI_MANIFEST_DOC, None, OCI_MANIFEST),
        (OCI_MANIFEST_DOC, "application/json", OCI_MANIFEST),
        (OCI_MANIFEST_DOC, "text/plain; charset=utf-8", OCI_MANIFEST),
        (DOCKER_MANIFEST_DOC, DOCKER_MANIFEST, DOCKER_MANIFEST),
        (index_doc(), OCI_INDEX, OCI_INDEX),
        (index_doc(DOCKER_LIST, DOCKER_MANIFEST), DOCKER_LIST, DOCKER_LIST),
        (index_doc(DOCKER_LIST, DOCKER_MANIFEST), f"{DOCKER_LIST}; charset=utf-8", DOCKER_LIST),
    ],
)
def test_detect_media_type(doc, header, expected):
    assert detect_media_type(dumps(doc), header) == expected


def test_detect_media_type_from_header_when_body_has_none():
    doc = {k: v for k, v in OCI_MANIFEST_DOC.items() if k != "mediaType"}
    assert detect_media_type(dumps(doc), DOCKER_MANIFEST) == DOCKER_MANIFEST
    assert detect_media_type(dumps(doc), f" {OCI_MANIFEST} ; x=y") == OCI_MANIFEST


def test_detect_media_type_inferred_from_shape():
    doc = {k: v for k, v in OCI_MANIFEST_DOC.items() if k != "mediaType"}
    assert detect_media_type(dumps(doc), None) == OCI_MANIFEST
    assert detect_media_type(dumps(doc), "") == OCI_MANIFEST
    idx = {k: v for k, v in index_doc().items() if k != "mediaType"}
    assert detect_media_type(dumps(idx), None) == OCI_INDEX


@pytest.mark.parametrize(
    ("body", "header"),
    [
        (OCI_MANIFEST, DOCKER_MANIFEST),
        (OCI_MANIFEST, OCI_INDEX),
        (DOCKER_MANIFEST, OCI_MANIFEST),
        (OCI_INDEX, DOCKER_LIST),
    ],
)
def test_detect_media_type_mismatch_refused(body, header):
    doc = dict(OCI_MANIFEST_DOC, mediaType=body)
    with pytest.raises(RegistryError, match="disagrees with Content-Type") as exc:
        detect_media_type(dumps(doc), header)
    assert repr(body) in str(exc.value) and repr(header) in str(exc.value)


@pytest.mark.parametrize(
    ("doc", "header"),
    [
        ({"schemaVersion": 1, "name": "x", "tag": "latest", "fsLayers": []}, None),
        (
            {"schemaVersion": 1, "fsLayers": []},
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        ),
        ({"fsLayers": []}, "application/vnd.docker.distribution.manifest.v1+json"),
        (
            {"schemaVersion": 1, "mediaType": DOCKER_MANIFEST},
            DOCKER_MANIFEST,
        ),
    ],
)
def test_detect_media_type_schema1_refused(doc, header):
    with pytest.raises(Unsupported, match="schema 1"):
        detect_media_type(dumps(doc), header)


@pytest.mark.parametrize(
    ("doc", "header", "bad"),
    [
        ({"mediaType": "application/vnd.cncf.helm.chart.v1+json"}, None, "helm"),
        ({"schemaVersion": 2}, "application/vnd.oci.artifact.manifest.v1+json", "artifact"),
        ({"mediaType": "text/html"}, None, "text/html"),
    ],
)
def test_detect_media_type_unknown_refused(doc, header, bad):
    with pytest.raises(Unsupported, match="unsupported manifest media type") as exc:
        detect_media_type(dumps(doc), header)
    assert bad in str(exc.value)


@pytest.mark.parametrize("data", [b"", b"not json", b"\xff\xfe", b"[]", b'"x"', b"null"])
def test_detect_media_type_not_json_object(data):
    with pytest.raises(RegistryError, match="manifest is not"):
        detect_media_type(data, OCI_MANIFEST)


def test_load_json():
    assert load_json(b'{"a": 1}', "thing") == {"a": 1}
    with pytest.raises(RegistryError, match="thing is not valid JSON"):
        load_json(b"{", "thing")
    with pytest.raises(RegistryError, match="thing is not a JSON object"):
        load_json(b"[1]", "thing")


# -- parse_manifest / parse_index ----------------------------------------------------


def test_parse_oci_manifest():
    m = parse_manifest(dumps(OCI_MANIFEST_DOC), OCI_MANIFEST)
    assert m == ImageManifest(
        media_type=OCI_MANIFEST,
        config=Descriptor(OCI_CONFIG, D1, 1234, {}),
        layers=(
            Descriptor(OCI_LAYER_GZ, D2, 100, {}),
            Descriptor(
                "application/vnd.oci.image.layer.v1.tar+zstd",
                D3,
                200,
                {"org.opencontainers.image.title": "weights.bin"},
            ),
        ),
        annotations=(("org.opencontainers.image.created", "2024-01-01T00:00:00Z"),),
    )
    assert m.total_layer_bytes == 300


def test_parse_docker_manifest():
    m = parse_manifest(dumps(DOCKER_MANIFEST_DOC), DOCKER_MANIFEST)
    assert m.media_type == DOCKER_MANIFEST
    assert m.config.digest == D1 and m.config.size == 1457
    assert [(d.media_type, d.digest, d.size) for d in m.layers] == [
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", D2, 2152262)
    ]
    assert layer_compression(m.layers[0]) == Compression.GZIP


def test_parse_manifest_without_layers_list_and_empty_layers():
    doc = dict(OCI_MANIFEST_DOC, layers=[])
    assert parse_manifest(dumps(doc), OCI_MANIFEST).layers == ()
    assert parse_manifest(dumps(doc), OCI_MANIFEST).total_layer_bytes == 0
    for bad in (None, {}, "x"):
        doc = dict(OCI_MANIFEST_DOC, layers=bad)
        with pytest.raises(RegistryError, match="'layers' is not a list"):
            parse_manifest(dumps(doc), OCI_MANIFEST)
    doc = {k: v for k, v in OCI_MANIFEST_DOC.items() if k != "config"}
    with pytest.raises(RegistryError, match="config is not an object"):
        parse_manifest(dumps(doc), OCI_MANIFEST)


def test_parse_index_oci_and_docker():
    for media_type, child in [(OCI_INDEX, OCI_MANIFEST), (DOCKER_LIST, DOCKER_MANIFEST)]:
        entries = parse_index(dumps(index_doc(media_type, child)))
        assert [d.digest for d in entries] == [D1, D2, D3, D4]
        assert entries[0] == Descriptor(child, D1, 500, {}, Platform("linux", "amd64"))
        assert entries[1].platform == Platform("linux", "arm", "v7")
        assert entries[3].platform == Platform("unknown", "unknown")
        assert entries[3].annotations["vnd.docker.reference.type"] == "attestation-manifest"


def test_parse_index_descriptor_without_platform():
    doc = {"manifests": [{"mediaType": OCI_MANIFEST, "digest": D1, "size": 1}]}
    (entry,) = parse_index(dumps(doc))
    assert entry.platform is None
    assert parse_index(dumps({"manifests": []})) == []


@pytest.mark.parametrize("manifests", [None, {}, "x", 3])
def test_parse_index_manifests_not_a_list(manifests):
    doc = {} if manifests is None else {"manifests": manifests}
    with pytest.raises(RegistryError, match="'manifests' is not a list"):
        parse_index(dumps(doc))


GOOD = {"mediaType": OCI_LAYER_GZ, "digest": D2, "size": 10}


@pytest.mark.parametrize(
    ("descriptor", "match"),
    [
        ({"mediaType": OCI_LAYER_GZ, "size": 10}, "lacks 'digest'"),
        ({"mediaType": OCI_LAYER_GZ, "digest": D2}, "lacks 'size'"),
        (dict(GOOD, size=-1), "invalid size -1"),
        (dict(GOOD, size=True), "invalid size True"),
        (dict(GOOD, size=False), "invalid size False"),
        (dict(GOOD, size=1.5), "invalid size 1.5"),
        (dict(GOOD, size="10"), "invalid size '10'"),
        (dict(GOOD, size=None), "invalid size None"),
        (dict(GOOD, digest="sha256:xyz"), "invalid digest"),
        (dict(GOOD, digest="md5:" + "a" * 32), "invalid digest"),
        (dict(GOOD, digest="sha256:../../../../etc/passwd"), "invalid digest"),
        (dict(GOOD, digest="sha256:" + "a" * 30 + "/" + "a" * 33), "invalid digest"),
        (dict(GOOD, digest=None), "invalid digest"),
        (dict(GOOD, digest=12), "invalid digest"),
        (dict(GOOD, annotations=["a"]), "annotations are not an object"),
        ("sha256:abc", "is not an object"),
        (None, "is not an object"),
    ],
)
def test_malformed_layer_descriptor(descriptor, match):
    doc = dict(OCI_MANIFEST_DOC, layers=[GOOD, descriptor])
    with pytest.raises(RegistryError, match=match) as exc:
        parse_manifest(dumps(doc), OCI_MANIFEST)
    assert "layers[1]" in str(exc.value)
    assert not isinstance(exc.value, InvalidArgument)


@pytest.mark.parametrize(
    ("descriptor", "match"),
    [
        ({"digest": D1}, "lacks 'size'"),
        (dict(GOOD, size=-5), "invalid size"),
        (dict(GOOD, digest="sha256:" + "A" * 64), "invalid digest"),
    ],
)
def test_malformed_config_and_index_descriptors(descriptor, match):
    doc = dict(OCI_MANIFEST_DOC, config=descriptor)
    with pytest.raises(RegistryError, match=f"config.*{match}"):
        parse_manifest(dumps(doc), OCI_MANIFEST)
    with pytest.raises(RegistryError, match=rf"manifests\[0\].*{match}"):
        parse_index(dumps({"manifests": [descriptor]}))


def test_descriptor_edge_values_accepted():
    doc = dict(
        OCI_MANIFEST_DOC,
        layers=[
            {"digest": D512, "size": 0},  # no mediaType, sha512, empty blob
            dict(GOOD, size=2**40, annotations=None),
            dict(GOOD, annotations={"n": 1}),
        ],
    )
    m = parse_manifest(dumps(doc), OCI_MANIFEST)
    assert m.layers[0] == Descriptor("", D512, 0, {})
    assert m.layers[1].size == 2**40 and m.layers[1].annotations == {}
    assert m.layers[2].annotations == {"n": "1"}


# -- select_platform --------------------------------------------------------------


def entries_for(*platforms: tuple, media_type: str = OCI_MANIFEST) -> list[Descriptor]:
    out = []
    for i, p in enumerate(platforms):
        digest = "sha256:" + f"{i:x}" * 64
        platform = None if p is None else Platform(*p)
        out.append(Descriptor(media_type, digest[:71], 100 + i, {}, platform))
    return out


def test_select_platform_exact():
    entries = parse_index(dumps(index_doc()))
    assert select_platform(entries, Platform("linux", "amd64")).digest == D1
    assert select_platform(entries, Platform("linux", "arm", "v7")).digest == D2
    assert select_platform(entries, Platform("linux", "arm64", "v8")).digest == D3


def test_select_platform_exact_variant_preferred_over_order():
    entries = entries_for(("linux", "arm", "v6"), ("linux", "arm", "v7"), ("linux", "arm", None))
    assert select_platform(entries, Platform("linux", "arm", "v7")) is entries[1]
    assert select_platform(entries, Platform("linux", "arm", "v6")) is entries[0]
    # No variant wanted: the variant-less entry is the exact match.
    assert select_platform(entries, Platform("linux", "arm")) is entries[2]


def test_select_platform_variantless_fallback():
    entries = parse_index(dumps(index_doc()))
    # arm64 wanted without variant: the v8 entry matches loosely.
    assert select_platform(entries, Platform("linux", "arm64")).digest == D3
    # amd64/v3 wanted: the variant-less amd64 entry.
    assert select_platform(entries, Platform("linux", "amd64", "v3")).digest == D1
    # A different variant is not a match.
    with pytest.raises(NotFound):
        select_platform(entries, Platform("linux", "arm", "v6"))


def test_select_platform_never_picks_attestations():
    entries = parse_index(dumps(index_doc()))
    # Attestations listed first do not shadow the image.
    first = [entries[3], *entries[:3]]
    assert select_platform(first, Platform("linux", "amd64")).digest == D1
    assert select_platform(first, Platform("linux", "arm64")).digest == D3


def test_select_platform_refuses_attestation_even_when_asked_for():
    entries = parse_index(dumps(index_doc()))
    with pytest.raises(NotFound):
        select_platform(entries, Platform("unknown", "unknown"))


def test_select_platform_skips_annotated_attestation_with_a_real_platform():
    attestation = Descriptor(
        OCI_MANIFEST,
        D4,
        1,
        {"vnd.docker.reference.type": "attestation-manifest"},
        Platform("linux", "amd64"),
    )
    image = Descriptor(OCI_MANIFEST, D1, 1, {}, Platform("linux", "amd64"))
    assert select_platform([attestation, image], Platform("linux", "amd64")) is image
    with pytest.raises(NotFound):
        select_platform([attestation], Platform("linux", "amd64"))


def test_select_platform_skips_non_manifest_children():
    entries = [
        Descriptor(OCI_INDEX, D1, 1, {}, Platform("linux", "amd64")),  # nested index
        Descriptor("application/vnd.in-toto+json", D2, 1, {}, Platform("linux", "amd64")),
        Descriptor(DOCKER_MANIFEST, D3, 1, {}, Platform("linux", "amd64")),
    ]
    assert select_platform(entries, Platform("linux", "amd64")).digest == D3
    assert (
        select_platform(
            [Descriptor("", D4, 1, {}, Platform("linux", "amd64"))], Platform("linux", "amd64")
        ).digest
        == D4
    )


def test_select_platform_missing_lists_offered():
    entries = parse_index(dumps(index_doc()))
    with pytest.raises(NotFound) as exc:
        select_platform(entries, Platform("linux", "s390x"))
    msg = str(exc.value)
    assert "linux/s390x" in msg
    for offered in ("linux/amd64", "linux/arm/v7", "linux/arm64/v8"):
        assert offered in msg
    with pytest.raises(NotFound, match="windows/amd64"):
        select_platform(entries, Platform("windows", "amd64"))


def test_select_platform_nothing_offered():
    with pytest.raises(NotFound, match=r"offers: none"):
        select_platform([], Platform("linux", "amd64"))
    no_platforms = entries_for(None, None)
    with pytest.raises(NotFound, match=r"offers: none"):
        select_platform(no_platforms, Platform("linux", "amd64"))


# -- parse_config ------------------------------------------------------------------


def test_parse_config():
    config = {
        "architecture": "arm64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [D1, D2, D512]},
        "history": [],
    }
    parsed = parse_config(dumps(config))
    assert parsed.diff_ids == (D1, D2, D512)
    assert parsed.os == "linux" and parsed.architecture == "arm64"


def test_parse_config_empty_diff_ids_and_missing_fields():
    parsed = parse_config(dumps({"rootfs": {"type": "layers", "diff_ids": []}}))
    assert parsed.diff_ids == () and parsed.os == "" and parsed.architecture == ""


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"rootfs": None},
        {"rootfs": {"type": "layers"}},
        {"rootfs": {"diff_ids": "sha256:abc"}},
        {"mediaType": "application/vnd.cncf.model.config.v1+json", "descriptor": {}},
    ],
)
def test_parse_config_without_diff_ids_unsupported(config):
    with pytest.raises(Unsupported, match=r"no rootfs\.diff_ids"):
        parse_config(dumps(config))


@pytest.mark.parametrize("bad", ["sha256:xyz", "md5:" + "0" * 32, None, "sha256:" + "1" * 63])
def test_parse_config_bad_diff_id(bad):
    with pytest.raises(RegistryError, match="bad diff_id"):
        parse_config(dumps({"rootfs": {"type": "layers", "diff_ids": [D1, bad]}}))


def test_parse_config_not_json():
    with pytest.raises(RegistryError, match="image config is not valid JSON"):
        parse_config(b"\x1f\x8b gzip?")


# -- layer_compression ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "compression"),
    [
        ("application/vnd.oci.image.layer.v1.tar", "none"),
        ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
        ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", "none"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", "zstd"),
        ("application/vnd.docker.image.rootfs.diff.tar", "none"),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
        ("application/vnd.docker.image.rootfs.diff.tar.zstd", "zstd"),
    ],
)
def test_layer_compression(media_type, compression):
    assert layer_compression(Descriptor(media_type, D2, 1, {})) == compression


def test_layer_compression_table_is_complete():
    assert len(LAYER_COMPRESSION) == 9
    assert set(LAYER_COMPRESSION.values()) == {Compression.NONE, Compression.GZIP, Compression.ZSTD}


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.oci.image.layer.v1.tar+bzip2",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/octet-stream",
        "",
        "APPLICATION/VND.OCI.IMAGE.LAYER.V1.TAR",
    ],
)
def test_layer_compression_unknown(media_type):
    with pytest.raises(Unsupported, match="unsupported media type") as exc:
        layer_compression(Descriptor(media_type, D2, 1, {}))
    assert repr(media_type) in str(exc.value)
    assert D2 in str(exc.value)


@pytest.mark.parametrize("media_type", [5, ["x"], {"a": 1}])
def test_detect_media_type_non_string_media_type(media_type):
    with pytest.raises((RegistryError, Unsupported)):
        detect_media_type(dumps({"mediaType": media_type}), None)


def test_descriptor_digest_with_trailing_newline_refused():
    doc = dict(OCI_MANIFEST_DOC, layers=[dict(GOOD, digest=D2 + "\n")])
    with pytest.raises(RegistryError, match="invalid digest"):
        parse_manifest(dumps(doc), OCI_MANIFEST)
