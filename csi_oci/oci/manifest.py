"""OCI and Docker manifests: media types, parsing, validation, platform choice.

Pure functions over bytes already verified against their digest; no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from csi_oci.errors import InvalidArgument, NotFound, RegistryError, Unsupported
from csi_oci.spec.attributes import Platform
from csi_oci.spec.reference import validate_digest
from csi_oci.stream.inflate import Compression

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1_PREFIX = "application/vnd.docker.distribution.manifest.v1+"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPTED_MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)

# Manifests are small; a huge one is an attack or a mistake (containerd caps at 4 MiB).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024


LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": Compression.NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": Compression.ZSTD,
}


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str]
    platform: Platform | None = None


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    artifact_type: str = ""
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def total_layer_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)


def _descriptor(obj: Any, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise RegistryError(f"malformed manifest: {where} is not an object")
    try:
        digest = validate_digest(str(obj["digest"]))
        size = obj["size"]
        media_type = str(obj.get("mediaType", ""))
    except KeyError as exc:
        raise RegistryError(f"malformed manifest: {where} lacks {exc.args[0]!r}") from None
    except InvalidArgument as exc:
        raise RegistryError(f"malformed manifest: {where}: {exc}") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"malformed manifest: {where} has invalid size {size!r}")
    plat = None
    raw_plat = obj.get("platform")
    if isinstance(raw_plat, dict):
        plat = Platform(
            str(raw_plat.get("os", "")),
            str(raw_plat.get("architecture", "")),
            raw_plat.get("variant") or None,
        )
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise RegistryError(f"malformed manifest: {where} annotations are not an object")
    return Descriptor(
        media_type, digest, size, {str(k): str(v) for k, v in annotations.items()}, plat
    )


def parse_json(data: bytes | str, what: str) -> Any:
    """Any JSON value from outside; malformed input is a RegistryError, never a crash."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise RegistryError(f"{what} is not valid JSON: nested too deeply") from None


def load_json(data: bytes | str, what: str) -> dict[str, Any]:
    """A JSON object from a registry or an annotation: anything else is RegistryError.

    RecursionError too: `[[[[...` nested a few thousand deep stops the parser
    (tests/fuzz/regressions/manifest/deeply-nested-json).
    """
    obj = parse_json(data, what)
    if not isinstance(obj, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return obj


def detect_media_type(data: bytes, header_type: str | None) -> str:
    """The manifest's media type: its own `mediaType` field, else the Content-Type.

    A disagreement between the two is refused (distribution-spec: clients
    SHOULD reject it), as is schema 1, which carries no digests we can trust.
    """
    obj = load_json(data, "manifest")
    body_type = obj.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise RegistryError("manifest mediaType is not a string")
    header = (header_type or "").split(";")[0].strip()
    if body_type and header and header in ACCEPTED_MANIFEST_TYPES and body_type != header:
        raise RegistryError(
            f"manifest mediaType {body_type!r} disagrees with Content-Type {header!r}"
        )
    media_type = body_type or header
    if not media_type:
        # An OCI manifest without mediaType is legal; infer from the shape.
        media_type = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
    if obj.get("schemaVersion") == 1 or media_type.startswith(DOCKER_SCHEMA1_PREFIX):
        raise Unsupported(
            "Docker schema 1 manifests are not supported; push the image with a current client"
        )
    if media_type not in ACCEPTED_MANIFEST_TYPES:
        raise Unsupported(f"unsupported manifest media type {media_type!r}")
    return media_type


def parse_index(data: bytes) -> list[Descriptor]:
    obj = load_json(data, "image index")
    manifests = obj.get("manifests")
    if not isinstance(manifests, list):
        raise RegistryError("malformed image index: 'manifests' is not a list")
    return [_descriptor(m, f"manifests[{i}]") for i, m in enumerate(manifests)]


def parse_manifest(data: bytes, media_type: str) -> ImageManifest:
    obj = load_json(data, "image manifest")
    config = _descriptor(obj.get("config"), "config")
    layers_raw = obj.get("layers")
    if not isinstance(layers_raw, list):
        raise RegistryError("malformed image manifest: 'layers' is not a list")
    layers = tuple(_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers_raw))
    artifact_type = obj.get("artifactType") or ""
    if not isinstance(artifact_type, str):
        raise RegistryError("malformed image manifest: artifactType is not a string")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise RegistryError("malformed image manifest: annotations are not an object")
    return ImageManifest(
        media_type=media_type,
        config=config,
        layers=layers,
        artifact_type=artifact_type,
        annotations=tuple(sorted((str(k), str(v)) for k, v in annotations.items())),
    )


def _variant_matches(want: Platform, have: Platform) -> bool:
    if want.variant is None or have.variant is None:
        return True
    return want.variant == have.variant


def select_platform(entries: list[Descriptor], want: Platform) -> Descriptor:
    """Pick the index entry for `want`; exact variant first, then any variant.

    Attestation manifests (buildx writes `unknown/unknown` entries) never match.
    """
    candidates = [
        d
        for d in entries
        if d.platform is not None
        and d.annotations.get("vnd.docker.reference.type") != "attestation-manifest"
        and d.platform.os != "unknown"
        and d.platform.os == want.os
        and d.platform.architecture == want.architecture
        and d.media_type in (*MANIFEST_TYPES, "")
    ]
    exact = [d for d in candidates if d.platform and d.platform.variant == want.variant]
    loose = [d for d in candidates if d.platform and _variant_matches(want, d.platform)]
    if exact:
        return exact[0]
    if loose:
        return loose[0]
    offered = ", ".join(sorted({str(d.platform) for d in entries if d.platform})) or "none"
    raise NotFound(f"image index has no manifest for platform {want} (it offers: {offered})")


@dataclass(frozen=True)
class ImageConfig:
    diff_ids: tuple[str, ...]
    os: str
    architecture: str


def parse_config(data: bytes) -> ImageConfig:
    """Read the fields we verify against: the DiffIDs of the layers.

    Artifacts (ORAS, ModelPack) have other config types; the foundation only
    unpacks images, so a config without rootfs.diff_ids is refused here.
    """
    obj = load_json(data, "image config")
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise Unsupported("image config has no rootfs.diff_ids; artifacts are not supported yet")
    try:
        diff_ids = tuple(validate_digest(str(d)) for d in rootfs["diff_ids"])
    except InvalidArgument as exc:
        raise RegistryError(f"image config has a bad diff_id: {exc}") from None
    return ImageConfig(
        diff_ids=diff_ids, os=str(obj.get("os", "")), architecture=str(obj.get("architecture", ""))
    )


def layer_compression(desc: Descriptor) -> str:
    comp = LAYER_COMPRESSION.get(desc.media_type)
    if comp is None:
        raise Unsupported(f"layer {desc.digest} has unsupported media type {desc.media_type!r}")
    return comp
