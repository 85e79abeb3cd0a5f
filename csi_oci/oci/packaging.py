"""How an image or artifact becomes a directory tree: one plan per manifest.

Pure: given the manifest and its (verified) config bytes, decide for every
layer whether it is
  * an image layer (tar applied in order, whiteouts, checked against diff_ids),
  * an artifact tar (a plain file tree, extracted with the strict policy), or
  * a raw file (the blob *is* the file, written once at a validated path),
and what each layer's bytes must hash to once uncompressed.

Packagings recognised:
  image     OCI / Docker image config; KServe ModelCar images are images
            (their model lives in /models: publish with subPath: models)
  oras      layers titled with `org.opencontainers.image.title` (oras CLI,
            oras-py): a file of that name, or a directory when the layer says
            `io.deis.oras.content.unpack: true`. oras labels plain files as
            `application/vnd.oci.image.layer.v1.tar`, so the title decides,
            not the media type.
  modelpack CNCF ModelPack (model-spec): `application/vnd.cncf.model.*` layers
            (also the older `vnd.cnai.model` spelling), path from
            `org.cncf.model.filepath`, diff ids from `modelfs.diffIds`
  kitops    KitOps ModelKits: `application/vnd.kitops.modelkit.*` tar layers

Names taken from annotations are validated exactly like tar member names.
An unknown media type is an error naming it: never skipped silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from csi_oci.errors import InvalidArgument, InvalidLayer, RegistryError, Unsupported
from csi_oci.oci.manifest import (
    LAYER_COMPRESSION,
    Descriptor,
    ImageManifest,
    parse_config,
    parse_json,
)
from csi_oci.spec.reference import validate_digest
from csi_oci.stream.inflate import Compression

IMAGE_CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)
TITLE = "org.opencontainers.image.title"
ORAS_UNPACK = "io.deis.oras.content.unpack"
MODELPACK_ARTIFACT_TYPES = (
    "application/vnd.cncf.model.manifest.v1+json",
    "application/vnd.cnai.model.manifest.v1+json",
)
MODELPACK_CONFIG_TYPES = (
    "application/vnd.cncf.model.config.v1+json",
    "application/vnd.cnai.model.config.v1+json",
)
MODELPACK_FILEPATH = ("org.cncf.model.filepath", "org.cnai.model.filepath")
MODELPACK_FILE_METADATA = ("org.cncf.model.file.metadata+json", "org.cnai.model.file.metadata+json")
# oras-py marks a directory only by this media type (no unpack annotation),
# and unpacks exactly this type on pull; oras CLI files are `...v1.tar`.
ORAS_PY_DIR_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
_MODELPACK_LAYER = re.compile(
    r"^application/vnd\.(cncf|cnai)\.model\.([a-z.]+)\.v1\.(raw|tar|tar\+gzip|tar\+zstd)$"
)
_KITOPS_LAYER = re.compile(
    r"^application/vnd\.kitops\.modelkit\.([a-z]+)\.v1\.(raw|tar|tar\+gzip|tar\+zstd)$"
)
KITOPS_CONFIG_PREFIX = "application/vnd.kitops.modelkit.config"
_FORMAT_COMPRESSION = {
    "tar": Compression.NONE,
    "tar+gzip": Compression.GZIP,
    "tar+zstd": Compression.ZSTD,
    "": Compression.NONE,
    "+gzip": Compression.GZIP,
    "+zstd": Compression.ZSTD,
}


class Kind:
    IMAGE_TAR = "image-tar"
    ARTIFACT_TAR = "artifact-tar"
    RAW_FILE = "raw-file"


@dataclass(frozen=True)
class LayerPlan:
    desc: Descriptor
    kind: str
    compression: str
    # raw-file: the file's path; artifact-tar: the path its entries must stay under
    path: str | None = None
    # digest of the uncompressed bytes when something pins it (diff_id)
    diff_id: str | None = None
    # how many bytes it may unpack to, when the producer declared it
    declared_bytes: int | None = None


@dataclass(frozen=True)
class Plan:
    packaging: str
    layers: tuple[LayerPlan, ...]

    @property
    def sequential(self) -> bool:
        """Image layers stack (order matters); artifact layers are independent."""
        return self.packaging == "image"


def validated_path(name: str, where: str) -> str:
    """An annotation-supplied path, held to the same rules as tar member names."""
    from csi_oci.unpack.paths import split_member_name

    if not name or not name.strip():
        raise InvalidLayer(f"{where}: empty file name")
    if name.startswith("/"):
        raise InvalidLayer(f"{where}: absolute file name {name!r}")
    parts = split_member_name(name, where)
    if not parts:
        raise InvalidLayer(f"{where}: file name {name!r} names the artifact root")
    if any(p.startswith(".wh.") for p in parts):
        raise InvalidLayer(f"{where}: file name {name!r} looks like a whiteout")
    return "/".join(parts)


def _load_config(config: bytes) -> dict[str, Any]:
    obj = parse_json(config, "artifact config")
    return obj if isinstance(obj, dict) else {}  # valid JSON but no object says nothing


def plan_for(manifest: ImageManifest, config: bytes) -> Plan:
    """Classify a manifest; raises Unsupported naming what is not understood."""
    config_type = manifest.config.media_type
    if manifest.artifact_type in MODELPACK_ARTIFACT_TYPES or config_type in MODELPACK_CONFIG_TYPES:
        return _modelpack(manifest, config)
    if config_type.startswith(KITOPS_CONFIG_PREFIX):
        return _kitops(manifest)
    if any(TITLE in layer.annotations for layer in manifest.layers):
        return _oras(manifest)
    if config_type in IMAGE_CONFIG_TYPES:
        return _image(manifest, config)
    kinds = ", ".join(sorted({layer.media_type for layer in manifest.layers})) or "no layers"
    raise Unsupported(
        f"unsupported artifact: config media type {config_type!r} "
        f"(artifactType {manifest.artifact_type or 'unset'!r}), layers {kinds}"
    )


def _image(manifest: ImageManifest, config: bytes) -> Plan:
    image_config = parse_config(config)
    if len(image_config.diff_ids) != len(manifest.layers):
        raise InvalidLayer(
            f"config lists {len(image_config.diff_ids)} diff_ids but the manifest has "
            f"{len(manifest.layers)} layers"
        )
    layers = []
    for desc, diff_id in zip(manifest.layers, image_config.diff_ids, strict=True):
        compression = LAYER_COMPRESSION.get(desc.media_type)
        if compression is None:
            raise Unsupported(f"layer {desc.digest} has unsupported media type {desc.media_type!r}")
        declared = desc.size if compression == Compression.NONE else None
        layers.append(LayerPlan(desc, Kind.IMAGE_TAR, compression, None, diff_id, declared))
    return Plan("image", tuple(layers))


def _oras(manifest: ImageManifest) -> Plan:
    layers = []
    for index, desc in enumerate(manifest.layers):
        where = f"layer {index + 1} ({desc.digest})"
        title = desc.annotations.get(TITLE)
        if title is None:
            raise Unsupported(
                f"{where}: ORAS artifact layer without an {TITLE} annotation "
                f"(media type {desc.media_type!r}): no file name to publish it under"
            )
        path = validated_path(title, f"{where} title")
        unpack = desc.annotations.get(ORAS_UNPACK, "").lower() == "true"
        if unpack or desc.media_type == ORAS_PY_DIR_TYPE:
            compression = _oras_dir_compression(desc)
            layers.append(LayerPlan(desc, Kind.ARTIFACT_TAR, compression, path))
        else:
            layers.append(
                LayerPlan(desc, Kind.RAW_FILE, Compression.NONE, path, desc.digest, desc.size)
            )
    return Plan("oras", tuple(layers))


def _oras_dir_compression(desc: Descriptor) -> str:
    compression = LAYER_COMPRESSION.get(desc.media_type)
    if compression is not None:
        return compression
    if desc.media_type.endswith("+gzip") or desc.media_type.endswith(".gzip"):
        return Compression.GZIP
    if desc.media_type.endswith("+zstd"):
        return Compression.ZSTD
    if desc.media_type.endswith(".tar") or desc.media_type.endswith("+tar"):
        return Compression.NONE
    raise Unsupported(
        f"ORAS directory layer {desc.digest} has unsupported media type {desc.media_type!r}"
    )


def _modelpack_diff_ids(config: bytes, count: int) -> tuple[str | None, ...]:
    obj = _load_config(config)
    modelfs = obj.get("modelfs")
    raw = modelfs.get("diffIds") if isinstance(modelfs, dict) else None
    if not isinstance(raw, list):
        return (None,) * count
    if len(raw) != count:
        raise InvalidLayer(
            f"ModelPack config lists {len(raw)} diffIds but the manifest has {count} layers"
        )
    try:
        return tuple(validate_digest(str(d)) for d in raw)
    except InvalidArgument as exc:
        raise RegistryError(f"ModelPack config has a bad diffId: {exc}") from None


def _declared_size(desc: Descriptor) -> int | None:
    """`org.cncf.model.file.metadata+json` gives a regular file's size."""
    key = next((k for k in MODELPACK_FILE_METADATA if k in desc.annotations), None)
    if key is None:
        return None
    try:
        meta = json.loads(desc.annotations[key])
    except (json.JSONDecodeError, RecursionError):
        raise InvalidLayer(f"layer {desc.digest}: malformed {key}") from None
    size = meta.get("size") if isinstance(meta, dict) else None
    typeflag = meta.get("typeflag") if isinstance(meta, dict) else None
    if isinstance(size, int) and size >= 0 and typeflag in (48, 0, "0", None):
        return size
    return None


