"""Manifests, indexes and configs (csi_oci/manifest.py) and packaging plans (packaging.py).

Input: a selector byte (the Content-Type the registry sent, from a short
list), then the manifest bytes, optionally a NUL and the config bytes.
Everything a pull does with them before any layer is fetched runs in turn:
media type detection, index parsing and platform choice, manifest parsing,
layer compression and lazy format per layer, the packaging plan (image,
ORAS, ModelPack, KitOps) against the config, and the image config parse.
Manifests arrive verified against their digest, so none is re-sealed here.
"""

from __future__ import annotations

from csi_oci.lazy import zstdchunked
from csi_oci.lazy.reader import lazy_format
from csi_oci.oci.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    detect_media_type,
    layer_compression,
    parse_config,
    parse_index,
    parse_manifest,
    select_platform,
)
from csi_oci.oci.packaging import plan_for
from csi_oci.spec.attributes import Platform

from .common import attempt, split

NAME = "manifest"
MAX_LEN = 16 << 10
DICT = [
    b'"schemaVersion"',
    b'"mediaType"',
    b'"artifactType"',
    b'"config"',
    b'"layers"',
    b'"manifests"',
    b'"digest"',
    b'"size"',
    b'"annotations"',
    b'"platform"',
    b'"os"',
    b'"architecture"',
    b'"variant"',
    b'"rootfs"',
    b'"diff_ids"',
    b'"modelfs"',
    b'"diffIds"',
    b'"org.opencontainers.image.title"',
    b'"io.deis.oras.content.unpack"',
    b'"org.cncf.model.filepath"',
    b'"org.cnai.model.filepath"',
    b'"org.cncf.model.file.metadata+json"',
    b'"containerd.io/snapshot/stargz/toc.digest"',
    b'"io.containers.zstd-chunked.manifest-position"',
    b'"io.containers.zstd-chunked.manifest-checksum"',
    b'"application/vnd.oci.image.manifest.v1+json"',
    b'"application/vnd.oci.image.index.v1+json"',
    b'"application/vnd.oci.image.config.v1+json"',
    b'"application/vnd.oci.image.layer.v1.tar+gzip"',
    b'"application/vnd.oci.image.layer.v1.tar+zstd"',
    b'"application/vnd.cncf.model.weight.v1.raw"',
    b'"application/vnd.kitops.modelkit.model.v1.tar"',
    b'"application/vnd.kitops.modelkit.config.v1+json"',
    b'"sha256:',
    b'"sha512:',
    b"\\ud800",
    b"\x00",
]

CONTENT_TYPES = (
    None,
    "",
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_LIST,
    "application/json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    OCI_MANIFEST + "; charset=utf-8",
)
PLATFORMS = (
    Platform("linux", "amd64"),
    Platform("linux", "arm64", "v8"),
    Platform("linux", "arm", "v7"),
    Platform("windows", "amd64", None),
)


def target(data: bytes) -> None:
    if not data:
        return
    select, rest = data[0], data[1:]
    manifest, config = split(rest, 2)
    media_type = attempt(detect_media_type, manifest, CONTENT_TYPES[select % len(CONTENT_TYPES)])
    entries = attempt(parse_index, manifest)
    if entries is not None:
        for platform in PLATFORMS:
            attempt(select_platform, entries, platform)
        for desc in entries:
            lazy_format(desc.media_type, desc.annotations)
    image = attempt(parse_manifest, manifest, media_type or OCI_MANIFEST)
    if image is not None:
        _ = image.total_layer_bytes
        for layer in image.layers:
            attempt(layer_compression, layer)
            lazy_format(layer.media_type, layer.annotations)
            value = zstdchunked.annotation(layer.annotations, "manifest-position")
            if value is not None:
                attempt(zstdchunked.parse_position, value)
        plan = attempt(plan_for, image, config)
        if plan is not None:
            _ = plan.sequential
    attempt(parse_config, config or manifest)