def _modelpack(manifest: ImageManifest, config: bytes) -> Plan:
    diff_ids = _modelpack_diff_ids(config, len(manifest.layers))
    layers = []
    for index, desc in enumerate(manifest.layers):
        where = f"layer {index + 1} ({desc.digest})"
        match = _MODELPACK_LAYER.match(desc.media_type)
        if match is None:
            raise Unsupported(
                f"{where}: unsupported ModelPack layer media type {desc.media_type!r}"
            )
        name = next(
            (desc.annotations[k] for k in MODELPACK_FILEPATH if k in desc.annotations), None
        )
        name = name if name is not None else desc.annotations.get(TITLE)
        fmt = match.group(3)
        declared = _declared_size(desc)
        if fmt == "raw":
            if name is None:
                raise InvalidLayer(f"{where}: raw ModelPack layer without org.cncf.model.filepath")
            raw_path = validated_path(name, f"{where} filepath")
            diff_id = diff_ids[index] or desc.digest
            if diff_id != desc.digest:
                raise InvalidLayer(f"{where}: raw layer's diffId {diff_id} differs from its digest")
            layers.append(
                LayerPlan(desc, Kind.RAW_FILE, Compression.NONE, raw_path, desc.digest, desc.size)
            )
        else:
            path = validated_path(name, f"{where} filepath") if name is not None else None
            # A tar of one regular file: its declared size bounds the content.
            layers.append(
                LayerPlan(
                    desc,
                    Kind.ARTIFACT_TAR,
                    _FORMAT_COMPRESSION[fmt],
                    path,
                    diff_ids[index],
                    declared,
                )
            )
    return Plan("modelpack", tuple(layers))


def _kitops(manifest: ImageManifest) -> Plan:
    """ModelKit layers: tars of paths relative to the Kitfile's context (or, with
    `kit pack --layer-format raw`, the files themselves), each naming its path
    in `org.cncf.model.filepath`."""
    layers = []
    for index, desc in enumerate(manifest.layers):
        where = f"layer {index + 1} ({desc.digest})"
        match = _KITOPS_LAYER.match(desc.media_type)
        if match is None:
            raise Unsupported(f"{where}: unsupported KitOps layer media type {desc.media_type!r}")
        name = next(
            (desc.annotations[k] for k in MODELPACK_FILEPATH if k in desc.annotations), None
        )
        path = validated_path(name, f"{where} filepath") if name is not None else None
        if match.group(2) == "raw":
            if path is None:
                raise InvalidLayer(f"{where}: raw ModelKit layer without org.cncf.model.filepath")
            layers.append(
                LayerPlan(desc, Kind.RAW_FILE, Compression.NONE, path, desc.digest, desc.size)
            )
        else:
            compression = _FORMAT_COMPRESSION[match.group(2)]
            layers.append(
                LayerPlan(desc, Kind.ARTIFACT_TAR, compression, path, None, _declared_size(desc))
            )
    return Plan("kitops", tuple(layers))
